"""Smart chunking: code by syntax tree, Markdown and reStructuredText by headings, prose by paragraphs.

Retrieval quality is decided here more than anywhere else. A chunk that is one whole
function, labelled with its name and place, is what a question about that function should
find; a fixed window that starts mid-function and ends mid-docstring is not. So code is parsed
with tree-sitter and cut at definitions (imports, functions, classes, methods); definitions too
large for the embedder are cut again at statement boundaries, and runs of tiny siblings are
merged so that no chunk is a lone one-liner. Sizes are measured in the embedder's own tokens,
because that is where truncation happens.

Every chunk's text starts with a one-line header such as ``# Method: Model.forward
(model.py:12-40)``: the embedder and BM25 both see the name and the path, and the answer can
cite the lines.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

TokenCounter = Callable[[list[str]], list[int]]
"""Token counts of many strings at once (one batched tokenizer call per file)."""

# file extension -> tree-sitter language name (tree-sitter-language-pack 0.13.0 bundles these)
CODE_LANGUAGES: dict[str, str] = {
    ".py": "python", ".pyi": "python",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".mts": "typescript", ".cts": "typescript", ".tsx": "tsx",
    ".go": "go", ".rs": "rust", ".java": "java",
    ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp",
}
CHUNKER_VERSION = 2  # bump when the same file would be cut differently (2: reST by section); stores re-chunk once
MARKDOWN_EXTENSIONS = {".md", ".markdown", ".mdx"}
RST_EXTENSIONS = {".rst", ".rest"}
PROSE_EXTENSIONS = {".txt", ".text", ""}  # plain text is not reST unless it says so by its extension

# Per language: node type -> chunk kind. "class" kinds are containers whose members become
# methods when the container is too large to keep whole.
_DEFINITIONS: dict[str, dict[str, str]] = {
    "python": {"function_definition": "function", "class_definition": "class"},
    "javascript": {"function_declaration": "function", "generator_function_declaration": "function",
                   "class_declaration": "class", "method_definition": "method"},
    "go": {"function_declaration": "function", "method_declaration": "method", "type_declaration": "type"},
    "rust": {"function_item": "function", "impl_item": "class", "trait_item": "class", "struct_item": "type",
             "enum_item": "type", "mod_item": "module", "macro_definition": "macro"},
    "java": {"class_declaration": "class", "interface_declaration": "class", "enum_declaration": "class",
             "record_declaration": "class", "method_declaration": "method", "constructor_declaration": "method"},
    "c": {"function_definition": "function", "struct_specifier": "type", "enum_specifier": "type",
          "union_specifier": "type", "type_definition": "type"},
}
_DEFINITIONS["typescript"] = {**_DEFINITIONS["javascript"], "interface_declaration": "type",
                              "type_alias_declaration": "type", "enum_declaration": "type",
                              "abstract_class_declaration": "class"}
_DEFINITIONS["tsx"] = _DEFINITIONS["typescript"]
_DEFINITIONS["cpp"] = {**_DEFINITIONS["c"], "class_specifier": "class", "namespace_definition": "class"}

_IMPORTS: dict[str, set[str]] = {
    "python": {"import_statement", "import_from_statement", "future_import_statement"},
    "javascript": {"import_statement"}, "typescript": {"import_statement"}, "tsx": {"import_statement"},
    "go": {"import_declaration", "package_clause"}, "rust": {"use_declaration", "extern_crate_declaration"},
    "java": {"import_declaration", "package_declaration"},
    "c": {"preproc_include"}, "cpp": {"preproc_include", "using_declaration"},
}
# Wrappers whose inner definition carries the name (decorators, exports, templates).
_WRAPPERS = {"decorated_definition", "export_statement", "template_declaration"}
_COMMENT_PREFIXES = ("#", "//", "/*", "*", "--", ";")


@dataclass(frozen=True)
class ChunkingConfig:
    """Chunk sizes, in tokens of the embedder that will read the chunks."""

    max_tokens: int = 240
    """Largest chunk; all-MiniLM-L6-v2 truncates at 256 word pieces, header included."""
    min_tokens: int = 48
    """Siblings smaller than this are merged with their neighbours."""
    overlap_lines: int = 2
    """Lines repeated between consecutive prose and line-window chunks."""

    def __post_init__(self) -> None:
        if not 0 < self.min_tokens < self.max_tokens:
            raise ValueError(f"chunking: need 0 < min_tokens ({self.min_tokens}) < max_tokens ({self.max_tokens})")
        if self.overlap_lines < 0:
            raise ValueError("chunking: overlap_lines must be >= 0")


@dataclass(frozen=True)
class Chunk:
    """A retrievable piece of one file, with where it came from."""

    id: str
    path: str
    start_line: int  # 1-based, inclusive
    end_line: int
    kind: str  # function, method, class, type, imports, code, section, text, lines, ...
    name: str | None
    parent: str | None
    language: str
    text: str  # header line + source

    @property
    def location(self) -> str:
        return f"{self.path}:{self.start_line}-{self.end_line}"

    def metadata(self) -> dict[str, Any]:
        return {"path": self.path, "start_line": self.start_line, "end_line": self.end_line, "kind": self.kind,
                "name": self.name or "", "parent": self.parent or "", "language": self.language}


@dataclass
class _Piece:
    """A line span with a label, before headers and ids are attached."""

    start: int  # 0-based line index, inclusive
    end: int  # inclusive
    kind: str
    name: str | None = None
    parent: str | None = None
    part: tuple[int, int] | None = None
    members: list[str] = field(default_factory=list)
    mergeable: bool = True


def detect_language(path: str) -> str:
    """`python`, ..., `markdown`, `restructuredtext`, `text`, or `lines` for anything else."""
    suffix = ("." + path.rsplit(".", 1)[-1].lower()) if "." in path.rsplit("/", 1)[-1] else ""
    if suffix in CODE_LANGUAGES:
        return CODE_LANGUAGES[suffix]
    if suffix in MARKDOWN_EXTENSIONS:
        return "markdown"
    if suffix in RST_EXTENSIONS:
        return "restructuredtext"
    if suffix in PROSE_EXTENSIONS:
        return "text"
    return "lines"


def chunk_id(path: str, start_line: int, end_line: int, text: str) -> str:
    """Stable across runs; changes when the content or its place changes."""
    content = hashlib.sha1(text.encode("utf-8")).hexdigest()
    return hashlib.sha1(f"{path}\0{start_line}\0{end_line}\0{content}".encode()).hexdigest()[:20]


class Chunker:
    """Turns one file's text into chunks; knows nothing about storage."""

    def __init__(self, count_tokens: TokenCounter, config: ChunkingConfig | None = None) -> None:
        self.count_tokens = count_tokens
        self.config = config or ChunkingConfig()
        self._parsers: dict[str, Any] = {}
        self._prefix: list[int] = [0]
        self._header_tokens = 16  # room for the header line every chunk gets, set per file

    # ------------------------------------------------------------------ entry point

    def chunk(self, path: str, text: str, language: str | None = None) -> list[Chunk]:
        language = language or detect_language(path)
        lines = text.splitlines()
        if not any(line.strip() for line in lines):
            return []
        # WordPiece tokens never cross whitespace, so a span's count is the sum of its lines'.
        self._header_tokens = self.count_tokens([f"# Definitions: {path}:{len(lines)}-{len(lines)} (part 10/10)"])[0] + 12
        self._prefix = [0]
        for count in self.count_tokens(lines):
            self._prefix.append(self._prefix[-1] + count)
        if language in _DEFINITIONS:
            pieces = self._code_pieces(lines, text, language)
        elif language == "markdown":
            pieces = self._section_pieces(lines, _markdown_headings(lines))
        elif language == "restructuredtext":
            pieces = self._section_pieces(lines, _rst_headings(lines))
        elif language == "text":
            pieces = self._paragraph_pieces(lines, 0, len(lines) - 1, "text")
        else:
            pieces = self._window_pieces(lines, 0, len(lines) - 1, "lines")
        return [self._finish(path, lines, piece, language) for piece in pieces if _has_content(lines, piece)]

    # ------------------------------------------------------------------ code

    def _parser(self, language: str) -> Any:
        if language not in self._parsers:
            from tree_sitter_language_pack import get_parser

            self._parsers[language] = get_parser(language)
        return self._parsers[language]

    def _code_pieces(self, lines: list[str], text: str, language: str) -> list[_Piece]:
        tree = self._parser(language).parse(text.encode("utf-8"))
        pieces: list[_Piece] = []
        for piece in self._walk(tree.root_node, lines, language, parent=None, lo=0, hi=len(lines) - 1):
            if piece.part is None and self._tokens(lines, piece) > self.config.max_tokens:  # a long import run
                windows = self._window_pieces(lines, piece.start, piece.end, piece.kind, piece.parent, overlap=0)
                pieces.extend(_Piece(w.start, w.end, piece.kind, piece.name, piece.parent, part=(i + 1, len(windows)))
                              for i, w in enumerate(windows))
            else:
                pieces.append(piece)
        return self._merge_small(lines, pieces)

    def _walk(self, node: Any, lines: list[str], language: str, parent: str | None, lo: int, hi: int) -> list[_Piece]:
        """Definitions under `node` become pieces; the lines between them become `code` pieces."""
        definitions = _DEFINITIONS[language]
        imports = _IMPORTS.get(language, set())
        pieces: list[_Piece] = []
        cursor = lo
        import_run: _Piece | None = None
        for child in node.named_children:
            start, end = _rows(child)
            if start < cursor or start > hi:
                continue
            inner = _unwrap(child)
            if child.type in imports or inner.type in imports:
                if import_run is not None and _only_blank_or_comment(lines, import_run.end + 1, start - 1):
                    import_run.end = end
                else:
                    pieces.extend(self._gap(lines, cursor, start - 1, parent))
                    import_run = _Piece(start, end, "imports", parent=parent)
                    pieces.append(import_run)
                cursor = end + 1
                continue
            kind = definitions.get(inner.type)
            if kind is None:
                continue
            if kind == "function" and parent is not None and language != "go":
                kind = "method"
            if _only_blank_or_comment(lines, cursor, start - 1):  # comments between definitions go with the next one
                start = _trim(lines, cursor, start - 1)[0] if _has_text(lines, cursor, start - 1) else start
            start = _leading_comments(lines, start, cursor)
            pieces.extend(self._gap(lines, cursor, start - 1, parent))
            import_run = None
            name = _node_name(inner, language)
            owner = _go_receiver(inner) if inner.type == "method_declaration" and language == "go" else parent
            pieces.extend(self._definition(inner, lines, language, kind, name, owner, start, end))
            cursor = end + 1
        pieces.extend(self._gap(lines, cursor, hi, parent))
        return pieces

    def _definition(self, node: Any, lines: list[str], language: str, kind: str, name: str | None,
                    parent: str | None, start: int, end: int) -> list[_Piece]:
        whole = _Piece(start, end, kind, name, parent)
        if self._tokens(lines, whole) <= self.config.max_tokens:
            return [whole]
        qualified = f"{parent}.{name}" if parent and name else name
        body = node.child_by_field_name("body")
        if body is None:
            body = next((c for c in node.named_children if c.type in _BLOCK_TYPES), None)
        if kind == "class" and body is not None:
            # The class head (signature, docstring, fields) on its own; members by themselves.
            members = self._walk(body, lines, language, parent=qualified, lo=start, hi=end)
            first_member = next((p.start for p in members if p.kind != "code"), end + 1)
            head = [p for p in members if p.kind == "code" and p.end < first_member]
            rest = [p for p in members if not (p.kind == "code" and p.end < first_member)]
            head_end = max([start] + [p.end for p in head])
            head = _Piece(start, head_end, kind, name, parent, mergeable=False)  # stays labelled as the class
            if (rest and rest[0].part is None and self._tokens(lines, head) < self.config.min_tokens
                    and self._span_tokens(lines, start, rest[0].end) <= self.config.max_tokens):
                head.members = [_label(head), _label(rest[0])]
                head.end = rest.pop(0).end
            return self._split(lines, head, body) + rest
        return self._split(lines, whole, body)

    def _split(self, lines: list[str], piece: _Piece, body: Any) -> list[_Piece]:
        """Cut an oversized definition at statement boundaries, windowing any giant statement."""
        if self._tokens(lines, piece) <= self.config.max_tokens:
            return [piece]
        boundaries = sorted({_rows(child)[0] for child in (body.named_children if body is not None else [])
                             if piece.start < _rows(child)[0] <= piece.end})
        segments, seg_start = [], piece.start
        for boundary in boundaries + [piece.end + 1]:
            if boundary > seg_start:
                segments.append((seg_start, boundary - 1))
                seg_start = boundary
        spans: list[tuple[int, int]] = []
        current: tuple[int, int] | None = None
        for seg in segments:
            candidate = (current[0], seg[1]) if current else seg
            if self._span_tokens(lines, *candidate) <= self.config.max_tokens:
                current = candidate
            elif self._span_tokens(lines, *seg) <= self.config.max_tokens:
                spans.append(current)  # type: ignore[arg-type]  # candidate != seg, so current is set
                current = seg
            else:  # one giant statement: window it, starting with whatever precedes it
                windows = self._window_pieces(lines, candidate[0], candidate[1], piece.kind, overlap=0)
                spans.extend((w.start, w.end) for w in windows[:-1])
                current = (windows[-1].start, windows[-1].end)
        if current:
            spans.append(current)
        return [_Piece(a, b, piece.kind, piece.name, piece.parent, part=(i + 1, len(spans)))
                for i, (a, b) in enumerate(spans)]

    def _gap(self, lines: list[str], start: int, end: int, parent: str | None) -> list[_Piece]:
        if end < start or _only_blank_or_comment(lines, start, end) and not _has_text(lines, start, end):
            return []
        start, end = _trim(lines, start, end)
        if end < start:
            return []
        return self._window_pieces(lines, start, end, "code", parent=parent, overlap=0)

    def _merge_small(self, lines: list[str], pieces: list[_Piece]) -> list[_Piece]:
        """Merge runs of tiny neighbours that share a parent (and are not parts of one split)."""
        merged: list[_Piece] = []
        for piece in pieces:
            last = merged[-1] if merged else None
            if (last is not None and last.parent == piece.parent and last.part is None and piece.part is None
                    and last.mergeable and piece.mergeable
                    and (self._tokens(lines, last) < self.config.min_tokens or self._tokens(lines, piece) < self.config.min_tokens)
                    and self._span_tokens(lines, last.start, piece.end) <= self.config.max_tokens):
                if not last.members:
                    last.members = [_label(last)]
                if _label(piece) not in last.members:
                    last.members.append(_label(piece))
                last.end = piece.end
                last.kind = last.kind if last.kind == piece.kind else "group"
                continue
            merged.append(piece)
        return merged

    # ------------------------------------------------------------------ prose

    def _section_pieces(self, lines: list[str], headings: list[tuple[int, int, str]]) -> list[_Piece]:
        """One piece per section, named by its heading trail ("Guide > Install > Linux").

        `headings` are (first line, level, title) in file order, from any markup: a section runs
        from its heading's first line to the line before the next heading. A section over the
        size limit is split by paragraphs, every part keeping the section's name.
        """
        headings = list(headings)
        if not headings or headings[0][0] > 0:  # the text before the first heading is a section of its own
            headings.insert(0, (0, 0, ""))
        sections: list[_Piece] = []
        trail: list[tuple[int, str]] = []
        for i, (line, level, title) in enumerate(headings):
            end = (headings[i + 1][0] - 1) if i + 1 < len(headings) else len(lines) - 1
            trail = [(lv, t) for lv, t in trail if lv < level] + ([(level, title)] if title else [])
            name = " > ".join(t for _, t in trail) or None
            section = _Piece(line, end, "section", name)
            if self._tokens(lines, section) <= self.config.max_tokens:
                sections.append(section)
            else:
                sections.extend(_Piece(p.start, p.end, "section", name, part=p.part)
                                for p in self._paragraph_pieces(lines, line, end, "section"))
        return self._merge_small(lines, sections)

    def _paragraph_pieces(self, lines: list[str], start: int, end: int, kind: str) -> list[_Piece]:
        """Whole paragraphs up to the size limit, the last lines of one repeated in the next."""
        paragraphs: list[tuple[int, int]] = []
        index = start
        while index <= end:
            if not lines[index].strip():
                index += 1
                continue
            para_start = index
            while index <= end and lines[index].strip():
                index += 1
            paragraphs.append((para_start, index - 1))
        spans: list[tuple[int, int]] = []
        current: tuple[int, int] | None = None
        for para in paragraphs:
            candidate = (current[0], para[1]) if current else para
            if current and self._span_tokens(lines, *candidate) > self.config.max_tokens:
                spans.append(current)
                overlap_start = max(current[1] - self.config.overlap_lines + 1, current[0] + 1, para[0] - self.config.overlap_lines)
                current = (min(overlap_start, para[0]), para[1])
                if self._span_tokens(lines, *current) > self.config.max_tokens:
                    current = para
            else:
                current = candidate
        if current:
            spans.append(current)
        pieces: list[_Piece] = []
        for a, b in spans:
            if self._span_tokens(lines, a, b) > self.config.max_tokens:
                pieces.extend(self._window_pieces(lines, a, b, kind))
            else:
                pieces.append(_Piece(a, b, kind))
        return pieces

    def _window_pieces(self, lines: list[str], start: int, end: int, kind: str, parent: str | None = None,
                       overlap: int | None = None) -> list[_Piece]:
        """Greedy line windows up to the size limit (a single over-long line stays one window)."""
        overlap = self.config.overlap_lines if overlap is None else overlap
        pieces: list[_Piece] = []
        index = start
        while index <= end:
            stop = index
            while stop + 1 <= end and self._span_tokens(lines, index, stop + 1) <= self.config.max_tokens:
                stop += 1
            pieces.append(_Piece(index, stop, kind, parent=parent))
            if stop >= end:
                break
            index = max(stop + 1 - overlap, index + 1)
        return pieces

    # ------------------------------------------------------------------ helpers

    def _tokens(self, lines: list[str], piece: _Piece) -> int:
        return self._span_tokens(lines, piece.start, piece.end)

    def _span_tokens(self, lines: list[str], start: int, end: int) -> int:
        return self._prefix[end + 1] - self._prefix[start] + self._header_tokens

    def _finish(self, path: str, lines: list[str], piece: _Piece, language: str) -> Chunk:
        body = "\n".join(lines[piece.start:piece.end + 1])
        start_line, end_line = piece.start + 1, piece.end + 1
        text = f"{_header(piece, language)} ({path}:{start_line}-{end_line})\n{body}"
        name = ", ".join(piece.members) if piece.members else piece.name
        return Chunk(chunk_id(path, start_line, end_line, body), path, start_line, end_line, piece.kind,
                     name, piece.parent, language, text)


_BLOCK_TYPES = {"block", "class_body", "declaration_list", "field_declaration_list", "compound_statement",
                "statement_block", "interface_body", "enum_body"}


def _header(piece: _Piece, language: str) -> str:
    if piece.members:
        return f"# {language.capitalize()} definitions: {', '.join(piece.members)}"
    if piece.kind in {"text", "lines", "code"} and not piece.name:
        label = {"text": "Text", "lines": "Lines", "code": "Code"}[piece.kind]
        header = f"# {label}" + (f" in {piece.parent}" if piece.parent else "")
    else:
        qualified = f"{piece.parent}.{piece.name}" if piece.parent and piece.name else (piece.name or "")
        header = f"# {piece.kind.capitalize()}: {qualified}".rstrip(": ")
    if piece.part:
        header += f" (part {piece.part[0]}/{piece.part[1]})"
    return header


def _label(piece: _Piece) -> str:
    if piece.name:
        return f"{piece.parent}.{piece.name}" if piece.parent else piece.name
    return piece.kind


def _rows(node: Any) -> tuple[int, int]:
    """0-based inclusive line span; a node ending at column 0 ends on the line before."""
    start, end = node.start_point[0], node.end_point[0]
    if node.end_point[1] == 0 and end > start:
        end -= 1
    return start, end


def _unwrap(node: Any) -> Any:
    while node.type in _WRAPPERS:
        inner = node.child_by_field_name("definition") or node.child_by_field_name("declaration")
        if inner is None:
            inner = next((c for c in reversed(node.named_children) if c.type not in {"decorator", "comment"}), None)
        if inner is None:
            return node
        node = inner
    return node


def _node_name(node: Any, language: str) -> str | None:
    if node.type == "type_declaration":  # go: type Foo struct {...}
        spec = next((c for c in node.named_children if c.type == "type_spec"), None)
        node = spec or node
    target = node.child_by_field_name("name")
    if target is None and node.child_by_field_name("declarator") is not None:  # C/C++: int *name(void)
        target = node.child_by_field_name("declarator")
        while target.child_by_field_name("declarator") is not None:
            target = target.child_by_field_name("declarator")
    if target is None:  # Rust: impl Type { ... }
        target = node.child_by_field_name("type")
    if target is None:
        return None
    return target.text.decode("utf-8", errors="replace").strip() or None


def _go_receiver(node: Any) -> str | None:
    """`func (s *Server) Start()` belongs to `Server`."""
    receiver = node.child_by_field_name("receiver")
    if receiver is None:
        return None
    names = [n for n in _descendants(receiver) if n.type == "type_identifier"]
    return names[0].text.decode("utf-8", errors="replace") if names else None


def _descendants(node: Any) -> list[Any]:
    found = []
    for child in node.named_children:
        found.append(child)
        found.extend(_descendants(child))
    return found


def _leading_comments(lines: list[str], start: int, floor: int) -> int:
    """Move a definition's start up over the comment block directly above it."""
    while start - 1 >= floor and lines[start - 1].strip().startswith(_COMMENT_PREFIXES):
        start -= 1
    return start


def _only_blank_or_comment(lines: Sequence[str], start: int, end: int) -> bool:
    return all(not line.strip() or line.strip().startswith(_COMMENT_PREFIXES) for line in lines[start:end + 1])


def _has_text(lines: Sequence[str], start: int, end: int) -> bool:
    return any(line.strip() for line in lines[start:end + 1])


def _trim(lines: Sequence[str], start: int, end: int) -> tuple[int, int]:
    while start <= end and not lines[start].strip():
        start += 1
    while end >= start and not lines[end].strip():
        end -= 1
    return start, end


def _has_content(lines: Sequence[str], piece: _Piece) -> bool:
    return _has_text(lines, piece.start, piece.end)


# ---------------------------------------------------------------------- headings of prose markup

def _markdown_headings(lines: Sequence[str]) -> list[tuple[int, int, str]]:
    """(line, level, title) of each ATX heading (`## Title`), skipping fenced code blocks."""
    headings: list[tuple[int, int, str]] = []
    in_fence = False
    for index, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not in_fence and (match := re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)):
            headings.append((index, len(match.group(1)), match.group(2)))
    return headings


_RST_ADORNMENT = frozenset("=-`:'\"~^_*+#<>")
"""Characters that may underline (and overline) a reST section title."""
_RST_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
"""Characters that may quote an unindented literal block (docutils: any non-alphanumeric 7-bit ASCII)."""


def _rst_headings(lines: Sequence[str]) -> list[tuple[int, int, str]]:
    """(first line, level, title) of each reST section title, found the way docutils finds them.

    A title is the first line of a text block, unindented, underlined (and optionally overlined)
    by one punctuation character repeated at least as long as the title. Levels follow the
    order in which each adornment style (character, with or without overline) first appears,
    because reST has no fixed level per character: each document picks its own. Indented bodies
    of directives, comments and literal blocks (`::`), and quoted literal blocks, are skipped:
    their lines are content, not structure.
    """
    headings: list[tuple[int, int, str]] = []
    levels: dict[tuple[str, bool], int] = {}
    body: tuple[int, bool] | None = None  # (indent of the line that opened an indented body, opened by "::")
    in_body = False  # a line of that body has been read
    quote: str | None = None  # the character that starts every line of the quoted literal block being read
    fresh = True  # this line starts a text block: only such a line can be a title (or its overline)
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if not stripped:
            quote, fresh = None, True
            index += 1
            continue
        indent = len(line) - len(line.lstrip())
        if quote is not None and stripped[0] == quote:
            index += 1
            continue
        quote = None
        if body is not None:
            if indent > body[0]:
                in_body = True
                index += 1
                continue
            if body[1] and fresh and not in_body and indent == body[0] and stripped[0] in _RST_PUNCTUATION:
                body = None  # "::" then an unindented block whose lines all start alike: a quoted literal
                quote = stripped[0]
                index += 1
                continue
            # Markup, or a literal block, ended by an unindented line: docutils starts a new block there
            # even without a blank line (only a "::" paragraph that simply goes on does not).
            fresh = fresh or not body[1] or in_body
            body, in_body = None, False
        title = rst_title(lines, index) if fresh else None
        if title is not None:
            start, end, style, text = title
            headings.append((start, levels.setdefault(style, len(levels) + 1), text))
            index, fresh = end + 1, True  # a title ends its block: the next line may start another
            continue
        if stripped == ".." or stripped.startswith(".. "):  # directive, comment, target, footnote
            body, in_body = (indent, False), False
        elif stripped.endswith("::"):  # the paragraph introduces a literal block
            body, in_body = (indent, True), False
        fresh = False
        index += 1
    return headings


def rst_title(lines: Sequence[str], index: int) -> tuple[int, int, tuple[str, bool], str] | None:
    """(first line, last line, style, title) if a section title starts at `index`, else None."""
    char = _rst_adornment(lines[index])
    if char is not None:  # an overline needs a title and the same line again below it; else a transition
        if index + 2 >= len(lines):
            return None
        title, under = lines[index + 1], lines[index + 2].rstrip()
        if (title.strip() and _rst_adornment(title) is None and under == lines[index].rstrip()
                and _column_width(title.rstrip()) <= len(under)):
            return index, index + 2, (char, True), title.strip()  # an overlined title may be inset
        return None
    line = lines[index]
    if line[:1].isspace() or index + 1 >= len(lines):
        return None
    char = _rst_adornment(lines[index + 1])
    if char is None or _column_width(line.rstrip()) > len(lines[index + 1].rstrip()):
        return None
    return index, index + 1, (char, False), line.strip()


def _rst_adornment(line: str) -> str | None:
    """The character of an adornment line (one reST punctuation character repeated from column 0)."""
    text = line.rstrip()
    if text and text[0] in _RST_ADORNMENT and text == text[0] * len(text):
        return text[0]
    return None


def _column_width(text: str) -> int:
    """Display columns, as docutils counts them to compare a title with its underline."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)
