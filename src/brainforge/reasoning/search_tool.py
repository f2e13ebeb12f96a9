"""The search engine a Search-R1 policy calls: the memory's hybrid retriever over a store
built by `brainforge ingest`, opened read-only and checked before any model loads."""

from __future__ import annotations

from pathlib import Path

from brainforge.config import MemoryConfig, SearchSettings
from brainforge.errors import StoreError


def require_search_store(memory: MemoryConfig, config_path: str | Path | None = None) -> int:
    """The number of chunks in the store; a missing or empty store is an error that names
    the command that builds it (called before the model loads: seconds, not minutes)."""
    from brainforge.memory.store import MemoryStore

    store = MemoryStore(memory)
    build = f"brainforge ingest DOCS... --config {config_path}" if config_path else f"brainforge ingest DOCS... --store {store.root}"
    if not store.exists():
        raise StoreError(f"search_r1 searches the memory store, and there is none at {store.root}; build it first: {build}")
    store.require_existing()
    store.refresh()
    if len(store) == 0:
        raise StoreError(f"search_r1 searches the memory store, and the one at {store.root} is empty; add documents: {build}")
    return len(store)


class MemorySearch:
    """`queries -> top-k texts per query`, the rollout's SearchFunction."""

    def __init__(self, memory: MemoryConfig, settings: SearchSettings):
        from brainforge.memory.retrieval import HybridRetriever
        from brainforge.memory.store import MemoryStore

        store = MemoryStore(memory)
        store.require_existing()
        self.retriever = HybridRetriever(store, memory.retrieval)
        self.top_k = settings.top_k
        self.rerank = settings.rerank

    def __call__(self, queries: list[str]) -> list[list[str]]:
        results = self.retriever.search_many(queries, self.top_k, rerank=self.rerank)
        return [[_passage(hit.chunk.text, hit.chunk.path) for hit in result.hits] for result in results]


def _passage(text: str, path: str) -> str:
    """A chunk as the policy reads it: its file name, then its text without the chunk's
    header line (the store prefixes chunks with their location)."""
    header, _, body = text.partition("\n")
    return f"({Path(path).name}) {' '.join((body or header).split())}"
