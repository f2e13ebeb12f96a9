"""Commands that could lose user data (issue 8, section 3) and the store's bad inputs.

Every test snapshots the files that were there before and checks they are all still there,
byte for byte, after the command was refused or interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brainforge.config import MemoryConfig
from brainforge.errors import BrainforgeError, ConfigError, StoreError
from conftest import write_config
from test_memory import make_store, search_paths, write_corpus

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def brainforge(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brainforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> content)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_files(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.md").write_text("# Chapter 1\nSeven years of work.\n")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "results.csv").write_text("run,score\n1,0.93\n")
    return snapshot(folder)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    """A run folder with a non-trivial LoRA adapter on the tiny model (built in-process, no training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from brainforge.training.checkpointing import write_adapter

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    run = tmp_path_factory.mktemp("run")
    write_adapter(model, tokenizer, tokenizer.chat_template, run / "adapter", {"model": str(tiny_model_dir)})
    return run


@pytest.mark.slow
def test_merge_cli_refuses_targets_that_hold_user_files(adapter_run, tmp_path):
    work = tmp_path / "work"
    before = user_files(work)
    # a non-empty folder: refused without --force, and still refused with it (not a merge output)
    refused = brainforge("merge", str(adapter_run), "--out", "data", "--dtype", "float32", cwd=work)
    assert_one_line_error(refused, "data", "--force")
    forced = brainforge("merge", str(adapter_run), "--out", "data", "--force", "--dtype", "float32", cwd=work)
    assert_one_line_error(forced, "data", "not a brainforge merge output")
    # `--out .` with files in the current directory
    dot = brainforge("merge", str(adapter_run), "--out", ".", "--force", cwd=work)
    assert_one_line_error(dot, "current directory")
    # `--out FILE`: refused before anything is loaded, nothing left behind
    onto_file = brainforge("merge", str(adapter_run), "--out", "thesis.md", cwd=work)
    assert_one_line_error(onto_file, "thesis.md", "not a folder")
    assert snapshot(work) == before
    assert sorted(p.name for p in work.iterdir()) == ["data", "thesis.md"]  # no staging folder either


def test_merge_refuses_before_loading_anything(adapter_run, tmp_path, monkeypatch):
    import brainforge.merge as merge_module

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded for a merge that had to be refused")

    monkeypatch.setattr(merge_module, "load_base_model", no_loading)
    monkeypatch.setattr(merge_module, "load_tokenizer", no_loading)
    target = tmp_path / "weights.bin"
    target.write_bytes(b"precious")
    with pytest.raises(BrainforgeError, match="not a folder"):
        merge_module.merge_adapter(adapter_run, target, save_dtype="float32")
    (tmp_path / "inside").write_text("x")
    with pytest.raises(BrainforgeError, match="is a file"):
        merge_module.merge_adapter(adapter_run, tmp_path / "inside" / "merged", save_dtype="float32")
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inside", "weights.bin"]


def test_merge_force_replaces_only_a_complete_new_merge(adapter_run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import brainforge.merge as merge_module

    out = tmp_path / "merged"
    out.mkdir()  # an empty folder is fine without --force
    assert merge_module.merge_adapter(adapter_run, out, save_dtype="float32") == out
    assert (out / merge_module.MARKER).is_file() and (out / "model.safetensors").is_file()
    (out / "note.txt").write_text("the first merge")
    first = snapshot(out)
    with pytest.raises(BrainforgeError, match="--force"):
        merge_module.merge_adapter(adapter_run, out, save_dtype="float32")

    # interrupted after the new model was written, during its check: the old merge is untouched
    calls = {"n": 0}
    real_generate = merge_module.ChatModel.generate

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the reload check of the staged model
            raise KeyboardInterrupt
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(merge_module.ChatModel, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_module.merge_adapter(adapter_run, out, save_dtype="float32", force=True)
    assert calls["n"] == 2
    monkeypatch.undo()
    assert snapshot(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # staging removed

    # killed between the two renames of a forced swap: the next merge puts the old one back first
    os.rename(out, tmp_path / ".merged.merge-old")
    merge_module.merge_adapter(adapter_run, out, save_dtype="float32", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert not (out / "note.txt").exists() and (out / merge_module.MARKER).is_file()
    AutoModelForCausalLM.from_pretrained(out)


# ---------------------------------------------------------------------- run_name


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute-run", "a/b", "a\\b", "..", "x..y"])
def test_run_name_with_path_parts_is_rejected_with_its_key(tmp_path, tiny_model_dir, name):
    from brainforge.config import load_config

    config = write_config(tmp_path / "tiny.yaml", tiny_model_dir, training={"run_name": name})
    with pytest.raises(ConfigError, match="training.run_name"):
        load_config(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_run_name_cli_error_and_run_dir_stays_inside_output_dir(tmp_path, tiny_model_dir, monkeypatch):
    from brainforge.config import load_config
    from brainforge.training.run import RUN_DIR_ENV, resolve_run_dir

    config = write_config(tmp_path / "tiny.yaml", tiny_model_dir, training={"run_name": "../../outside"})
    result = brainforge("config", "validate", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "training.run_name" in result.stderr and "Traceback" not in result.stderr
    # a plain name that is a symlink out of output_dir is caught when the run folder is resolved
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "outputs").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "outputs" / "linked")
    config = write_config(tmp_path / "tiny.yaml", tiny_model_dir, training={"run_name": "linked"})
    with pytest.raises(ConfigError, match="outside training.output_dir"):
        resolve_run_dir(load_config(config), config, resume=False)
    assert list((tmp_path / "elsewhere").iterdir()) == []
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)


# ---------------------------------------------------------------------- ingest --rebuild


@pytest.fixture(scope="module")
def embedder():
    from brainforge.memory.embedder import Embedder

    return Embedder()


def test_rebuild_refuses_a_folder_that_is_not_a_store(tmp_path, embedder):
    from brainforge.memory.store import MemoryStore

    corpus = write_corpus(tmp_path / "corpus")
    folder = tmp_path / "documents"
    before = user_files(folder)
    store = MemoryStore(MemoryConfig(store=str(folder)), embedder)
    with pytest.raises(StoreError, match="not a brainforge memory store.*nothing was touched"):
        store.ingest([corpus], rebuild=True)
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["data", "thesis.md"]
    # a lone manifest.json that is not ours (a web app's) is not a store either
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "My App", "icons": []}')
    with pytest.raises(StoreError, match="not a brainforge store manifest"):
        MemoryStore(MemoryConfig(store=str(webapp)), embedder).ingest([corpus], rebuild=True)
    assert (webapp / "manifest.json").read_text() == '{"name": "My App", "icons": []}'
    assert [p.name for p in webapp.iterdir()] == ["manifest.json"]


def test_rebuild_cli_refuses_user_folder_exit_2(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    before = user_files(tmp_path / "mine")
    result = brainforge("ingest", "--rebuild", "--store", "mine", str(corpus), cwd=tmp_path)
    assert_one_line_error(result, "mine", "not a brainforge memory store")
    assert snapshot(tmp_path / "mine") == before


def test_rebuild_swaps_in_a_new_store_and_removes_only_the_old_index(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    store_dir = tmp_path / "store"
    first = make_store(tmp_path, embedder).ingest([corpus])
    assert (store_dir / "chroma").is_dir()
    rebuilt = make_store(tmp_path, embedder).ingest([corpus], rebuild=True)
    assert rebuilt.files_ingested == 3 and rebuilt.chunks_total == first.chunks_total
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["chroma"] == "chroma-g000002" and manifest["generation"] == 2
    assert sorted(p.name for p in store_dir.iterdir()) == [".lock", ".write.lock", "chroma-g000002", "gen-000002", "manifest.json"]
    assert search_paths(make_store(tmp_path, embedder), "yellow tropical fruit")[0] == "corpus/docs/guide.md"
    again = make_store(tmp_path, embedder).ingest([corpus])
    assert again.files_unchanged == 3 and again.chunks_restored == 0


@pytest.mark.slow
def test_kill_9_during_rebuild_leaves_the_previous_store_readable(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    store_dir = tmp_path / "store"
    committed = make_store(tmp_path, embedder).ingest([corpus]).chunks_total
    manifest_before = (store_dir / "manifest.json").read_bytes()
    bigger = tmp_path / "bigger"
    shutil.copytree(corpus, bigger)
    for index in range(60):
        (bigger / "src" / f"module_{index}.py").write_text(
            "\n\n".join(f"def function_{index}_{n}(value):\n    return value * {n} + {index}  # step {n}" for n in range(12)) + "\n")
    script = ("from brainforge.config import MemoryConfig; from brainforge.memory.store import MemoryStore;"
              f"MemoryStore(MemoryConfig(store={str(store_dir)!r})).ingest([{str(bigger)!r}], rebuild=True)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        new_index = store_dir / "chroma-g000002" / "chroma.sqlite3"
        deadline = time.monotonic() + 300
        while not new_index.exists():  # the rebuild has started writing its new index
            assert child.poll() is None, "the rebuild ended before it could be killed"
            assert time.monotonic() < deadline, "the rebuild did not start within 300 s"
            time.sleep(0.05)
        assert (store_dir / "manifest.json").read_bytes() == manifest_before  # not committed yet
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=60)
    # the old store is intact and fully readable (its vector index too)
    assert (store_dir / "manifest.json").read_bytes() == manifest_before
    reader = make_store(tmp_path, embedder)
    assert len(reader) == committed
    assert search_paths(reader, "how are ranked lists merged")[0] == "corpus/src/fusion.py"
    assert reader.vector_search(embedder.embed_query("yellow tropical fruit"), 3)
    # the next ingest completes and sweeps what the killed rebuild left
    finished = make_store(tmp_path, embedder).ingest([corpus])
    assert finished.files_unchanged == 3 and finished.chunks_total == committed
    leftovers = sorted(p.name for p in store_dir.iterdir() if p.name.startswith(("chroma", "gen-")))
    assert leftovers == ["chroma", "gen-000002"]


# ---------------------------------------------------------------------- symlinks


def test_ingest_does_not_follow_symlinks_out_of_its_roots(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    fake_etc = tmp_path / "fake_etc"  # stands in for /etc
    fake_etc.mkdir()
    (fake_etc / "shadow").write_text("root:$6$saltysecret$hash:19000:0:99999:7:::\n")
    (fake_etc / "hosts").write_text("127.0.0.1 localhost\n")
    os.symlink(fake_etc, corpus / "etc")
    os.symlink(fake_etc / "shadow", corpus / "docs" / "shadow.txt")
    os.symlink(corpus / "src", corpus / "docs" / "src-alias")  # inside the root: fine, but listed once
    os.symlink(corpus, corpus / "src" / "loop")
    store = make_store(tmp_path, embedder)
    report = store.ingest([corpus])
    reasons = dict(report.skipped)
    assert "outside the ingested folders" in reasons["corpus/etc"] and "--follow-symlinks" in reasons["corpus/etc"]
    assert "outside the ingested folders" in reasons["corpus/docs/shadow.txt"]
    assert report.files_ingested == 3  # the three corpus files, each once
    store.refresh()
    assert not any("saltysecret" in store.chunk(cid).text or "localhost" in store.chunk(cid).text for cid in store._chunks)
    assert not any(str(fake_etc) in key for key in store.files())

    followed = make_store(tmp_path / "other", embedder).ingest([corpus], follow_symlinks=True)
    assert followed.files_ingested == 5


# ---------------------------------------------------------------------- damaged vector index


def _forget_chroma_clients() -> None:
    """Chroma caches one client per path per process; a test that deletes the folder under
    a live client must drop it, as a new process would."""
    from chromadb.api.client import SharedSystemClient

    SharedSystemClient.clear_system_cache()


def test_deleted_chroma_folder_is_reported_and_reingest_restores_it(tmp_path, embedder):
    from brainforge.memory.retrieval import HybridRetriever

    corpus = write_corpus(tmp_path / "corpus")
    first = make_store(tmp_path, embedder).ingest([corpus])
    shutil.rmtree(tmp_path / "store" / "chroma")
    _forget_chroma_clients()
    with pytest.raises(StoreError, match=r"vector index is missing.*brainforge ingest --rebuild"):
        HybridRetriever(make_store(tmp_path, embedder)).search("yellow tropical fruit")
    assert not (tmp_path / "store" / "chroma").exists()  # reading did not create an empty one
    again = make_store(tmp_path, embedder).ingest([corpus])
    assert again.files_unchanged == 3 and again.chunks_restored == first.chunks_total
    reader = make_store(tmp_path, embedder)
    result = HybridRetriever(reader).search("yellow tropical fruit")
    assert result.hits[0].chunk.path == "corpus/docs/guide.md" and "vector" in result.hits[0].ranks


def test_collection_missing_some_chunks_is_reported_and_restored(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    store = make_store(tmp_path, embedder)
    total = store.ingest([corpus]).chunks_total
    store.refresh()
    lost = sorted(store._chunks)[:2]
    store._chroma().delete(ids=lost)
    with pytest.raises(StoreError, match=f"lacks 2 of the {total} chunks.*--rebuild"):
        make_store(tmp_path, embedder).refresh()
    again = make_store(tmp_path, embedder).ingest([corpus])
    assert again.chunks_restored == 2 and again.files_unchanged == 3 and again.chunks_added == 0
    reader = make_store(tmp_path, embedder)
    reader.refresh()
    assert sorted(reader._chroma().get(include=[])["ids"]) == sorted(reader._chunks)


def test_damaged_chroma_database_is_reported_and_rebuild_recovers(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    make_store(tmp_path, embedder).ingest([corpus])
    _forget_chroma_clients()
    (tmp_path / "store" / "chroma" / "chroma.sqlite3").write_bytes(b"\x00garbage, not SQLite\xff" * 4096)
    with pytest.raises(StoreError, match=r"vector index cannot be opened.*brainforge ingest --rebuild"):
        make_store(tmp_path, embedder).refresh()
    _forget_chroma_clients()
    assert make_store(tmp_path, embedder).ingest([corpus], rebuild=True).files_ingested == 3
    assert not (tmp_path / "store" / "chroma").exists()  # the damaged index went only after the new one was committed
    assert search_paths(make_store(tmp_path, embedder), "yellow tropical fruit")[0] == "corpus/docs/guide.md"


def test_search_cli_reports_a_deleted_index_with_the_fix(tmp_path, embedder):
    make_store(tmp_path, embedder).ingest([write_corpus(tmp_path / "corpus")])
    shutil.rmtree(tmp_path / "store" / "chroma")
    _forget_chroma_clients()
    broken = brainforge("search", "--store", "store", "yellow fruit", cwd=tmp_path)
    assert_one_line_error(broken, "chroma", "brainforge ingest --rebuild")
    assert not (tmp_path / "store" / "chroma").exists()


# ---------------------------------------------------------------------- manifest shape, missing store


@pytest.mark.parametrize("content", [
    "{}", "[]", '"a string"', "null",
    '{"format": 1, "generation": "7", "embedder": {"id": "m", "dimension": 384}, "files": {}, "chunks": 0}',
    '{"format": 1, "generation": 1, "embedder": {"id": "m", "dimension": 384}, "files": [], "chunks": 0}',
    '{"format": 1, "generation": 1, "embedder": {"id": "m"}, "files": {}, "chunks": 0}',
    '{"format": 1, "generation": 1, "embedder": {"id": "m", "dimension": 384}, "files": {"a": {"size": 1}}, "chunks": 0}',
    '{"format": 1, "generation": 1, "embedder": {"id": "m", "dimension": 384}, "files": {}, "chunks": 0, "chroma": "../x"}',
])
def test_manifest_of_the_wrong_shape_is_a_one_line_error(tmp_path, embedder, content):
    from brainforge.memory.retrieval import HybridRetriever

    store_dir = tmp_path / "store"
    store_dir.mkdir()
    (store_dir / "manifest.json").write_text(content)
    corpus = write_corpus(tmp_path / "corpus")
    for action in (lambda: HybridRetriever(make_store(tmp_path, embedder)).search("anything"),
                   lambda: make_store(tmp_path, embedder).ingest([corpus])):
        with pytest.raises(StoreError) as info:
            action()
        message = str(info.value)
        assert "manifest.json" in message and "brainforge ingest --rebuild" in message and "\n" not in message


def test_manifest_of_the_wrong_shape_cli_and_rebuild_fixes_it(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    make_store(tmp_path, embedder).ingest([corpus])
    (tmp_path / "store" / "manifest.json").write_text("[1, 2, 3]")
    broken = brainforge("search", "--store", "store", "yellow fruit", cwd=tmp_path)
    assert_one_line_error(broken, "manifest.json", "expected a JSON object", "--rebuild")
    rebuilt = make_store(tmp_path, embedder).ingest([corpus], rebuild=True)  # the fix the message names works
    assert rebuilt.files_ingested == 3
    assert search_paths(make_store(tmp_path, embedder), "yellow tropical fruit")[0] == "corpus/docs/guide.md"


def test_search_and_ask_on_a_missing_store_create_nothing(tmp_path, embedder):
    from brainforge.memory.retrieval import HybridRetriever

    for command in (["search", "anything"], ["ask", "what is in my notes?"]):
        result = brainforge(*command, "--store", "no-such-store", cwd=tmp_path)
        assert_one_line_error(result, str(tmp_path / "no-such-store"), "brainforge ingest")
    assert list(tmp_path.iterdir()) == []
    # the library's reader does not create it either
    with pytest.raises(StoreError, match="is empty"):
        HybridRetriever(make_store(tmp_path, embedder)).search("anything")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a-file").write_text("not a store")
    result = brainforge("search", "anything", "--store", "a-file", cwd=tmp_path)
    assert_one_line_error(result, "a-file", "must be a folder")
    assert (tmp_path / "a-file").read_text() == "not a store"
