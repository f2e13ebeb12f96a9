"""Fusing ranked lists: Reciprocal Rank Fusion (Cormack, Clarke & Buttcher 2009) and a linear
score blend for comparison.

RRF uses ranks only, so a cosine similarity and a BM25 score never need calibrating against
each other. Ranks are 1-based; a document missing from a list gets nothing from it; ties are
broken by the best single rank, then by id, so the order never depends on dict ordering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Ranked = Sequence[tuple[str, float]]  # (doc id, score), best first


def reciprocal_rank_fusion(lists: Mapping[str, Ranked], k: int = 60,
                           weights: Mapping[str, float] | None = None) -> list[tuple[str, float]]:
    """`RRF(d) = sum_r w_r / (k + rank_r(d))` over rankers r; returns (id, score) best first."""
    if k <= 0:
        raise ValueError(f"RRF k must be positive, got {k}")
    scores: dict[str, float] = {}
    best_rank: dict[str, int] = {}
    for ranker, ranked in lists.items():
        weight = 1.0 if weights is None else weights.get(ranker, 1.0)
        if weight == 0:
            continue
        for rank, (doc_id, _score) in enumerate(ranked, start=1):
            scores[doc_id] = scores.get(doc_id, 0.0) + weight / (k + rank)
            best_rank[doc_id] = min(best_rank.get(doc_id, rank), rank)
    return sorted(scores.items(), key=lambda item: (-item[1], best_rank[item[0]], item[0]))


def linear_fusion(lists: Mapping[str, Ranked], weights: Mapping[str, float] | None = None) -> list[tuple[str, float]]:
    """Weighted sum of per-list min-max normalised scores (absent = 0); ties as in RRF."""
    scores: dict[str, float] = {}
    best_rank: dict[str, int] = {}
    for ranker, ranked in lists.items():
        weight = 1.0 if weights is None else weights.get(ranker, 1.0)
        if weight == 0 or not ranked:
            continue
        values = [score for _, score in ranked]
        low, high = min(values), max(values)
        for rank, (doc_id, score) in enumerate(ranked, start=1):
            normalised = (score - low) / (high - low) if high > low else 1.0
            scores[doc_id] = scores.get(doc_id, 0.0) + weight * normalised
            best_rank[doc_id] = min(best_rank.get(doc_id, rank), rank)
    return sorted(scores.items(), key=lambda item: (-item[1], best_rank[item[0]], item[0]))
