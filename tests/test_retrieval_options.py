"""`memory.retrieval` options through HybridRetriever (issue 8, section 7; issue 10): `fusion`,
`rrf_k`, `recall_n`, `rerank_weight` and `lexical_boost` each change the results the way they should.

The store is a stand-in with fixed vector and BM25 lists, so the fused order is computable
by hand (the real store is covered in test_memory.py); everything after the two lists is
the real retriever.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from brainforge.config import RetrievalConfig
from brainforge.memory.retrieval import HybridRetriever
from brainforge.memory.store import StoredChunk


class ListStore:
    """The part of MemoryStore the retriever reads, answering with fixed ranked lists."""

    root = "list-store"

    def __init__(self, vector: list[tuple[str, float]], bm25: list[tuple[str, float]], **retrieval) -> None:
        self.vector, self.bm25 = vector, bm25
        retrieval.setdefault("weights", {"vector": 1.0, "bm25": 1.0})  # equal, so the examples add up by hand
        self.config = SimpleNamespace(retrieval=RetrievalConfig(reranker="none", **retrieval))
        self.embedder = SimpleNamespace(embed_query=lambda query: np.ones(3, dtype=np.float32))

    def refresh(self) -> None:
        pass

    def __len__(self) -> int:
        return len({cid for cid, _ in self.vector + self.bm25})

    def vector_search(self, query_vector, k: int):
        return self.vector[:k]

    def bm25_search(self, query: str, k: int):
        return self.bm25[:k]

    def chunk(self, chunk_id: str) -> StoredChunk:
        return StoredChunk(chunk_id, f"text of {chunk_id}", f"{chunk_id}.py", 1, 2, "function", chunk_id, "python")


def ids(result) -> list[str]:
    return [hit.chunk.id for hit in result.hits]


# vector prefers A then B; BM25 prefers C then B; B is close to the top of both.
DISAGREE = ([("A", 0.99), ("B", 0.98), ("C", 0.10)], [("C", 10.0), ("B", 9.9), ("A", 0.1)])


def test_rrf_fusion_uses_ranks():
    result = HybridRetriever(ListStore(*DISAGREE, fusion="rrf", top_k=3)).search("q")
    # A and C: 1/61 + 1/63 = 0.032266; B: 2/62 = 0.032258 -> B last; A before C by id
    assert ids(result) == ["A", "C", "B"]
    assert result.hits[0].scores["rrf"] == pytest.approx(1 / 61 + 1 / 63)
    assert result.stages == ["vector", "bm25", "rrf", "rerank:none"]


def test_linear_fusion_uses_normalised_scores():
    result = HybridRetriever(ListStore(*DISAGREE, fusion="linear", top_k=3)).search("q")
    # min-max per list: B = (0.98-0.1)/0.89 + (9.9-0.1)/9.9 = 1.978; A = C = 1.0
    assert ids(result) == ["B", "A", "C"]
    assert result.hits[0].scores["linear"] == pytest.approx(0.88 / 0.89 + 9.8 / 9.9)
    assert result.stages == ["vector", "bm25", "linear", "rerank:none"]


@pytest.mark.parametrize("rrf_k, first, score", [
    (1, "A", 1 / 2),        # small k: a single first place wins (A: 1/(1+1) > B: 2/(1+4))
    (60, "B", 2 / 64),      # large k: agreement wins (B: 2/(60+4) > A: 1/(60+1))
])
def test_rrf_k_changes_who_wins(rrf_k, first, score):
    vector = [("A", 0.9), ("P", 0.8), ("Q", 0.7), ("B", 0.6)]
    bm25 = [("C", 9.0), ("R", 8.0), ("S", 7.0), ("B", 6.0)]
    result = HybridRetriever(ListStore(vector, bm25, fusion="rrf", rrf_k=rrf_k, top_k=1)).search("q")
    assert ids(result) == [first]
    assert result.hits[0].score == pytest.approx(score)


class Prefers:
    """A reranker that likes one chunk best and records how many candidates it saw."""

    name = "prefers"

    def __init__(self, favourite: str) -> None:
        self.favourite = favourite
        self.seen: list[str] = []

    def scores(self, query, texts, ids=None):
        self.seen = list(ids)
        return [10.0 if cid == self.favourite else -float(i) for i, cid in enumerate(ids)]


@pytest.mark.parametrize("recall_n, expected", [
    (3, ["A", "B", "C"]),          # E is 5th after fusion: never reaches the reranker
    (5, ["E", "A", "B"]),          # within recall: the reranker lifts it to the top
])
def test_recall_n_bounds_what_the_reranker_sees(recall_n, expected):
    ranked = [("A", 5.0), ("B", 4.0), ("C", 3.0), ("D", 2.0), ("E", 1.0)]
    store = ListStore(ranked, ranked, recall_n=recall_n, top_k=3, rerank_weight=100.0)  # the reranker decides
    reranker = Prefers("E")
    result = HybridRetriever(store, reranker=reranker).search("q")
    assert result.candidates == recall_n and len(reranker.seen) == recall_n
    assert ids(result) == expected
    assert result.stages[-1] == "rerank:prefers"


def test_relative_fusion_is_the_default_and_keeps_each_rankers_confidence():
    assert RetrievalConfig().fusion == "relative" and RetrievalConfig().weights == {"vector": 1.0, "bm25": 1.5}
    result = HybridRetriever(ListStore(*DISAGREE, top_k=3)).search("q")
    # relative to each list's best: B = 0.98/0.99 + 9.9/10 = 1.980; A = 1 + 0.01; C = 0.101 + 1
    assert ids(result) == ["B", "C", "A"]
    assert result.hits[0].scores["relative"] == pytest.approx(0.98 / 0.99 + 0.99)
    assert result.stages == ["vector", "bm25", "relative", "rerank:none"]


@pytest.mark.parametrize("weight, expected", [
    (0.0, ["A", "B", "C"]),    # the reranker's opinion is reported but moves nothing
    (0.2, ["A", "B", "C"]),    # E (fused 5th: 0.2 of A's 1.0) cannot jump four places on a small weight
    (1.0, ["A", "E", "B"]),    # A 1 + 0.23, E 0.2 + 1: close, A keeps first place
    (2.0, ["E", "A", "B"]),    # E 0.2 + 2 beats A 1 + 0.46: the favourite wins
])
def test_rerank_weight_sets_how_far_the_reranker_may_move_the_fused_order(weight, expected):
    ranked = [("A", 5.0), ("B", 4.0), ("C", 3.0), ("D", 2.0), ("E", 1.0)]
    store = ListStore(ranked, ranked, recall_n=5, top_k=3, rerank_weight=weight)
    result = HybridRetriever(store, reranker=Prefers("E")).search("q")
    assert ids(result) == expected
    assert all("rerank:prefers" in hit.scores for hit in result.hits)


def test_a_code_looking_query_multiplies_the_bm25_weight_when_the_rule_is_on():
    vector = [("A", 0.9), ("B", 0.6)]
    bm25 = [("B", 10.0), ("A", 7.0)]
    # plain words: A = 1 + 0.7 = 1.7 beats B = 0.667 + 1 = 1.667; an identifier: B = 0.667 + 2 beats A = 1 + 1.4
    equal = {"vector": 1.0, "bm25": 1.0}
    plain = HybridRetriever(ListStore(vector, bm25, top_k=2, weights=equal, lexical_boost=2.0)).search("load base model")
    assert ids(plain) == ["A", "B"] and plain.signals == [] and plain.weights == equal
    code = HybridRetriever(ListStore(vector, bm25, top_k=2, weights=equal, lexical_boost=2.0)).search("load_base_model")
    assert ids(code) == ["B", "A"] and code.weights == {"vector": 1.0, "bm25": 2.0}
    assert code.signals == ["snake_case 'load_base_model'"]
    off = HybridRetriever(ListStore(vector, bm25, top_k=2, weights=equal)).search("load_base_model")  # the default: off
    assert ids(off) == ["A", "B"] and off.signals == []
