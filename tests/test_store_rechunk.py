"""A new chunker re-chunks an existing store once, and re-embeds only the chunks that changed."""

from __future__ import annotations

import json

import pytest

from brainforge.config import MemoryConfig


@pytest.fixture(scope="module")
def embedder():
    from brainforge.memory.embedder import Embedder

    return Embedder()


RST = """Guide
=====

Intro text about the guide.

Install
-------

Run make install to create the virtual environment.
"""


def test_a_chunker_version_change_rechunks_once_and_keeps_unchanged_vectors(tmp_path, embedder, monkeypatch):
    from brainforge.memory import store as store_module
    from brainforge.memory.store import MemoryStore

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.rst").write_text(RST)
    (tmp_path / "docs" / "notes.md").write_text("# Notes\n\nBananas are yellow.\n")
    store = MemoryStore(MemoryConfig(store=str(tmp_path / "store"), chunking={"min_tokens": 2}), embedder)  # no merging
    first = store.ingest([tmp_path / "docs"])
    assert first.chunks_added >= 3
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["chunking"]["chunker"] == store_module.CHUNKER_VERSION
    unchanged = store.ingest([tmp_path / "docs"])
    assert unchanged.files_unchanged == 2 and unchanged.chunks_added == 0
    # a newer chunker: every file is read and chunked again, but identical chunks are not embedded again
    monkeypatch.setattr(store_module, "CHUNKER_VERSION", store_module.CHUNKER_VERSION + 1)
    again = store.ingest([tmp_path / "docs"])
    assert again.files_ingested == 2 and again.files_unchanged == 0
    assert again.chunks_added == 0 and again.chunks_total == first.chunks_total
    # the reST file is cut at its headings: the Install section is its own chunk
    store.refresh()
    names = {store.chunk(cid).name for entry in store.files().values() for cid in entry["chunk_ids"]}
    assert "Guide > Install" in names
