"""Relative score fusion, the rerank blend and the code-looking-query rule: worked examples.

Each example is small enough to check by hand, and chosen so that the property it shows would
fail under the obvious alternative (RRF's ranks only, a reranker that replaces the order, a
rule that fires on plain English).
"""

from __future__ import annotations

import pytest

from brainforge.memory.fusion import blend_rerank, reciprocal_rank_fusion, relative_score_fusion, relative_scores
from brainforge.memory.query_shape import fusion_weights, lexical_signals


def test_relative_scores_divide_by_the_best():
    assert relative_scores([("A", 0.8), ("B", 0.6), ("C", 0.4)]) == pytest.approx({"A": 1.0, "B": 0.75, "C": 0.5})
    assert relative_scores([("A", 0.0), ("B", -1.0)]) == {"A": 0.0, "B": 0.0}  # no positive best: no confidence
    assert relative_scores([]) == {}


def test_relative_fusion_worked_example_absent_documents_get_the_lists_floor():
    lists = {"vector": [("A", 0.8), ("B", 0.6), ("C", 0.4)], "bm25": [("C", 20.0), ("D", 10.0)]}
    fused = relative_score_fusion(lists)
    # A = 1.0 + 0.5 (not in bm25: its floor), C = 0.5 + 1.0, B = 0.75 + 0.5, D = 0.5 (vector floor) + 0.5
    assert [doc for doc, _ in fused] == ["A", "C", "B", "D"]  # A/C tie at 1.5: best rank 1 each, then id
    assert dict(fused) == pytest.approx({"A": 1.5, "C": 1.5, "B": 1.25, "D": 1.0})
    weighted = relative_score_fusion(lists, weights={"vector": 1.0, "bm25": 2.0})
    # C = 0.5 + 2 x 1.0, A = 1.0 + 2 x 0.5, B = 0.75 + 2 x 0.5, D = 0.5 + 2 x 0.5
    assert [doc for doc, _ in weighted] == ["C", "A", "B", "D"]
    assert dict(weighted) == pytest.approx({"C": 2.5, "A": 2.0, "B": 1.75, "D": 1.5})


def test_a_winner_by_a_mile_beats_a_near_tie_where_rrf_cannot_tell():
    # vector barely prefers X; BM25 prefers Y by a factor of 2.5 (a copied sentence, say)
    lists = {"vector": [("X", 0.61), ("Y", 0.60)], "bm25": [("Y", 30.0), ("X", 12.0)]}
    assert relative_score_fusion(lists)[0][0] == "Y"
    rrf = reciprocal_rank_fusion(lists)
    assert rrf[0][1] == pytest.approx(rrf[1][1])  # ranks only: a dead heat, decided by id
    # and the other way round: a confident vector winner against a BM25 near-tie
    flipped = {"vector": [("X", 0.9), ("Y", 0.3)], "bm25": [("Y", 10.0), ("X", 9.9)]}
    assert relative_score_fusion(flipped)[0][0] == "X"


def test_relative_fusion_zero_weight_drops_a_list_and_empty_lists_are_fine():
    lists = {"vector": [("A", 0.9)], "bm25": [("B", 5.0)]}
    assert relative_score_fusion(lists, weights={"vector": 0.0, "bm25": 1.0}) == [("B", 1.0)]
    assert relative_score_fusion({"vector": [], "bm25": [("B", 5.0)]}) == [("B", 1.0)]
    assert relative_score_fusion({}) == []


def test_blend_rerank_worked_example():
    fused, rerank = [2.0, 1.5, 1.0], [0.3, 0.9, 0.6]
    # fused / best = 1, 0.75, 0.5; rerank min-max = 0, 1, 0.5
    assert blend_rerank(fused, rerank, 0.2) == pytest.approx([1.0, 0.95, 0.6])  # the fused winner keeps its place
    assert blend_rerank(fused, rerank, 1.0) == pytest.approx([1.0, 1.75, 1.0])  # a heavy reranker moves B up
    assert blend_rerank(fused, rerank, 0.0) == pytest.approx([1.0, 0.75, 0.5])
    # any scale: cross-encoder logits (negative) give the same blend as their shifted copy
    assert blend_rerank(fused, [-7.0, -1.0, -4.0], 0.2) == pytest.approx(blend_rerank(fused, [0.0, 6.0, 3.0], 0.2))
    assert blend_rerank(fused, [0.5, 0.5, 0.5], 3.0) == pytest.approx([1.0, 0.75, 0.5])  # no spread: no opinion
    assert blend_rerank([], [], 0.2) == []
    with pytest.raises(ValueError, match="3 fused scores but 2 rerank scores"):
        blend_rerank(fused, rerank[:2], 0.2)


@pytest.mark.parametrize("query, kind", [
    ("load_base_model", "snake_case"),
    ("where is MAX_TOKENS set", "snake_case"),
    ("_first_sentence", "snake_case"),
    ("loadBaseModel", "camelCase"),
    ("what does HybridRetriever do", "camelCase"),
    ("torch.nn.Linear", "dotted"),
    ("config.yaml", "dotted"),
    ("call search() twice", "call"),
    ("Vec::new", "scope"),
    ("ptr->next", "scope"),
    ('"connection refused"', "quoted"),
    ("the 'rich' package", "quoted"),
    ("`top_k`", "quoted"),
])
def test_code_looking_queries_lean_lexical(query, kind):
    signals = lexical_signals(query)
    assert any(signal.startswith(kind) for signal in signals), signals
    weights, reasons = fusion_weights(query, {"vector": 1.0, "bm25": 1.0}, lexical_boost=2.0)
    assert weights == {"vector": 1.0, "bm25": 2.0} and reasons == signals


@pytest.mark.parametrize("query", [
    "load base model",
    "How do I load the base model?",
    "Get the thread local theme stack.",
    "Return the value. Then stop.",
    "e.g. this one",
    "it's the user's file",
    "a -> b",
    "GPU memory",
    "rich",
])
def test_plain_language_keeps_the_configured_weights(query):
    assert lexical_signals(query) == []
    assert fusion_weights(query, {"vector": 1.0, "bm25": 1.0}, lexical_boost=2.0) == ({"vector": 1.0, "bm25": 1.0}, [])


def test_the_rule_is_off_at_boost_one_or_without_bm25():
    assert fusion_weights("load_base_model", {"vector": 1.0, "bm25": 1.0}, 1.0) == ({"vector": 1.0, "bm25": 1.0}, [])
    assert fusion_weights("load_base_model", {"vector": 1.0, "bm25": 0.0}, 2.0) == ({"vector": 1.0, "bm25": 0.0}, [])
