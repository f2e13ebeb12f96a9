"""Fusing ranked lists: relative score fusion (the default), Reciprocal Rank Fusion (Cormack,
Clarke & Buttcher 2009) and a min-max linear blend.

Why scores and not ranks by default: RRF gives rank 1 of a list the same credit whether it
won by a mile (a docstring copied almost word for word scores BM25 30 against a runner-up's 12)
or by a hair (top cosines 0.61, 0.60, 0.60). Measured on bench/retrieval.py, that cost RRF
0.055 MRR@10 against BM25 alone on docstring queries over code: the strong lexical signal was
diluted by a weaker dense one. Dividing each list's scores by its own best score keeps each
ranker's confidence (how far the winner stands out) and needs no calibration between a cosine
and a BM25 score: each list's best is 1.

Ties are broken by the best single rank, then by id, so the order never depends on dict ordering.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

Ranked = Sequence[tuple[str, float]]  # (doc id, score), best first


def relative_scores(ranked: Ranked) -> dict[str, float]:
    """Each score divided by the list's best (`score / max`): the best is 1, the rest keep their
    distance from it. A list whose best score is not positive carries no confidence: all 0."""
    if not ranked:
        return {}
    best = max(score for _, score in ranked)
    return {doc_id: (score / best if best > 0 else 0.0) for doc_id, score in ranked}


def min_max_scores(ranked: Ranked) -> dict[str, float]:
    """Each score mapped to [0, 1] between the list's worst and best (all 1 when they are equal)."""
    if not ranked:
        return {}
    low, high = min(score for _, score in ranked), max(score for _, score in ranked)
    return {doc_id: ((score - low) / (high - low) if high > low else 1.0) for doc_id, score in ranked}


def relative_score_fusion(lists: Mapping[str, Ranked],
                          weights: Mapping[str, float] | None = None) -> list[tuple[str, float]]:
    """`score(d) = sum_r w_r * s_r(d) / max(s_r)`; a document missing from list r gets that list's
    lowest relative score (it ranked below everything listed, so at most that).

    Why the lowest and not 0: the lists are truncated (50 deep); a chunk just past BM25's cut
    is not evidence of irrelevance, and giving it 0 would let one list veto the other."""
    return _weighted_score_sum(lists, weights, relative_scores, absent_gets_floor=True)


def linear_fusion(lists: Mapping[str, Ranked], weights: Mapping[str, float] | None = None) -> list[tuple[str, float]]:
    """Weighted sum of per-list min-max normalised scores (absent = 0); ties as in RRF."""
    return _weighted_score_sum(lists, weights, min_max_scores, absent_gets_floor=False)


def _weighted_score_sum(lists: Mapping[str, Ranked], weights: Mapping[str, float] | None,
                        normalise: Callable[[Ranked], dict[str, float]], absent_gets_floor: bool) -> list[tuple[str, float]]:
    normalised: dict[str, dict[str, float]] = {}
    best_rank: dict[str, int] = {}
    for ranker, ranked in lists.items():
        if _weight(weights, ranker) == 0 or not ranked:
            continue
        normalised[ranker] = normalise(ranked)
        for rank, (doc_id, _score) in enumerate(ranked, start=1):
            best_rank[doc_id] = min(best_rank.get(doc_id, rank), rank)
    absent = {ranker: min(found.values()) if absent_gets_floor else 0.0 for ranker, found in normalised.items()}
    scores = {doc_id: sum(_weight(weights, ranker) * found.get(doc_id, absent[ranker]) for ranker, found in normalised.items())
              for doc_id in best_rank}
    return sorted(scores.items(), key=lambda item: (-item[1], best_rank[item[0]], item[0]))


def _weight(weights: Mapping[str, float] | None, ranker: str) -> float:
    return 1.0 if weights is None else weights.get(ranker, 1.0)


def reciprocal_rank_fusion(lists: Mapping[str, Ranked], k: int = 60,
                           weights: Mapping[str, float] | None = None) -> list[tuple[str, float]]:
    """`RRF(d) = sum_r w_r / (k + rank_r(d))` over rankers r; returns (id, score) best first."""
    if k <= 0:
        raise ValueError(f"RRF k must be positive, got {k}")
    scores: dict[str, float] = {}
    best_rank: dict[str, int] = {}
    for ranker, ranked in lists.items():
        weight = _weight(weights, ranker)
        if weight == 0:
            continue
        for rank, (doc_id, _score) in enumerate(ranked, start=1):
            scores[doc_id] = scores.get(doc_id, 0.0) + weight / (k + rank)
            best_rank[doc_id] = min(best_rank.get(doc_id, rank), rank)
    return sorted(scores.items(), key=lambda item: (-item[1], best_rank[item[0]], item[0]))


def blend_rerank(fused: Sequence[float], rerank: Sequence[float], weight: float) -> list[float]:
    """Final candidate scores: `fused / max(fused) + weight * (r - min r) / (max r - min r)`.

    Why blend instead of replacing: a reranker that re-reads the candidates sees each alone and
    forgets how the first stage found them; where a corpus's words are strong evidence (code
    with its docstrings), replacing the fused order by a passage cosine cost 0.07 MRR@10 on
    bench/retrieval.py. Min-max on the reranker's scores makes any scale (cosines, cross-encoder
    logits) span [0, 1] over the candidates; `weight` is how much of one fused point the
    reranker's whole range is worth (0: order untouched; large: the reranker decides)."""
    if len(fused) != len(rerank):
        raise ValueError(f"{len(fused)} fused scores but {len(rerank)} rerank scores")
    if not fused:
        return []
    top = max(fused)
    low, high = min(rerank), max(rerank)
    return [(f / top if top > 0 else 0.0) + weight * ((r - low) / (high - low) if high > low else 0.0)
            for f, r in zip(fused, rerank)]
