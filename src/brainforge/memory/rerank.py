"""Phase 2 of retrieval: re-score the recalled candidates with something more precise.

Three kinds, chosen by `memory.retrieval.reranker`:

- a sentence-transformers `CrossEncoder` (a folder or hub id): reads query and chunk together;
  the most precise, but no cross-encoder ships in any package this project can install
  offline, so it is opt-in.
- `passages`: the bi-encoder's vectors of the chunk's 8-line passages (computed at ingest);
  the chunk's score is its best passage. A long chunk's single vector blurs everything it
  contains; a question usually matches a few lines. No extra model, about a millisecond.
- `none`: keep the fused order. Reported as such, never silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from brainforge.errors import MissingDependencyError, StoreError
from brainforge.memory.embedder import Embedder, torch_threads
from brainforge.memory.store import embed_chunks

if TYPE_CHECKING:
    from brainforge.memory.store import MemoryStore


class Reranker(Protocol):
    name: str

    def scores(self, query: str, texts: Sequence[str], ids: Sequence[str] | None = None) -> list[float]:
        """One relevance score per text (chunk `ids` when known); higher is better."""
        ...


class KeepOrder:
    """The `none` reranker: scores that preserve the incoming order."""

    name = "none"

    def scores(self, query: str, texts: Sequence[str], ids: Sequence[str] | None = None) -> list[float]:
        return [float(len(texts) - i) for i in range(len(texts))]


class PassageReranker:
    """Best cosine between the query and any passage of the chunk.

    The passage vectors were computed at ingest (pooled from the chunk's own forward pass, see `passage_spans` in store.py), so this
    costs one dot product per passage; chunks not in the store are embedded on the spot.
    """

    name = "passages"

    def __init__(self, embedder: Embedder, store: "MemoryStore | None" = None) -> None:
        self.embedder = embedder
        self.store = store

    def scores(self, query: str, texts: Sequence[str], ids: Sequence[str] | None = None) -> list[float]:
        if not texts:
            return []
        # the store's embedder, read per query: a `memory tune` in another process may have swapped it
        embedder = self.store.embedder if self.store is not None else self.embedder
        query_vector = embedder.embed_query(query)
        best = []
        for index, text in enumerate(texts):
            if self.store is not None and ids is not None:
                vectors = np.asarray(self.store.passage_vectors(ids[index]), dtype=np.float32)
            else:
                vectors = embed_chunks(embedder, [text])[1][0]
            best.append(float(np.max(vectors @ query_vector)))
        return best


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder scoring (query, chunk) pairs."""

    def __init__(self, name_or_path: str, threads: int = 1) -> None:
        try:
            from sentence_transformers import CrossEncoder
        except ImportError:
            raise MissingDependencyError("sentence-transformers", "memory", "Cross-encoder reranking") from None
        try:
            self.model = CrossEncoder(name_or_path, device="cpu")
        except (OSError, ValueError) as exc:
            raise StoreError(f"memory.retrieval.reranker: cannot load cross-encoder {name_or_path!r}: {exc}") from None
        self.name = f"cross-encoder:{name_or_path}"
        self.threads = threads

    def scores(self, query: str, texts: Sequence[str], ids: Sequence[str] | None = None) -> list[float]:
        if not texts:
            return []
        with torch_threads(self.threads):
            return [float(s) for s in self.model.predict([(query, t) for t in texts], show_progress_bar=False)]


def build_reranker(spec: str, embedder: Embedder, store: "MemoryStore | None" = None) -> Reranker:
    if spec == "none":
        return KeepOrder()
    if spec == "passages":
        return PassageReranker(embedder, store)
    return CrossEncoderReranker(spec, threads=embedder.config.query_threads)
