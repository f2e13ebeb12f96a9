"""The ONNX query encoder: same vectors as PyTorch, exported once per set of weights, and never
trusted blindly (a damaged cache is re-exported, a disagreeing graph is dropped)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from brainforge.config import EmbedderConfig

QUERIES = ["load base model", "How do I rename the checkpoint folder after a crash?", "x",
           "def f(x):\n    return x  # " + "many words " * 200]  # past the 256-token window: truncated alike


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINFORGE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "query-encoders"


def make_embedder(**config):
    """The ONNX query path serves fp32 embedders only, so fp32 even where `dtype: auto` picks
    bf16 (CPUs with AMX / AVX512-bf16)."""
    from brainforge.memory.embedder import Embedder

    return Embedder(EmbedderConfig(**{"dtype": "float32", **config}))


def test_onnx_query_vectors_equal_pytorch_and_the_model_stays_in_eval_mode(cache):
    embedder = make_embedder()
    vectors = embedder.embed_queries(QUERIES)
    assert embedder._query_encoder is not None and embedder._query_encoder.exported
    assert len(list(cache.glob("*.onnx"))) == 1
    reference = embedder.model.encode(QUERIES, normalize_embeddings=True, convert_to_numpy=True)
    assert np.allclose(vectors, reference, atol=1e-5)
    # the export must not leave dropout on: PyTorch gives the same vectors twice
    assert not embedder.model.training and not any(m.training for m in embedder.model.modules())
    assert np.array_equal(embedder._embed_queries_torch(QUERIES), embedder._embed_queries_torch(QUERIES))


def test_a_second_process_reuses_the_cached_graph(cache, monkeypatch):
    first = make_embedder()
    first.embed_queries(["warm"])
    from brainforge.memory import query_encoder

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(query_encoder, "_export", no_export)
    second = make_embedder()
    assert np.allclose(second.embed_queries(QUERIES), first.embed_queries(QUERIES), atol=1e-6)
    assert second._query_encoder is not None and not second._query_encoder.exported


def test_a_damaged_cache_file_is_exported_again(cache):
    make_embedder().embed_queries(["warm"])
    (path,) = cache.glob("*.onnx")
    path.write_bytes(b"not an onnx graph")
    embedder = make_embedder()
    vectors = embedder.embed_queries(QUERIES)
    assert embedder._query_encoder is not None and path.stat().st_size > 1_000_000
    assert np.allclose(vectors, embedder._embed_queries_torch(QUERIES), atol=1e-5)


def test_a_graph_that_disagrees_is_deleted_and_pytorch_answers(cache, monkeypatch, caplog):
    from brainforge.memory.query_encoder import OnnxQueryEncoder

    monkeypatch.setattr(OnnxQueryEncoder, "agrees_with", lambda self, reference: 0.5)
    embedder = make_embedder()
    with caplog.at_level(logging.WARNING):
        vectors = embedder.embed_queries(QUERIES)
    assert "disagrees with PyTorch" in caplog.text
    assert embedder._query_encoder is None and list(cache.glob("*.onnx")) == []
    assert np.array_equal(vectors, embedder._embed_queries_torch(QUERIES))


def test_torch_backend_builds_no_graph(cache):
    embedder = make_embedder(query_backend="torch")
    embedder.embed_queries(QUERIES)
    assert embedder._query_encoder is None and not cache.exists()


def test_the_cache_key_follows_the_weights():
    from brainforge.memory.query_encoder import weights_key

    layer = torch.nn.Linear(3, 2)
    before = weights_key(layer)
    assert weights_key(layer) == before
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3  # a tuned embedder differs by small steps
    assert weights_key(layer) != before
