"""`memory.retrieval` options through HybridRetriever (issue 8, section 7): `fusion`, `rrf_k`
and `recall_n` each change the results the way they should.

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
    result = HybridRetriever(ListStore(vector, bm25, rrf_k=rrf_k, top_k=1)).search("q")
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
    store = ListStore(ranked, ranked, recall_n=recall_n, top_k=3)
    reranker = Prefers("E")
    result = HybridRetriever(store, reranker=reranker).search("q")
    assert result.candidates == recall_n and len(reranker.seen) == recall_n
    assert ids(result) == expected
    assert result.stages[-1] == "rerank:prefers"
