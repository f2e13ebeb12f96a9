"""Two-phase retrieval: hybrid recall (vector + BM25, fused), then a precision rerank.

The default is built to be robust rather than tuned to one corpus: relative score fusion keeps
each ranker's confidence (fusion.py), a query that looks like code leans on BM25
(query_shape.py), and the reranker's scores are blended with the fused ones instead of
replacing them (fusion.blend_rerank). On bench/retrieval.py the result is at least as good as
the best single stage on every corpus and query kind (README, "Retrieval benchmark").

Every result says which stages ran and what each one scored, so a user can see why a chunk
came first and whether reranking happened at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from brainforge.config import RetrievalConfig
from brainforge.errors import StoreError
from brainforge.memory.fusion import blend_rerank, linear_fusion, reciprocal_rank_fusion, relative_score_fusion
from brainforge.memory.query_shape import fusion_weights
from brainforge.memory.rerank import Reranker, build_reranker
from brainforge.memory.store import MemoryStore, StoredChunk


@dataclass
class Hit:
    chunk: StoredChunk
    score: float  # the final stage's score
    ranks: dict[str, int] = field(default_factory=dict)  # stage -> 1-based rank (absent: not in that list)
    scores: dict[str, float] = field(default_factory=dict)  # stage -> score


@dataclass
class SearchResult:
    query: str
    hits: list[Hit]
    stages: list[str]  # e.g. ["vector", "bm25", "rrf", "rerank:passages"]
    milliseconds: dict[str, float]
    candidates: int  # how many chunks phase 1 handed to phase 2
    weights: dict[str, float] = field(default_factory=dict)  # the fusion weights this query used
    signals: list[str] = field(default_factory=list)  # why they differ from the config's (query_shape.py)


class HybridRetriever:
    def __init__(self, store: MemoryStore, config: RetrievalConfig | None = None,
                 reranker: Reranker | None = None) -> None:
        self.store = store
        self.config = config or store.config.retrieval
        self.reranker = reranker or build_reranker(self.config.reranker, store.embedder, store)

    def search(self, query: str, top_k: int | None = None, rerank: bool = True) -> SearchResult:
        if not query.strip():
            raise StoreError("the query is empty")
        self.store.refresh()
        if len(self.store) == 0:
            raise StoreError(f"the memory store at {self.store.root} is empty; add documents with `brainforge ingest PATH...`")
        top_k = top_k or self.config.top_k
        timings: dict[str, float] = {}
        lists: dict[str, list[tuple[str, float]]] = {}
        weights, signals = fusion_weights(query, dict(self.config.weights), self.config.lexical_boost)
        if weights.get("vector", 0) > 0:
            started = time.perf_counter()
            query_vector = self.store.embedder.embed_query(query)
            lists["vector"] = self.store.vector_search(query_vector, self.config.vector_k)
            timings["vector"] = _ms(started)
        if weights.get("bm25", 0) > 0:
            started = time.perf_counter()
            lists["bm25"] = self.store.bm25_search(query, self.config.bm25_k)
            timings["bm25"] = _ms(started)
        started = time.perf_counter()
        if self.config.fusion == "relative":
            fused = relative_score_fusion(lists, weights=weights)
        elif self.config.fusion == "rrf":
            fused = reciprocal_rank_fusion(lists, k=self.config.rrf_k, weights=weights)
        else:
            fused = linear_fusion(lists, weights=weights)
        timings[self.config.fusion] = _ms(started)
        candidates = fused[:self.config.recall_n]
        positions = {stage: {cid: (rank, score) for rank, (cid, score) in enumerate(ranked, start=1)}
                     for stage, ranked in lists.items()}
        hits = []
        for rank, (cid, score) in enumerate(candidates, start=1):
            hit = Hit(self.store.chunk(cid), score)
            for stage, found in positions.items():
                if cid in found:
                    hit.ranks[stage], hit.scores[stage] = found[cid]
            hit.ranks[self.config.fusion], hit.scores[self.config.fusion] = rank, score
            hits.append(hit)
        stages = list(lists) + [self.config.fusion]
        if rerank and hits and self.reranker.name == "none":
            stages.append("rerank:none")  # configured off: the fused order is the answer
        elif rerank and hits:
            started = time.perf_counter()
            scores = self.reranker.scores(query, [h.chunk.text for h in hits], [h.chunk.id for h in hits])
            stage = f"rerank:{self.reranker.name}"
            final = blend_rerank([h.score for h in hits], scores, self.config.rerank_weight)
            for hit, score, blended in zip(hits, scores, final):
                hit.scores[stage] = score
                hit.score = blended
            hits.sort(key=lambda h: (-h.score, h.ranks[self.config.fusion]))
            for rank, hit in enumerate(hits, start=1):
                hit.ranks[stage] = rank
            timings[stage] = _ms(started)
            stages.append(stage)
        return SearchResult(query, hits[:top_k], stages, timings, len(candidates), weights, signals)


    def search_many(self, queries: list[str], top_k: int | None = None, rerank: bool = True) -> list[SearchResult]:
        """One result per query; the query vectors are computed in one batched call."""
        if self.config.weights.get("vector", 0) > 0:
            self.store.embedder.remember_queries([q for q in queries if q.strip()])
        return [self.search(query, top_k, rerank) for query in queries]


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
