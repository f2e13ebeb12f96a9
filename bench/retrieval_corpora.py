"""Corpora and queries for bench/retrieval.py, known by construction (nobody labels anything).

Three corpora, each written to its own folder and ingested as one root (so a chunk's path is
`<corpus>/...`):

- `code`: the Python source of installed packages, copied as is (docstrings kept). Queries:
  `docstring` (the first sentence of a documented function's docstring) and `name` (that
  function's name split into words, `load_base_model` -> "load base model"). The answer is the
  chunk holding the function's `def` line.
- `code-blanked`: the same source with every docstring blanked (line numbers kept), and the
  `docstring` queries: the corpus of the README's first retrieval table, so no query can find
  its answer by copying it.
- `docs`: the language reference every Python ships (`pydoc_data.topics`), one `.rst` file per
  topic. Queries (`heading`): each section heading as written; the answer is the chunk holding
  the heading line or the section's first body line.

A query is a text plus the (path, line) locations its answer must contain; the bench turns
those into chunk ids once the store is built (`resolve_gold`).
"""

from __future__ import annotations

import ast
import importlib.util
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from brainforge.errors import BrainforgeError

CORPORA = ("code", "code-blanked", "docs")
QUERY_KINDS = {"code": ("docstring", "name", "identifier"), "code-blanked": ("docstring",), "docs": ("heading",)}
MIN_HEADING_QUERIES = 150
# Packages whose shipped .rst/.md files join the docs corpus when the language reference alone
# gives fewer than MIN_HEADING_QUERIES headings (sentence-transformers needs scikit-learn and
# numpy). Changelogs are left out: "[1.3.3] - 2021-05-27" is not a question.
DEFAULT_DOC_PACKAGES = ("sklearn", "numpy", "sentence_transformers")

_UNDERLINE = re.compile(r"([*=\-~^\"])\1*")
_ATX = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_NAME_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+[0-9]*|[A-Z]+[0-9]*|[0-9]+")


@dataclass(frozen=True)
class Query:
    kind: str
    text: str
    locations: tuple[tuple[str, int], ...]  # (chunk path, 1-based line): a chunk holding any of them is an answer


@dataclass
class Corpus:
    name: str
    root: Path  # the folder to ingest; chunk paths start with its name
    candidates: dict[str, list[Query]]  # query kind -> every unambiguous query, unsampled
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Heading:
    line: int  # 1-based line of the heading text
    text: str
    body_line: int | None  # 1-based first non-blank line after the heading (None: the file ends)


# ---------------------------------------------------------------------- query text rules


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence, or None when it is too short, too long or boilerplate
    (`See ...`, `Args:`, `Overrides ...`) to be a question anybody would ask."""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s", text)[0].strip()
    words = sentence.split()
    if len(words) < 6 or len(words) > 40 or sentence.lower().startswith(("see ", "args", "overrid", "deprecated", "alias", "same as")):
        return None
    return sentence


def split_name(name: str) -> str | None:
    """A function name as the words a person would type: snake and camel case split, lower
    case (`load_base_model`, `loadBaseModel` -> "load base model"). None for dunder names and
    one-word names, which are not a question."""
    if name.startswith("__") and name.endswith("__"):
        return None
    words = [part.lower() for piece in name.split("_") for part in _NAME_PART.findall(piece)]
    return " ".join(words) if len(words) >= 2 else None


def headings(text: str, markdown: bool = False) -> list[Heading]:
    """Section headings of reStructuredText-like text: a line underlined by one punctuation
    character of `*=-~^"` repeated at least as long as the text. With `markdown`, `# Title`
    lines outside code fences count too. Indented lines are examples, not headings."""
    lines = text.splitlines()
    found: list[tuple[int, str, int]] = []  # (0-based heading line, text, 0-based last line of the heading markup)
    in_fence = False
    for index, line in enumerate(lines):
        if markdown and line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if markdown and (match := _ATX.match(line)) and match.group(2):
            found.append((index, match.group(2), index))
            continue
        if index == 0 or not _is_underline(line):
            continue
        title = lines[index - 1]
        if (title.strip() and not title[0].isspace() and not _is_underline(title)
                and any(c.isalnum() for c in title) and len(line.rstrip()) >= len(title.rstrip())):
            found.append((index - 1, title.strip(), index))
    result = []
    for heading_line, title, markup_end in found:
        body = next((i for i in range(markup_end + 1, len(lines)) if lines[i].strip()), None)
        result.append(Heading(heading_line + 1, title, None if body is None else body + 1))
    return result


def _is_underline(line: str) -> bool:
    stripped = line.rstrip()
    return bool(stripped) and not line[0].isspace() and _UNDERLINE.fullmatch(stripped) is not None


def unambiguous(queries: Iterable[Query]) -> list[Query]:
    """Drop every query whose text occurs more than once: it has no single answer."""
    queries = list(queries)
    counts = Counter(q.text for q in queries)
    return [q for q in queries if counts[q.text] == 1]


# ---------------------------------------------------------------------- corpora


def package_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BrainforgeError(f"--packages: {package!r} is not an installed package; name one that is "
                              "(`python -c 'import NAME'` works) or install it")
    return Path(list(spec.submodule_search_locations)[0])


def build_code_corpus(name: str, packages: Sequence[str], target: Path, blank_docstrings: bool) -> Corpus:
    """Copy each package's .py files into `target/<package>/` (docstrings blanked or kept) and
    collect `docstring` and (kept only) `name` queries for documented functions."""
    docstring_queries: list[Query] = []
    documented: list[tuple[str, str, int]] = []  # (function name, chunk path, def line)
    defined: Counter = Counter()  # function name -> definitions in the whole corpus
    for package in packages:
        source_root = package_root(package)
        for path in sorted(source_root.rglob("*.py")):
            relative = Path(package) / path.relative_to(source_root)
            display = f"{target.name}/{relative.as_posix()}"
            text = path.read_text(encoding="utf-8", errors="replace")
            try:
                tree = ast.parse(text)
            except SyntaxError:
                continue
            lines = text.splitlines()
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    defined[node.name] += 1
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = _docstring_node(node)
                if doc is None:
                    continue
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    documented.append((node.name, display, node.lineno))
                    sentence = first_sentence(doc.value.value)
                    if sentence:
                        docstring_queries.append(Query("docstring", sentence, ((display, node.lineno),)))
                if blank_docstrings:
                    for row in range(doc.lineno - 1, doc.end_lineno):
                        lines[row] = ""
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text("\n".join(lines) + "\n" if blank_docstrings else text)
    candidates = {"docstring": unambiguous(docstring_queries)}
    if not blank_docstrings:
        names, identifiers = [], []
        for function, display, line in documented:
            words = split_name(function)
            if words and defined[function] == 1:
                names.append(Query("name", words, ((display, line),)))
                identifiers.append(Query("identifier", function, ((display, line),)))  # as a programmer types it
        candidates["name"] = unambiguous(names)
        candidates["identifier"] = unambiguous(identifiers)
    return Corpus(name, target, candidates)


def build_docs_corpus(target: Path, doc_packages: Sequence[str], minimum: int = MIN_HEADING_QUERIES,
                      topics: Mapping[str, str] | None = None) -> Corpus:
    """Write the language reference topics to `target/<topic>.rst`; when their headings give
    fewer than `minimum` queries, add the .rst/.md files shipped in `doc_packages` under
    `target/<package>/...` (said in the corpus notes)."""
    if topics is None:
        from pydoc_data.topics import topics as shipped

        topics = shipped
    files: dict[str, str] = {}  # chunk path -> text
    for topic, text in sorted(topics.items()):
        files[f"{target.name}/{_safe(topic)}.rst"] = text
    queries = _heading_queries(files)
    notes = [f"language reference: {len(topics)} topics, {len(queries)} unambiguous headings"]
    if len(queries) < minimum and doc_packages:
        added = 0
        for package in doc_packages:
            root = package_root(package)
            for path in sorted(list(root.rglob("*.rst")) + list(root.rglob("*.md"))):
                if path.name.upper().startswith("CHANGELOG") or any(part == "tests" for part in path.parts):
                    continue
                files[f"{target.name}/{package}/{path.relative_to(root).as_posix()}"] = path.read_text(encoding="utf-8", errors="replace")
                added += 1
        queries = _heading_queries(files)
        notes.append(f"fewer than {minimum}: added {added} .rst/.md files shipped in {', '.join(doc_packages)} "
                     f"-> {len(queries)} unambiguous headings")
    for display, text in files.items():
        destination = target.parent / display
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(text)
    return Corpus("docs", target, {"heading": queries}, notes)


def _heading_queries(files: Mapping[str, str]) -> list[Query]:
    queries = []
    for display, text in files.items():
        for heading in headings(text, markdown=display.endswith(".md")):
            locations = ((display, heading.line),) + (((display, heading.body_line),) if heading.body_line else ())
            queries.append(Query("heading", heading.text, locations))
    return unambiguous(queries)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _docstring_node(node: ast.AST):
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        return body[0]
    return None


# ---------------------------------------------------------------------- gold chunks and sampling


ChunkIndex = dict[str, list[tuple[int, int, str]]]  # chunk path -> (start line, end line, chunk id), by start


def chunk_index(chunks: Iterable[tuple[str, str, int, int]]) -> ChunkIndex:
    """Index (chunk id, path, start line, end line) rows by path for `resolve_gold`."""
    index: ChunkIndex = {}
    for chunk_id, path, start, end in chunks:
        index.setdefault(path, []).append((start, end, chunk_id))
    for spans in index.values():
        spans.sort()
    return index


def resolve_gold(query: Query, index: ChunkIndex) -> list[str]:
    """Ids of every chunk whose line range holds one of the query's locations (overlapping
    chunks can share a line), in store order; empty when none does."""
    gold: list[str] = []
    for path, line in query.locations:
        for start, end, chunk_id in index.get(path, ()):
            if start <= line <= end and chunk_id not in gold:
                gold.append(chunk_id)
    return gold


def sample_queries(candidates: Sequence[Query], index: ChunkIndex, count: int,
                   rng: random.Random) -> tuple[list[tuple[Query, list[str]]], int]:
    """Up to `count` queries in a seeded random order, each with its gold chunk ids; a query
    whose answer no chunk holds (its file was skipped) is dropped. Returns the sample and how
    many candidates were dropped on the way."""
    order = list(candidates)
    rng.shuffle(order)
    sample: list[tuple[Query, list[str]]] = []
    dropped = 0
    for query in order:
        if len(sample) == count:
            break
        gold = resolve_gold(query, index)
        if gold:
            sample.append((query, gold))
        else:
            dropped += 1
    return sample, dropped
