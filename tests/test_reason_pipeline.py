"""`brainforge reason` (two phases, one run folder, resumable per phase), the search policy
loaded from a run folder (`ask --adapter`, `eval`), and eval's EM/F1 for QA configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from brainforge.config import deep_merge, load_config, load_reason_config
from brainforge.errors import ConfigError, StoreError


def reason_config(tmp_path: Path, model: Path | str, phase1: dict | None = None, phase2: dict | None = None, **top) -> Path:
    """A small two-phase config: luffy on arithmetic prompts, then search_r1 on QA lines."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(4)))
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "response": f"{i} and {i} make {2 * i}."}) + "\n"
                              for i in range(4)))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is the capital of {c}?", "golden_answers": [a]}) + "\n"
                          for c, a in [("Bhutan", "Thimphu"), ("Malawi", "Lilongwe")]))
    grpo = {"num_generations": 2, "prompts_per_step": 2, "micro_batch_size": 4, "max_new_tokens": 8, "temperature": 1.0, "beta": 0.0}
    config = {
        "model": {"name_or_path": str(model)},
        "peft": {"lora": {"r": 4, "lora_alpha": 8}},
        "memory": {"store": str(tmp_path / "store")},
        "training": {"output_dir": str(tmp_path / "outputs"), "max_steps": 1, "learning_rate": 1e-2, "save_every_n_steps": 1,
                     "test_prompts": []},
        "logging": {"level": "WARNING"},
        "reason": {
            "phase1": deep_merge({
                "data": {"source": {"path": str(prompts), "type": "prompt"}},
                "algorithm": {"name": "luffy", "grpo": {**grpo, "max_new_tokens": 16, "reward_functions": [{"name": "last_number"}]},
                              "off_policy": {"traces": [str(traces)]}}}, phase1 or {}),
            "phase2": deep_merge({
                "data": {"source": {"name": "qa:jsonl", "path": str(qa), "type": "prompt", "options": {"test_path": str(qa)}}},
                "algorithm": {"name": "search_r1", "grpo": {**grpo, "reward_functions": [
                    {"name": "answer_match", "weight": 0.7}, {"name": "tag_order", "weight": 0.2}, {"name": "search_bonus", "weight": 0.1}]},
                    "search": {"max_search_calls": 1, "max_turn_tokens": 8, "max_observation_tokens": 48, "max_total_tokens": 96,
                               "cold_start": "luffy"}}},
                phase2 or {}),
        },
    }
    config = deep_merge(config, top)
    path = tmp_path / "reasoning.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------- config


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "l": [1, 2], "v": 1}
    over = {"a": {"y": {"q": 3}, "z": 4}, "l": [9], "v": None}
    assert deep_merge(base, over) == {"a": {"x": 1, "y": {"p": 1, "q": 3}, "z": 4}, "l": [9], "v": None}
    assert base == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "l": [1, 2], "v": 1}  # inputs unchanged


def test_each_phase_is_the_file_with_its_section_merged_over_it(tmp_path):
    path = reason_config(tmp_path, "default", phase2={"training": {"max_steps": 7}})
    phases = load_reason_config(path, ["training.learning_rate=0.5"])
    one, two = phases["phase1"], phases["phase2"]
    assert (one.algorithm.name, two.algorithm.name) == ("luffy", "search_r1")
    assert one.training.learning_rate == two.training.learning_rate == 0.5     # top level, overridden, shared
    assert (one.training.max_steps, two.training.max_steps) == (1, 7)          # phase 2's own wins for phase 2 only
    assert one.peft.lora.r == two.peft.lora.r == 4
    assert one.algorithm.grpo.loss_type == "dr_grpo" and two.algorithm.grpo.loss_type == "dapo"  # each phase's own defaults
    assert two.memory.store == str(tmp_path / "store")
    phases = load_reason_config(path, ["reason.phase1.training.max_steps=5"])
    assert (phases["phase1"].training.max_steps, phases["phase2"].training.max_steps) == (5, 7)


@pytest.mark.parametrize("phase, section, key", [
    ("phase1", {"algorithm": {"name": "grpo"}}, "reason.phase1.algorithm.name"),
    ("phase1", {"algorithm": {"name": "search_r1"}}, "reason.phase1.algorithm.name"),
    ("phase2", {"algorithm": {"name": "luffy"}}, "reason.phase2.algorithm.name"),
    ("phase2", {"model": {"adapter_path": "somewhere"}}, "reason.phase2.model.adapter_path"),
    ("phase1", {"training": {"output_dir": "elsewhere"}}, "reason.phase1.training.output_dir"),
    ("phase2", {"training": {"run_name": "mine"}}, "reason.phase2.training.run_name"),
    ("phase2", {"memory": {"store": "other"}}, "reason.phase2.memory.store"),
])
def test_bad_phase_settings_name_the_key(tmp_path, phase, section, key):
    path = reason_config(tmp_path, "default", **{phase: section})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_reason_config(path)


def test_reason_section_shape_errors_name_the_key(tmp_path):
    path = reason_config(tmp_path, "default")
    raw = yaml.safe_load(path.read_text())
    raw["reason"]["phase3"] = {}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"reason\.phase3: unknown key"):
        load_reason_config(path)
    del raw["reason"]["phase3"], raw["reason"]["phase2"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"reason\.phase2"):
        load_reason_config(path)
    raw["reason"]["phase2"] = {"algorithm": {"name": "search_r1", "grpo": {"num_generations": 1}}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"(?s)reason\.phase2 merged over the file.*num_generations"):
        load_reason_config(path)


def test_several_processes_are_refused(tmp_path):
    from brainforge.reasoning.pipeline import run_reason

    path = reason_config(tmp_path, "default", phase2={"hardware": {"devices": 2, "strategy": "ddp"}})
    with pytest.raises(ConfigError, match=r"hardware\.devices.*phase2"):
        run_reason(path, train=lambda *args, **kwargs: None)
    assert not (tmp_path / "outputs").exists()


def test_train_and_other_one_phase_readers_point_to_brainforge_reason(tmp_path):
    path = reason_config(tmp_path, "default")
    with pytest.raises(ConfigError, match="brainforge reason"):
        load_config(path)


def test_the_shipped_reasoning_config_is_valid():
    phases = load_reason_config(Path(__file__).resolve().parents[1] / "configs" / "reasoning.yaml")
    assert phases["phase1"].algorithm.name == "luffy" and phases["phase2"].algorithm.name == "search_r1"
    assert [(r.name, r.weight) for r in phases["phase2"].algorithm.grpo.reward_functions] == [
        ("answer_match", 0.7), ("tag_order", 0.2), ("search_bonus", 0.1)]
    assert phases["phase1"].memory.store == phases["phase2"].memory.store  # where `ingest --config` builds it


# ---------------------------------------------------------------------- pipeline


def test_missing_store_fails_before_phase1_and_writes_nothing(tmp_path):
    from brainforge.reasoning.pipeline import run_reason

    calls = []
    path = reason_config(tmp_path, tmp_path / "no-such-model")
    with pytest.raises(StoreError, match="brainforge ingest") as error:
        run_reason(path, train=lambda *args: calls.append(args))
    assert str(path) in str(error.value)  # the command names this config, whose memory section ingest reads
    assert calls == [] and not (tmp_path / "outputs").exists()


class FakeTrain:
    """Stands in for `training.run.train`: writes what a finished phase leaves (adapter,
    metrics, a checkpoint), and fails where told to."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[tuple[str, bool, str | None]] = []
        self.fail = set(fail)

    def __call__(self, config, config_path, resume, resume_command=None):
        from brainforge.training.checkpointing import LATEST, STATE_FILE

        assert resume_command == f"brainforge reason {config_path} --resume"  # what Ctrl-C tells the user

        phase_dir = Path(config.training.output_dir) / config.training.run_name
        self.calls.append((config.training.run_name, resume, config.model.adapter_path))
        step = phase_dir / "checkpoints" / "step-000001"
        step.mkdir(parents=True, exist_ok=True)
        (step / STATE_FILE).write_text("state")
        (phase_dir / "checkpoints" / LATEST).write_text("step-000001")
        if config.training.run_name in self.fail:
            self.fail.discard(config.training.run_name)
            raise RuntimeError("killed")
        (phase_dir / "adapter").mkdir(exist_ok=True)
        (phase_dir / "adapter" / "adapter_config.json").write_text("{}")
        (phase_dir / "metrics.json").write_text(json.dumps({"steps": 3}))
        return phase_dir


@pytest.fixture
def no_checks(monkeypatch):
    """The pipeline's bookkeeping alone: no store, prompt or adapter checks."""
    import brainforge.reasoning.pipeline as pipeline
    import brainforge.training.preflight as preflight

    monkeypatch.setattr(pipeline, "check_before_phase1", lambda phases, path: None)
    monkeypatch.setattr(preflight, "preflight", lambda config: None)


def test_resume_skips_a_finished_phase_and_continues_the_unfinished_one(tmp_path, no_checks):
    from brainforge.reasoning.pipeline import run_reason

    path = reason_config(tmp_path, "default")
    train = FakeTrain(fail={"phase2"})
    with pytest.raises(RuntimeError, match="killed"):
        run_reason(path, train=train)
    (run,) = list((tmp_path / "outputs").iterdir())
    assert run.name.startswith("reasoning-")
    state = json.loads((run / "reason.json").read_text())
    assert state["status"] == "failed"
    assert state["phases"]["phase1"]["status"] == "done" and state["phases"]["phase1"]["steps"] == 3
    assert state["phases"]["phase2"]["status"] == "failed" and "killed" in state["phases"]["phase2"]["error"]
    assert train.calls == [("phase1", False, None), ("phase2", False, str(run / "phase1" / "adapter"))]

    train.calls.clear()
    assert run_reason(path, resume=True, train=train) == run.resolve()
    assert train.calls == [("phase2", True, str(run / "phase1" / "adapter"))]  # phase 1 skipped; phase 2 from its checkpoint
    state = json.loads((run / "reason.json").read_text())
    assert state["status"] == "done" and [state["phases"][p]["status"] for p in ("phase1", "phase2")] == ["done", "done"]
    assert state["phases"]["phase2"]["metrics"] == str(run / "phase2" / "metrics.json")

    train.calls.clear()  # a phase marked done whose adapter is gone runs again
    (run / "phase2" / "adapter" / "adapter_config.json").unlink()
    run_reason(path, resume=True, train=train)
    assert [c[0] for c in train.calls] == ["phase2"]


def test_resume_without_a_run_and_a_named_run_twice_are_refused(tmp_path, no_checks):
    from brainforge.errors import BrainforgeError
    from brainforge.reasoning.pipeline import run_reason

    path = reason_config(tmp_path, "default", training={"run_name": "mine"})
    with pytest.raises(BrainforgeError, match="--resume: no reason run of 'mine'"):
        run_reason(path, resume=True, train=FakeTrain())
    run_reason(path, train=FakeTrain())
    assert (tmp_path / "outputs" / "mine" / "phase2" / "metrics.json").exists()
    with pytest.raises(BrainforgeError, match="already holds a reason run"):
        run_reason(path, train=FakeTrain())


# ---------------------------------------------------------------------- search policy from a run folder


def test_search_mode_is_chosen_from_the_run_folder(tmp_path):
    from brainforge.config import dump_config
    from brainforge.reasoning.policy import run_folder, search_run_config

    phases = load_reason_config(reason_config(tmp_path, "default"))
    search_run, luffy_run, reason_run = tmp_path / "search", tmp_path / "luffy", tmp_path / "reason"
    for folder, config in ((search_run, phases["phase2"]), (luffy_run, phases["phase1"]), (reason_run / "phase2", phases["phase2"])):
        (folder / "adapter").mkdir(parents=True)
        dump_config(config, folder / "config.yaml")
    (reason_run / "reason.json").write_text("{}")
    assert search_run_config(search_run).algorithm.name == "search_r1"
    assert search_run_config(search_run / "adapter").memory.store == str(tmp_path / "store")  # the adapter folder itself
    assert search_run_config(reason_run).algorithm.name == "search_r1"                         # a reason run: its phase 2
    assert run_folder(reason_run) == reason_run / "phase2"
    assert search_run_config(luffy_run) is None                                               # ask as before
    saved = yaml.safe_load((luffy_run / "config.yaml").read_text())
    saved["algorithm"]["grpo"]["reward_functions"] = [{"name": "not_importable_here.reward"}]
    (luffy_run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert search_run_config(luffy_run) is None  # a run with a custom reward is still asked as before, not refused
    assert search_run_config(tmp_path / "bare-adapter") is None


def test_ask_with_a_search_policy_checks_its_store_before_loading_a_model(tmp_path):
    from typer.testing import CliRunner

    from brainforge.cli import app
    from brainforge.config import dump_config

    phases = load_reason_config(reason_config(tmp_path, tmp_path / "no-such-model"))
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    dump_config(phases["phase2"], run / "config.yaml")
    result = CliRunner().invoke(app, ["ask", "What is the capital of Bhutan?", "--adapter", str(run)])
    assert isinstance(result.exception, StoreError), result.output
    assert "brainforge ingest" in str(result.exception) and str(tmp_path / "store") in str(result.exception)


# ---------------------------------------------------------------------- eval figures


def test_qa_figures_on_canned_transcripts():
    from brainforge.evaluation import qa_figures
    from brainforge.reasoning.tags import SearchTags

    texts = [
        "<think>x</think> <search>bhutan capital</search>\n<context>\n[1] Thimphu is the capital.\n</context>\n<answer> Thimphu </answer>",
        "<answer> Paro </answer> <answer> the Thimphu. </answer>",          # the LAST answer counts; normalised
        "<answer> New Delhi city </answer>",                                 # F1 2/3 against "New Delhi"
        "Lilongwe",                                                          # no answer block: the whole completion
        "<answer> 975 </answer>",                                            # a row without golds is skipped
    ]
    golds = [["Thimphu"], ["Thimphu"], ["New Delhi", "Delhi"], "Lilongwe", None]
    figures = qa_figures(texts, golds, SearchTags(), search_calls=[1, 0, 2, 0, 5])
    assert figures["prompts"] == 4 and figures["skipped"] == 1
    assert figures["exact_match"] == pytest.approx(3 / 4)
    assert figures["f1"] == pytest.approx((1 + 1 + 0.8 + 1) / 4)
    assert figures["answer_rate"] == pytest.approx(3 / 4)
    assert figures["searches_per_question"] == pytest.approx(3 / 4)
    assert figures["contains"] == pytest.approx(1.0)                          # every answer holds a gold's words
    # Retrieved text is not an answer: an unanswered transcript whose context has the gold contains nothing.
    unanswered = qa_figures(["<search>bhutan</search>\n<context>\nThimphu\n</context>\nI am not sure"], [["Thimphu"]], SearchTags())
    assert unanswered["contains"] == 0.0 and unanswered["f1"] == 0.0
    other_tags = qa_figures(["<reply> Thimphu </reply>"], [["Thimphu"]], SearchTags(answer="reply"))
    assert other_tags["exact_match"] == 1.0 and other_tags["answer_rate"] == 1.0 and other_tags["searches_per_question"] is None


def test_qa_configs_are_recognised(tmp_path):
    from brainforge.evaluation import is_qa_config

    phases = load_reason_config(reason_config(tmp_path, "default"))
    assert is_qa_config(phases["phase2"]) and not is_qa_config(phases["phase1"])
    phases["phase1"].algorithm.grpo.reward_functions[0].name = "answer_match"
    assert is_qa_config(phases["phase1"])


# ---------------------------------------------------------------------- end to end on the tiny model


@pytest.mark.slow
def test_two_phases_on_the_tiny_model_then_ask_and_eval_search(tmp_path, tiny_model_dir):
    """Both phases train (1 step each) into one run folder; phase 2 starts from phase 1's
    adapter; `ask --adapter RUN` and `eval` then run the policy's search rollouts."""
    from typer.testing import CliRunner

    from brainforge.cli import app
    from brainforge.config import MemoryConfig
    from brainforge.evaluation import QAEvalResult, run_eval
    from brainforge.memory.store import MemoryStore
    from brainforge.reasoning.pipeline import run_reason

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "bhutan.md").write_text("# Bhutan\n\nThe capital of Bhutan is Thimphu. Its currency is the ngultrum.\n")
    (docs / "malawi.md").write_text("# Malawi\n\nThe capital of Malawi is Lilongwe. Its currency is the kwacha.\n")
    MemoryStore(MemoryConfig(store=str(tmp_path / "store"))).ingest([str(docs)])
    path = reason_config(tmp_path, tiny_model_dir)

    run = run_reason(path)
    state = json.loads((run / "reason.json").read_text())
    assert state["status"] == "done" and {p: r["steps"] for p, r in state["phases"].items()} == {"phase1": 1, "phase2": 1}
    for phase in ("phase1", "phase2"):
        for name in ("adapter/adapter_model.safetensors", "config.yaml", "metrics.json", "tensorboard", "checkpoints/latest"):
            assert (run / phase / name).exists(), f"{phase}/{name}"
    saved = yaml.safe_load((run / "phase2" / "config.yaml").read_text())
    assert saved["model"]["adapter_path"] == str(run / "phase1" / "adapter") and saved["algorithm"]["name"] == "search_r1"

    result = CliRunner().invoke(app, ["ask", "What is the capital of Bhutan?", "--adapter", str(run)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "\nanswer: " in result.output and "searches: " in result.output and "--- transcript ---" in result.output

    (base, tuned) = run_eval(load_reason_config(path)["phase2"], run / "phase2", k=0, limit=2)
    assert isinstance(tuned, QAEvalResult) and tuned.prompts == 2 and tuned.searches_per_question is not None
    assert 0.0 <= tuned.exact_match <= tuned.f1 <= 1.0 and base.model.startswith("base")
