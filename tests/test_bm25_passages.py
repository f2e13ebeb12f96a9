"""BM25 over passages: a chunk scores as its best passage, each chunk listed once."""

from __future__ import annotations

import pytest

from brainforge.memory.bm25 import BM25Index


def test_a_chunk_scores_as_its_best_passage_and_appears_once():
    ids = ["long#0", "long#1", "long#2", "short#0", "other#0"]
    texts = ["alpha beta gamma delta", "zebra unicorn stripes", "epsilon zeta eta", "zebra and horses", "nothing here"]
    found = BM25Index.build(ids, texts).search("zebra unicorn", 10)
    assert [cid for cid, _ in found] == ["long", "short"]
    by_row = dict(BM25Index.build(ids, texts).search("zebra unicorn", 10))
    assert by_row["long"] > by_row["short"] > 0


def test_deep_enough_to_return_k_distinct_chunks_when_one_chunk_has_many_matching_passages():
    ids = [f"big#{n}" for n in range(40)] + ["small#0", "tiny#0"]
    texts = ["zebra zebra stripes"] * 40 + ["a zebra here among many other words of text", "zebra"]
    found = BM25Index.build(ids, texts).search("zebra", 3)
    assert sorted(cid for cid, _ in found) == ["big", "small", "tiny"]
    assert len(BM25Index.build(ids, texts).search("zebra", 50)) == 3  # k beyond the index: everything, once


def test_an_index_of_whole_chunks_still_works():
    index = BM25Index.build(["a", "b"], ["zebra stripes", "horse"])
    assert index.search("zebra", 5) == [("a", pytest.approx(index.search("zebra", 5)[0][1]))]
    assert index.search("unknownword", 5) == [] and index.search("the of", 5) == []
