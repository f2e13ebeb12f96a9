"""Passage vectors pooled from the chunk's own forward pass (late chunking).

They replaced embedding every 8-line passage as its own text, which doubled ingest time; the
`passages` reranker depends on them, so what they must keep doing is checked here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainforge.memory.store import embed_chunks, passage_spans, split_passages


@pytest.fixture(scope="module")
def embedder():
    from brainforge.memory.embedder import Embedder

    return Embedder()


TOPICS = [
    "potassium and sodium are alkali metals that react violently with water",
    "rename the temporary checkpoint folder atomically after the training crash",
    "the tokenizer splits camel case identifiers into lower case words",
]


def three_topic_chunk() -> str:
    # short enough (about 150 word pieces) that all three passages are inside the model's window
    lines = [f"    # {TOPICS[t]}" if i == 0 else "    pass" for t in range(3) for i in range(8)]
    return "# Function: mixed\n" + "\n".join(lines)


@pytest.mark.parametrize("body_lines", [0, 1, 8, 9, 17, 24])
def test_spans_cover_exactly_the_passages_split_passages_cuts(body_lines):
    text = "# Function: f\n" + "\n".join(f"x{i} = {i}" for i in range(body_lines))
    spans, passages = passage_spans(text), split_passages(text)
    assert len(spans) == len(passages)
    for ranges, passage in zip(spans, passages):
        pieces = [text[low:high] for low, high in ranges]
        if len(passages) == 1:
            assert pieces == [text]
        else:  # header range, then the passage's lines (with their line ends)
            assert pieces[0] + "\n" + pieces[1].rstrip("\n") == passage


def test_chunk_vector_is_the_sentence_transformers_vector(embedder):
    texts = [three_topic_chunk(), "# Section: short\nOne short line.", "x" * 40]
    vectors, _ = embedder.embed_with_spans(texts, [passage_spans(t) for t in texts])
    reference = embedder.embed_documents(texts)
    assert np.allclose(vectors, reference, atol=1e-4)


def test_each_passage_vector_points_at_its_own_lines(embedder):
    text = three_topic_chunk()
    vectors, passages = embed_chunks(embedder, [text])
    rows = passages[0]
    assert rows.shape == (3, embedder.dimension)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-4)
    for topic, question in enumerate(["which metals react with water",
                                      "move the checkpoint directory after a crash",
                                      "split camelCase names into words"]):
        scores = rows @ embedder.embed_query(question)
        assert int(np.argmax(scores)) == topic, (question, scores)
    # the chunk's single vector blurs the three topics: each passage matches its own topic better
    assert all(rows[t] @ embedder.embed_query(TOPICS[t]) > vectors[0] @ embedder.embed_query(TOPICS[t]) for t in range(3))


def test_a_short_chunk_reuses_its_own_vector_and_truncated_passages_fall_back(embedder):
    short = "# Section: note\nJust one line."
    vectors, passages = embed_chunks(embedder, [short])
    assert np.array_equal(passages[0], vectors[0:1])
    # a text far past the model's window: passages after the cut have no tokens and get the chunk vector
    long = "# Function: long\n" + "\n".join(f"    value_{i} = compute_something_long({i}, {i * 7})" for i in range(200))
    vectors, passages = embed_chunks(embedder, [long])
    assert passages[0].shape[0] == 25
    assert np.allclose(passages[0][-1], vectors[0], atol=1e-6)
    assert not np.allclose(passages[0][0], vectors[0], atol=1e-3)


def test_mismatched_span_lists_are_refused(embedder):
    with pytest.raises(ValueError, match="2 texts but 1 span lists"):
        embedder.embed_with_spans(["a", "b"], [[((0, 1),)]])


def test_query_vectors_equal_sentence_transformers_encode(embedder):
    queries = ["load base model", "How do I rename the checkpoint folder after a crash?", "x"]
    reference = embedder.model.encode(queries, normalize_embeddings=True, convert_to_numpy=True)
    # fp32: equal to rounding; bf16 (what `dtype: auto` picks with AMX): equal to bf16's precision
    assert np.allclose(embedder.embed_queries(queries), reference, atol=1e-5 if embedder.dtype == torch.float32 else 2e-2)
    assert embedder.embed_queries([]).shape == (0, embedder.dimension)
