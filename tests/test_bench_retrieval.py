"""bench/retrieval.py's query builders and offline scoring: no embedder, no store.

The lead tunes fusion on the stage cache with `evaluate_ranking`, so its numbers are checked
exactly on hand-made records; the query builders decide what counts as an answer, so their
rules are checked on small texts.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` run as a script does not put the repo root on the path
    sys.path.insert(0, str(REPO))

from bench.retrieval import ExperimentIndexes, evaluate_ranking, load_records, verdict  # noqa: E402
from bench.retrieval_corpora import (Heading, Query, build_code_corpus, build_docs_corpus, chunk_index,  # noqa: E402
                                     headings, resolve_gold, sample_queries, split_name)
from brainforge.memory.store import StoredChunk  # noqa: E402

RST = """\
The "assert" statement
**********************

Assert statements are a convenient way
to insert debugging assertions.

   assert_stmt ::= "assert" expression
   -----------------------------------

Augmented assignment
====================
Augmented assignment is the combination.

Too long a title
------

Subsection
~~~~~~~~~~~~~~~~~~

   Indented
   ========

Last heading
^^^^^^^^^^^^
"""


def test_headings_of_rst_text():
    found = headings(RST)
    assert found == [
        Heading(1, 'The "assert" statement', 4),
        Heading(10, "Augmented assignment", 12),  # body right under the underline
        Heading(17, "Subsection", 20),  # an underline may be longer than its title
        Heading(23, "Last heading", None),  # the file ends: only the heading line locates it
    ]
    # an indented grammar line over dashes, a too-short underline and an indented title are not headings
    assert not any(h.text in {"Too long a title", "Indented"} or h.text.startswith("assert_stmt") for h in found)


def test_headings_of_markdown_skip_fences():
    text = "# Title\n\nintro\n\n```python\n# not a heading\n```\n\n## Usage ##\nrun it\n\nSetext\n------\nbody\n"
    assert [(h.line, h.text, h.body_line) for h in headings(text, markdown=True)] == [
        (1, "Title", 3), (9, "Usage", 10), (12, "Setext", 14)]
    assert [h.text for h in headings(text)] == ["Setext"]  # .rst: `#` lines are text


@pytest.mark.parametrize("name, words", [
    ("load_base_model", "load base model"),
    ("loadBaseModel", "load base model"),
    ("_first_sentence", "first sentence"),
    ("parseHTTPResponse", "parse http response"),
    ("to_utf8", "to utf8"),
    ("__init__", None),  # dunder
    ("__exit__", None),
    ("__class_getitem__", None),  # a dunder of two words is still a dunder
    ("render", None),  # one word is not a query
    ("_render_", None),
])
def test_split_name(name, words):
    assert split_name(name) == words


def _chunk(cid: str, path: str, start: int, end: int, text: str = "", name: str = "") -> StoredChunk:
    return StoredChunk(cid, text or f"# Code ({path}:{start}-{end})\nx", path, start, end, "code", name, "python")


def test_gold_lookup_and_sampling():
    index = chunk_index([("a", "docs/x.rst", 1, 10), ("b", "docs/x.rst", 9, 20), ("c", "docs/y.rst", 1, 5)])
    heading = Query("heading", "T", (("docs/x.rst", 9), ("docs/x.rst", 12)))
    assert resolve_gold(heading, index) == ["a", "b"]  # overlapping chunks both hold line 9
    assert resolve_gold(Query("heading", "U", (("docs/x.rst", 12),)), index) == ["b"]
    assert resolve_gold(Query("name", "v", (("docs/y.rst", 6),)), index) == []  # past the last chunk
    assert resolve_gold(Query("name", "w", (("other.py", 1),)), index) == []  # file not in the store
    candidates = [Query("name", str(i), (("docs/y.rst", 1 if i % 2 else 99),)) for i in range(10)]
    sample, dropped = sample_queries(candidates, index, 3, random.Random(0))
    assert len(sample) == 3 and all(gold == ["c"] for _, gold in sample)
    assert dropped == sum(1 for q in _shuffled(candidates, 0)[:3 + dropped] if q.locations[0][1] == 99)
    assert [q.text for q, _ in sample] == [q.text for q in _shuffled(candidates, 0) if q.locations[0][1] == 1][:3]
    everything, dropped_all = sample_queries(candidates, index, 100, random.Random(0))
    assert len(everything) == 5 and dropped_all == 5


def _shuffled(items, seed):
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def _record(kind: str, gold: list[str], bm25: list[str], corpus: str = "code") -> dict:
    return {"corpus": corpus, "kind": kind, "query": "q", "gold": gold, "bm25": [[cid, 1.0] for cid in bm25]}


def test_evaluate_ranking_exact_numbers(tmp_path):
    records = [
        _record("docstring", ["g"], ["g", "x"]),  # rank 1
        _record("docstring", ["g"], ["x", "y", "g"]),  # rank 3
        _record("docstring", ["g"], ["x"] * 10 + ["g"]),  # rank 11: outside the top 10
        _record("docstring", ["g", "h"], ["x", "h", "g"]),  # two gold chunks: the first found counts (2)
        _record("name", ["g"], []),  # nothing found
        _record("name", ["g"], ["a", "b", "c", "d", "e", "g"]),  # rank 6
        _record("heading", ["g"], ["a", "b", "c", "d", "g"], corpus="docs"),  # rank 5
    ]
    path = tmp_path / "code.stages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = evaluate_ranking(load_records(path), lambda r: [i for i, _ in r["bm25"]])
    assert set(result) == {("code", "docstring"), ("code", "name"), ("docs", "heading")}
    assert result[("code", "docstring")] == {"recall@1": 0.25, "recall@5": 0.75, "recall@10": 0.75,
                                             "mrr@10": pytest.approx((1 + 1 / 3 + 1 / 2) / 4), "queries": 4}
    assert result[("code", "name")] == {"recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.5,
                                        "mrr@10": pytest.approx(1 / 12), "queries": 2}
    assert result[("docs", "heading")] == {"recall@1": 0.0, "recall@5": 1.0, "recall@10": 1.0,
                                           "mrr@10": pytest.approx(0.2), "queries": 1}


def test_verdict_names_the_best_stage_and_the_gap():
    records = [{**_record("name", ["g"], ["g"]), "vector": [["x", 0.9], ["g", 0.8]], "bm25_chunks": [["y", 1.0]],
                "default": ["x", "g"]},
               {**_record("name", ["g"], ["g"]), "vector": [["g", 0.9]], "bm25_chunks": [], "default": ["g"]}]
    v = verdict(records)
    assert v["best_stage"] == "bm25" and v["delta_mrr@10"] == -0.25 and v["default_ge_best"] is False


def test_experiment_indexes_whole_chunk_bm25_and_the_name_field():
    long_text = "# Function: f (m.py:1-20)\n" + "\n".join(["filler words here zebra"] * 8 + ["zebra zebra unicorn"] + ["more"] * 3)
    chunks = [_chunk("long", "m.py", 1, 20, long_text, name="f"),
              _chunk("short", "n.py", 1, 2, "# Function: g (n.py:1-2)\nzebra", name="g"),
              _chunk("other", "o.py", 1, 2, "# Function: load_base_model (o.py:1-2)\npass", name="load_base_model")]
    indexes = ExperimentIndexes.build(chunks)
    assert sorted(cid for cid, _ in indexes.chunk_search("zebra unicorn", 50)) == ["long", "short"]
    assert indexes.chunks.ids == ["long", "short", "other"]  # whole chunks, not passages
    assert [cid for cid, _ in indexes.name_search("load base model", 50)] == ["other"]
    assert indexes.name_search("zebra", 50) == []  # the name field does not hold the body


def test_docs_corpus_adds_package_docs_only_below_the_minimum(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fakedocs"
    (package / "descr").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "descr" / "iris.rst").write_text("Iris dataset\n------------\n\nFlowers.\n")
    (package / "CHANGELOG.md").write_text("## [1.0] - 2020-01-01\nfirst\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    topics = {"assert": RST, "dup": "Subsection\n==========\nagain\n"}
    corpus = build_docs_corpus(tmp_path / "docs", ["fakedocs"], minimum=2, topics=topics)
    texts = {q.text: q.locations for q in corpus.candidates["heading"]}
    assert "Subsection" not in texts  # occurs twice: no single answer
    assert set(texts) == {'The "assert" statement', "Augmented assignment", "Last heading"}  # enough: no package docs
    assert (tmp_path / "docs" / "assert.rst").read_text() == RST
    corpus = build_docs_corpus(tmp_path / "docs2", ["fakedocs"], minimum=4, topics=topics)
    texts = {q.text: q.locations for q in corpus.candidates["heading"]}
    assert texts["Iris dataset"] == (("docs2/fakedocs/descr/iris.rst", 1), ("docs2/fakedocs/descr/iris.rst", 4))
    assert "[1.0] - 2020-01-01" not in texts and "fakedocs" in corpus.notes[-1]
    assert (tmp_path / "docs2" / "fakedocs" / "descr" / "iris.rst").exists()


def test_code_corpus_queries_and_blanking(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fakepkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    source = (
        "def load_base_model(path):\n"
        '    """Load the base model weights from a folder on disk."""\n'
        "    return path\n"
        "\n"
        "class Thing:\n"
        "    def __init__(self):\n"
        '        """Build the thing with all of its parts in place."""\n'
        "    def save_all(self):\n"
        '        """Write every part of the thing to its own file."""\n'
        "def save_all():\n"
        "    pass\n"
        "def render():\n"
        '    """Render the whole thing to the terminal, line by line."""\n'
    )
    (package / "mod.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    kept = build_code_corpus("code", ["fakepkg"], tmp_path / "code", blank_docstrings=False)
    assert (tmp_path / "code" / "fakepkg" / "mod.py").read_text() == source
    docstrings = {q.text: q.locations for q in kept.candidates["docstring"]}
    assert docstrings["Load the base model weights from a folder on disk."] == (("code/fakepkg/mod.py", 1),)
    assert len(docstrings) == 4
    # save_all is defined twice, __init__ is a dunder, render is one word
    assert [(q.text, q.locations) for q in kept.candidates["name"]] == [("load base model", (("code/fakepkg/mod.py", 1),))]
    blanked = build_code_corpus("code-blanked", ["fakepkg"], tmp_path / "code-blanked", blank_docstrings=True)
    text = (tmp_path / "code-blanked" / "fakepkg" / "mod.py").read_text()
    assert "Load the base model" not in text and text.splitlines()[7] == "    def save_all(self):"  # lines kept
    assert set(blanked.candidates) == {"docstring"}
    assert {q.text for q in blanked.candidates["docstring"]} == set(docstrings)


def test_before_ranker_replays_rrf_then_passages_replacing_the_order():
    from bench.retrieval import before_ranker

    record = {"vector": [["a", 0.9], ["b", 0.8]], "bm25_chunks": [["b", 9.0], ["c", 3.0]],
              "passages": {"a": 0.2, "b": 0.1, "c": 0.7}}
    # RRF: b (both lists) > a > c; the passage cosines then decide alone: c, a, b
    assert before_ranker(record) == ["c", "a", "b"]
