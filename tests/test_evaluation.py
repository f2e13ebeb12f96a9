"""`brainforge eval` / evaluation.py and the held-out split of prompt sources (issue 8, section 7).

Accuracy and pass@k are checked against hand-computed values with a scripted generation
engine (so which answers are right is known); the CLI runs end to end on the tiny model
with a reward whose values do not depend on the model; the held-out splits are disjoint
and deterministic, and `eval_size: 0` keeps every problem for training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from brainforge.config import SourceConfig, load_config
from brainforge.data.prompts import humaneval_prompts, load_prompts, reasoning_gym_prompts
from brainforge.errors import DataError

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}

QUESTIONS = [f"Question {i}: what is {i} times one?" for i in range(6)]
ANSWERS = [str(i) for i in range(6)]
# What the scripted model answers: greedy once per prompt, then k=3 samples per prompt.
GREEDY = {0: "0", 1: "wrong", 2: "2", 3: "wrong", 4: "wrong", 5: "wrong"}
SAMPLES = {
    0: ["0", "x", "x"],        # solved by a sample too
    1: ["x", "x", "1"],        # only the last sample is right
    2: ["x", "x", "x"],        # greedy right, no sample right
    3: ["3", "3", "3"],        # every sample right, greedy wrong
    4: ["x", "x", "x"],
    5: ["x", "5", "x"],
}
# Hand-computed: greedy right on 0 and 2 -> 2/6; some sample right on 0, 1, 3, 5 -> 4/6.


def eval_config(tmp_path: Path, model: Path | str, reward: str = "exact_match", count: int = 6) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": QUESTIONS[i] if reward == "exact_match" else f"Prompt {i} is {'even' if i % 2 == 0 else 'odd'}",
                                           "answer": ANSWERS[i]}) + "\n" for i in range(count)))
    config = {
        "model": {"name_or_path": str(model), "dtype": "float32"},
        "peft": {"lora": {"r": 4, "lora_alpha": 8}},
        "data": {"source": {"path": str(prompts), "type": "prompt"}},
        "algorithm": {"name": "grpo", "grpo": {"num_generations": 2, "prompts_per_step": 1, "max_new_tokens": 4, "temperature": 1.0,
                                               "reward_functions": [{"name": reward}]}},
        "training": {"output_dir": str(tmp_path / "outputs"), "max_steps": 1, "test_prompts": []},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class ScriptedEngine:
    """Answers each prompt with the scripted texts above, whatever the model."""

    calls: list[tuple[int, int, float]] = []

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompt_ids, num_samples, params, generator=None):
        texts = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            (index,) = [i for i, q in enumerate(QUESTIONS) if q in text]
            script = [GREEDY[index]] if params.temperature == 0 else SAMPLES[index]
            assert len(script) == num_samples
            texts += script
        ScriptedEngine.calls.append((len(prompt_ids), num_samples, params.temperature))
        return SimpleNamespace(texts=texts)


def test_accuracy_and_pass_at_k_against_hand_computed_values(tmp_path, tokenizer, monkeypatch):
    import brainforge.evaluation as evaluation

    monkeypatch.setattr(evaluation.GenerationEngine, "for_chat", classmethod(lambda cls, model, tok: ScriptedEngine(tok)))
    ScriptedEngine.calls = []
    config = load_config(eval_config(tmp_path, "default"))
    prompts = load_prompts(config.sources(), None)
    # batch_size 6 with k=3: prompts go 2 at a time, so per-prompt sample slices cross chunk boundaries
    result = evaluation.evaluate(None, tokenizer, config, prompts, "scripted", k=3, batch_size=6)
    assert result.prompts == 6 and result.k == 3
    assert result.greedy_accuracy == pytest.approx(2 / 6)
    assert result.pass_at_k == pytest.approx(4 / 6)
    assert result.mean_reward_greedy == pytest.approx(2 / 6)
    assert {(n, s) for n, s, _ in ScriptedEngine.calls} == {(2, 1), (2, 3)}
    assert any(t == 0 for *_, t in ScriptedEngine.calls) and any(t > 0 for *_, t in ScriptedEngine.calls)
    # A stricter threshold than the reward can reach: nothing counts as solved.
    strict = evaluation.evaluate(None, tokenizer, config, prompts, "scripted", k=3, batch_size=6, success_threshold=1.5)
    assert strict.greedy_accuracy == 0 and strict.pass_at_k == 0
    # k=0 skips sampling: pass@k is undefined, accuracy unchanged.
    greedy_only = evaluation.evaluate(None, tokenizer, config, prompts, "scripted", k=0, batch_size=6)
    assert greedy_only.greedy_accuracy == pytest.approx(2 / 6) and greedy_only.pass_at_k != greedy_only.pass_at_k  # NaN


@pytest.mark.slow
def test_eval_command_end_to_end(tmp_path, tiny_model_dir, random_adapter):
    config = eval_config(tmp_path, tiny_model_dir, reward="eval_rewards.prompt_says_even", count=5)
    out, record = tmp_path / "results.json", tmp_path / "calls.jsonl"
    result = subprocess.run([sys.executable, "-m", "brainforge", "eval", str(config), "--adapter", str(random_adapter),
                             "--k", "2", "--limit", "4", "--output", str(out)],
                            capture_output=True, text=True, timeout=600, env={**ENV, "EVAL_REWARD_RECORD": str(record)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["model"].split(" ")[0] for r in rows] == ["base", "adapter"]
    for row in rows:   # prompts 0 and 2 of the first 4 say "even"
        assert row["prompts"] == 4 and row["k"] == 2
        assert row["greedy_accuracy"] == pytest.approx(0.5) and row["pass_at_k"] == pytest.approx(0.5)
        assert row["mean_reward_greedy"] == pytest.approx(0.5)
    assert "greedy accuracy 0.500" in result.stdout and "pass@2 0.500" in result.stdout
    # One greedy and one sampled call per model (4 prompts fit one chunk); the adapter's greedy
    # answers are not the base model's (its LoRA B is large), so the adapter was really loaded.
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [len(c["completions"]) for c in calls] == [4, 8, 4, 8]
    assert calls[0]["prompts"] == calls[2]["prompts"] == [f"Prompt {i} is {'even' if i % 2 == 0 else 'odd'}" for i in range(4)]
    assert calls[0]["completions"] != calls[2]["completions"]


@pytest.fixture
def random_adapter(tmp_path, tiny_model_dir, tokenizer):
    from adapter_fixtures import make_random_adapter

    return make_random_adapter(tmp_path / "adapter", tiny_model_dir, tokenizer)


# ---------------------------------------------------------------------- held-out splits


def test_humaneval_split_is_disjoint_deterministic_and_complete():
    train, test = humaneval_prompts("train", 32), humaneval_prompts("test", 32)
    ids = lambda prompts: [p.columns["task_id"] for p in prompts]  # noqa: E731
    assert len(train) == 132 and len(test) == 32
    assert not set(ids(train)) & set(ids(test))
    assert sorted(ids(train) + ids(test), key=lambda t: int(t.split("/")[1])) == [f"HumanEval/{i}" for i in range(164)]
    assert ids(humaneval_prompts("train", 32)) == ids(train) and ids(humaneval_prompts("test", 32)) == ids(test)


def test_humaneval_eval_size_zero_trains_on_every_problem():
    """`problems[:-0]` is empty: eval_size 0 used to give an empty training set."""
    assert len(humaneval_prompts("train", 0)) == 164
    assert humaneval_prompts("test", 0) == []
    source = SourceConfig(name="humaneval", type="prompt", options={"eval_size": 0})
    assert len(load_prompts([source], None)) == 164
    with pytest.raises(DataError, match="no prompts"):
        load_prompts([source], None, split="test")


@pytest.mark.parametrize("eval_size", [-1, 164, 500])
def test_humaneval_eval_size_out_of_range_is_named(eval_size):
    with pytest.raises(DataError, match="eval_size"):
        humaneval_prompts("train", eval_size)



@pytest.mark.parametrize("name, options", [("humaneval", {"eval_size": "ten"}), ("humaneval", {"eval_size": 2.5}),
                                           ("reasoning_gym:basic_arithmetic", {"size": "many"})])
def test_prompt_source_options_that_are_not_whole_numbers_are_named(name, options):
    from brainforge.config import SourceConfig
    from brainforge.data.prompts import _load_source

    key = next(iter(options))
    with pytest.raises(DataError, match=f"options.{key} must be a whole number"):
        _load_source(SourceConfig(name=name, type="prompt", options=options), "train")

def test_reasoning_gym_split_is_disjoint_and_deterministic():
    options = {"size": 30, "eval_size": 10, "seed": 3}
    train = reasoning_gym_prompts("basic_arithmetic", dict(options), "train")
    test = reasoning_gym_prompts("basic_arithmetic", dict(options), "test")
    assert len(train) == 30 and len(test) == 10
    assert not {p.text for p in train} & {p.text for p in test}
    again = reasoning_gym_prompts("basic_arithmetic", dict(options), "train")
    assert [(p.text, p.columns) for p in again] == [(p.text, p.columns) for p in train]
    assert [p.text for p in reasoning_gym_prompts("basic_arithmetic", dict(options), "test")] == [p.text for p in test]
    # a different seed gives other questions
    other = reasoning_gym_prompts("basic_arithmetic", {**options, "seed": 4}, "test")
    assert [p.text for p in other] != [p.text for p in test]


def test_reasoning_gym_eval_size_zero_keeps_the_training_set():
    train = reasoning_gym_prompts("basic_arithmetic", {"size": 12, "eval_size": 0, "seed": 0}, "train")
    assert len(train) == 12
    assert reasoning_gym_prompts("basic_arithmetic", {"size": 12, "eval_size": 0, "seed": 0}, "test") == []


def test_eval_reads_the_held_out_split_not_the_training_one(tmp_path):
    from brainforge.evaluation import held_out_prompts
    from brainforge.training.grpo_run import training_prompts

    config = load_config(eval_config(tmp_path, "default"),
                         ["data.source={name: 'reasoning_gym:basic_arithmetic', type: prompt, options: {size: 20, eval_size: 8, seed: 1}}"])
    held_out = held_out_prompts(config, None)
    assert len(held_out) == 8 and len(held_out_prompts(config, 3)) == 3
    assert not {p.text for p in held_out} & {p.text for p in training_prompts(config)}
    # the config's options are not consumed by reading them
    assert config.sources()[0].options == {"size": 20, "eval_size": 8, "seed": 1}
