"""Phase 2 of retrieval: re-score the recalled candidates with something more precise.

Three kinds, chosen by `memory.retrieval.reranker`:

- a sentence-transformers `CrossEncoder` (a folder or hub id): reads query and chunk together;
  the most precise, but no cross-encoder ships in any package this project can install
  offline, so it is opt-in.
- `passages`: the bi-encoder again, on the chunk cut into short overlapping passages; the
  chunk's score is its best passage. A long chunk's single vector blurs everything it contains;
  a question usually matches a few lines. No extra model.
- `none`: keep the fused order. Reported as such, never silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from brainforge.errors import MissingDependencyError, StoreError
from brainforge.memory.embedder import Embedder, torch_threads


class Reranker(Protocol):
    name: str

    def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        """One relevance score per text; higher is better."""
        ...


class KeepOrder:
    """The `none` reranker: scores that preserve the incoming order."""

    name = "none"

    def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        return [float(len(texts) - i) for i in range(len(texts))]


class PassageReranker:
    """Best cosine between the query and any passage of the chunk (header kept on each)."""

    name = "passages"

    def __init__(self, embedder: Embedder, passage_lines: int = 6, stride: int = 3) -> None:
        self.embedder = embedder
        self.passage_lines = passage_lines
        self.stride = stride

    def passages(self, text: str) -> list[str]:
        header, _, body = text.partition("\n")
        lines = body.splitlines()
        if len(lines) <= self.passage_lines:
            return [text]
        starts = range(0, max(len(lines) - self.passage_lines, 0) + self.stride, self.stride)
        return [header + "\n" + "\n".join(lines[s:s + self.passage_lines]) for s in starts if s < len(lines)]

    def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        owners: list[int] = []
        passages: list[str] = []
        for index, text in enumerate(texts):
            for passage in self.passages(text):
                owners.append(index)
                passages.append(passage)
        query_vector = self.embedder.embed_queries([query])[0]
        with torch_threads(self.embedder.config.query_threads):
            vectors = self.embedder.model.encode(passages, batch_size=64, normalize_embeddings=True,
                                                 convert_to_numpy=True, show_progress_bar=False)
        similarity = np.asarray(vectors, dtype=np.float32) @ query_vector
        best = np.full(len(texts), -np.inf, dtype=np.float32)
        np.maximum.at(best, np.asarray(owners), similarity)
        return [float(s) for s in best]


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

    def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        with torch_threads(self.threads):
            return [float(s) for s in self.model.predict([(query, t) for t in texts], show_progress_bar=False)]


def build_reranker(spec: str, embedder: Embedder) -> Reranker:
    if spec == "none":
        return KeepOrder()
    if spec == "passages":
        return PassageReranker(embedder)
    return CrossEncoderReranker(spec, threads=embedder.config.query_threads)
