"""`brainforge ingest`, `search`, `ask` and `sop` from the command line, on the offline
defaults; `ask` runs the real default model end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_memory import write_corpus


def brainforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brainforge", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_ingest_search_ask_end_to_end_with_default_model(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    ingest = brainforge("ingest", str(corpus), cwd=tmp_path)
    assert ingest.returncode == 0, ingest.stderr
    assert "files: 3 found, 3 ingested" in ingest.stdout and (tmp_path / ".brainforge/memory/manifest.json").exists()
    again = brainforge("ingest", str(corpus), cwd=tmp_path)
    assert "3 unchanged" in again.stdout and "0 added" in again.stdout

    found = brainforge("search", "how do I merge ranked lists", "-k", "2", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert "stages: vector -> bm25 -> relative -> rerank:passages" in found.stdout
    assert "[1] corpus/src/fusion.py:1-" in found.stdout and "vector #" in found.stdout and "bm25 #" in found.stdout

    asked = brainforge("ask", "Why does save_checkpoint_atomically crash with a traceback?", "--max-new-tokens", "48",
                       "--show-prompt", cwd=tmp_path)
    assert asked.returncode == 0, asked.stderr
    out = asked.stdout
    assert "Context:\n[1] corpus/src/checkpoint.py:" in out
    assert "needs knowledge: yes" in out and "needs procedure: yes" in out
    assert "sources:\n  [1] corpus/src/checkpoint.py:" in out
    assert "SOP: debugging-code" in out
    answer = out.split("---------------------\n", 1)[1].split("\nrouting:", 1)[0]
    assert len(answer.strip()) > 10  # the real model wrote something


def test_cli_errors_and_sop_commands(tmp_path):
    missing = brainforge("search", "anything", "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert missing.returncode == 2 and f"no memory store at {tmp_path / 'store'}" in missing.stderr
    assert "`brainforge ingest PATH... --store" in missing.stderr and not (tmp_path / "store").exists()
    (tmp_path / "store").mkdir()
    empty = brainforge("search", "anything", "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert empty.returncode == 2 and "is empty; add documents with `brainforge ingest" in empty.stderr
    listed = brainforge("sop", "list", cwd=tmp_path)
    assert listed.returncode == 0 and "debugging-code" in listed.stdout and "custom-agent-workflow" in listed.stdout
    added = brainforge("sop", "add", "--name", "release-checklist", "--description", "Ship a release",
                       "--step", "Run the tests", "--step", "Tag the version", "--keyword", "release", "--dir", "sops", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    valid = brainforge("sop", "validate", "sops", cwd=tmp_path)
    assert valid.returncode == 0 and "ok: release-checklist (2 steps)" in valid.stdout
    (tmp_path / "sops" / "broken.yaml").write_text("name: broken\ndescription: d\nsteps: []\n")
    broken = brainforge("sop", "validate", "sops", cwd=tmp_path)
    assert broken.returncode == 2 and "broken.yaml: steps:" in broken.stderr
