"""The smart chunker on real snippets in several languages: names, kinds, parents, line spans,
splitting of large definitions and merging of small ones."""

from __future__ import annotations

import pytest

from brainforge.memory.chunking import Chunker, ChunkingConfig, chunk_id, detect_language


def words(texts):  # a deterministic token counter: whitespace-separated words
    return [len(t.split()) for t in texts]


def chunker(max_tokens=400, min_tokens=3):
    return Chunker(words, ChunkingConfig(max_tokens=max_tokens, min_tokens=min_tokens, overlap_lines=1))


def by_name(chunks):
    return {c.name: c for c in chunks}


PYTHON = '''import os
from typing import Any


def calculate(x):
    """Double it, then add the offset from the environment to get the final value."""
    offset = int(os.environ.get("OFFSET", "0"))
    return x * 2 + offset


class Model:
    """A small model with a forward pass."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.calls = 0

    @property
    def doubled(self) -> float:
        return self.scale * 2 + self.calls - self.calls

    def forward(self, x: float) -> float:
        self.calls += 1
        y = x * self.scale
        return y + 1.0
'''


def test_python_functions_classes_methods_imports_with_spans():
    chunks = chunker().chunk("pkg/model.py", PYTHON)
    kinds = [(c.kind, c.name, c.start_line, c.end_line) for c in chunks]
    assert ("imports", None, 1, 2) in kinds
    assert ("function", "calculate", 5, 8) in kinds
    # the class fits the budget, so it stays whole
    assert ("class", "Model", 11, 25) in kinds
    model = by_name(chunks)["Model"]
    assert model.text.startswith("# Class: Model (pkg/model.py:11-25)\nclass Model:")


def test_large_class_is_split_into_head_and_methods_with_parent():
    chunks = chunker(max_tokens=45, min_tokens=3).chunk("pkg/model.py", PYTHON)
    names = {(c.kind, c.name, c.parent) for c in chunks}
    assert ("method", "forward", "Model") in names
    assert ("method", "doubled", "Model") in names  # decorated: the decorator belongs to it
    forward = next(c for c in chunks if c.name == "forward")
    assert (forward.start_line, forward.end_line) == (22, 25)
    assert forward.text.startswith("# Method: Model.forward (pkg/model.py:22-25)")
    doubled = next(c for c in chunks if c.name == "doubled")
    assert doubled.start_line == 18  # the @property line
    head = next(c for c in chunks if c.kind == "class")
    assert head.start_line == 11 and "A small model" in head.text


def test_oversized_function_splits_at_statement_boundaries():
    body = "\n".join(f"    value_{i} = compute(value_{i - 1}, {i}) + other(value_{i - 1})" for i in range(1, 41))
    source = f"def long_function(value_0):\n{body}\n    return value_40\n"
    chunks = chunker(max_tokens=60).chunk("long.py", source)
    parts = [c for c in chunks if c.name == "long_function"]
    assert len(parts) > 2
    assert all(f"(part {i + 1}/{len(parts)})" in p.text.splitlines()[0] for i, p in enumerate(parts))
    # contiguous, non-overlapping, covering the whole function; every part within budget
    assert parts[0].start_line == 1 and parts[-1].end_line == 42
    for a, b in zip(parts, parts[1:]):
        assert b.start_line == a.end_line + 1
    assert all(words([p.text])[0] <= 60 for p in parts)


def test_small_siblings_are_merged():
    source = "def a():\n    return 1\n\n\ndef b():\n    return 2\n\n\ndef c():\n    return 3\n"
    chunks = chunker(max_tokens=100, min_tokens=30).chunk("tiny.py", source)
    assert len(chunks) == 1
    assert chunks[0].name == "a, b, c" and (chunks[0].start_line, chunks[0].end_line) == (1, 10)
    separate = chunker(max_tokens=100, min_tokens=2).chunk("tiny.py", source)
    assert [c.name for c in separate] == ["a", "b", "c"]


@pytest.mark.parametrize("path, source, expected", [
    ("app.js", "import fs from 'fs';\n\nclass Store {\n  constructor() { this.items = []; }\n  add(item) {\n    this.items.push(item);\n  }\n}\n\nfunction helper(x) {\n  return x + 1;\n}\n",
     {("class", "Store", None, 3, 8), ("function", "helper", None, 10, 12)}),
    ("api.ts", "interface Point { x: number; y: number }\n\nexport function norm(p: Point): number {\n  return Math.sqrt(p.x * p.x + p.y * p.y);\n}\n",
     {("type", "Point", None, 1, 1), ("function", "norm", None, 3, 5)}),
    ("main.go", "package main\n\nimport \"fmt\"\n\ntype Server struct{ port int }\n\nfunc (s *Server) Start() error {\n\tfmt.Println(s.port)\n\treturn nil\n}\n",
     {("type", "Server", None, 5, 5), ("method", "Start", "Server", 7, 10)}),
    ("lib.rs", "use std::fmt;\n\nstruct Counter { n: u32 }\n\nfn increment(c: &mut Counter) -> u32 {\n    c.n += 1;\n    c.n\n}\n",
     {("type", "Counter", None, 3, 3), ("function", "increment", None, 5, 8)}),
    ("Cache.java", "import java.util.Map;\n\npublic class Cache {\n    private Map<String, String> data;\n\n    public String get(String key) {\n        return data.get(key);\n    }\n}\n",
     {("class", "Cache", None, 3, 9)}),
    ("util.c", "#include <stdio.h>\n\nstatic int add(int a, int b) {\n    return a + b;\n}\n\nint *make(void) {\n    return 0;\n}\n",
     {("function", "add", None, 3, 5), ("function", "make", None, 7, 9)}),
    ("shape.cpp", "#include <cmath>\n\nclass Circle {\npublic:\n    double area() const { return 3.14 * r * r; }\n    double r;\n};\n",
     {("class", "Circle", None, 3, 7)}),
])
def test_other_languages(path, source, expected):
    chunks = chunker().chunk(path, source)
    found = {(c.kind, c.name, c.parent, c.start_line, c.end_line) for c in chunks}
    assert expected <= found, found
    assert all(c.language == detect_language(path) for c in chunks)


def test_java_methods_get_their_class_as_parent_when_split():
    body = "\n".join(f"        total += {i} * weight + offset - bias;" for i in range(30))
    source = f"public class Scorer {{\n    public int score(int weight, int offset, int bias) {{\n        int total = 0;\n{body}\n        return total;\n    }}\n\n    public int zero() {{ return 0; }}\n}}\n"
    chunks = chunker(max_tokens=80).chunk("Scorer.java", source)
    assert any(c.kind == "method" and c.name == "score" and c.parent == "Scorer" for c in chunks)
    assert any(c.name and "zero" in c.name for c in chunks)


def test_markdown_splits_by_headings_with_trail():
    text = "# Guide\nIntro line here for the guide.\n\n## Install\nRun make install to set up.\n\n## Usage\nRun make demo to train.\n```\n# not a heading\n```\n"
    chunks = chunker(min_tokens=1).chunk("docs/guide.md", text)
    names = [c.name for c in chunks]
    assert names == ["Guide", "Guide > Install", "Guide > Usage"]
    assert chunks[2].end_line == 11 and "# not a heading" in chunks[2].text


def test_prose_paragraphs_overlap_and_unknown_files_use_line_windows():
    paragraphs = "\n\n".join(" ".join(f"word{p}_{i}" for i in range(20)) for p in range(6))
    chunks = chunker(max_tokens=60).chunk("notes.txt", paragraphs)
    assert len(chunks) >= 3 and all(c.kind == "text" for c in chunks)
    assert all(b.start_line <= a.end_line + 1 for a, b in zip(chunks, chunks[1:]))
    lines = "\n".join(f"key{i} = value{i} more words here" for i in range(60))
    windows = chunker(max_tokens=60).chunk("settings.ini", lines)
    assert detect_language("settings.ini") == "lines"
    assert len(windows) > 1 and all(c.kind == "lines" for c in windows)
    assert windows[1].start_line == windows[0].end_line  # overlap_lines=1


def test_chunk_ids_are_stable_and_follow_content():
    first = chunker().chunk("pkg/model.py", PYTHON)
    again = chunker().chunk("pkg/model.py", PYTHON)
    assert [c.id for c in first] == [c.id for c in again]
    changed = chunker().chunk("pkg/model.py", PYTHON.replace("return y + 1.0", "return y + 2.0"))
    assert {c.id for c in first} != {c.id for c in changed}
    assert chunk_id("a.py", 1, 2, "x") != chunk_id("b.py", 1, 2, "x")
    assert chunker().chunk("empty.py", "\n\n  \n") == []


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        ChunkingConfig(max_tokens=10, min_tokens=10)
