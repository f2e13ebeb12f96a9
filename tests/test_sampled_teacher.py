"""`generate_traces`: rejection sampling from a local teacher into a trace file.

The tiny random model is the teacher; a reward decided by the text alone (even length)
accepts about half its samples, so every kept line can be checked against the reward, and
its log-probs against a fresh forward pass of the teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import teacher_rewards
from brainforge.errors import BrainforgeError
from brainforge.teachers.sampled import generate_traces, load_teacher

REPO = Path(__file__).resolve().parents[1]
EVEN = {"name": "teacher_rewards.even_length", "weight": 2.0}
NONE = {"name": "teacher_rewards.not_applicable", "weight": 5.0}


def teacher_config(tmp_path: Path, model_dir: Path | str, rewards: list[dict], prompts: int = 3, **grpo) -> Path:
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                                   for i in range(prompts)))
    config = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"source": {"path": str(prompt_file), "type": "prompt"}},
        "algorithm": {"name": "grpo", "grpo": {"max_new_tokens": 8, "temperature": 1.0, "reward_functions": rewards, **grpo}},
        "training": {"max_steps": 1},
    }
    path = tmp_path / "teach.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sampling_logprobs(model, prompt_ids: list[int], token_ids: list[int], temperature: float) -> torch.Tensor:
    """Log-probs of `token_ids` after `prompt_ids` at `temperature`, from one plain forward pass."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(token_ids)[:, None]).squeeze(1)


def rendered_prompt(tokenizer, template: str, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_keeps_only_correct_completions_with_the_samplers_logprobs(tmp_path, tiny_model_dir, monkeypatch):
    from brainforge.data.traces import load_traces, tokenizer_fingerprint

    monkeypatch.chdir(tmp_path)
    teacher_rewards.CALLS.clear()
    # The stop string ends rows at different steps: some lines end early, some are cut at 8 tokens.
    config = teacher_config(tmp_path, tiny_model_dir, [EVEN, NONE], stop_strings=["y"])
    report = generate_traces(config, None, str(tiny_model_dir), k=4, out=None, limit=None, temperature=None, max_new_tokens=None)

    out = tmp_path / "teach.traces.jsonl"  # default: <config stem>.traces.jsonl in the current directory
    assert report.out == out and out.is_file()
    lines = read_lines(out)
    # What the reward judged, prompt by prompt: exactly the distinct accepted responses are kept.
    judged = {}
    for call in teacher_rewards.CALLS:
        for prompt, completion, value in zip(call["prompts"], call["completions"], call["scores"]):
            judged.setdefault(prompt, []).append((completion, value))
    assert sum(len(v) for v in judged.values()) == report.samples == 12
    accepted = {p: {c for c, v in rows if v == 1.0} for p, rows in judged.items()}
    rejected = {p: {c for c, v in rows if v == 0.0} for p, rows in judged.items()}
    assert any(accepted.values()) and any(rejected.values()), "the seed should give both outcomes"
    kept = {}
    for line in lines:
        kept.setdefault(line["prompt"], []).append(line["response"])
    assert {p: sorted(r) for p, r in kept.items()} == {p: sorted(a) for p, a in accepted.items() if a}
    assert report.kept == len(lines) == sum(len(a) for a in accepted.values())
    assert report.prompts == 3 and report.prompts_with_trace == sum(1 for a in accepted.values() if a)
    assert all(line["response"] not in rejected[line["prompt"]] for line in lines)

    teacher = load_teacher(str(tiny_model_dir), "float32")
    fingerprint = tokenizer_fingerprint(teacher.tokenizer)
    assert len(load_traces(out)) == len(lines)  # the trace loader accepts the file
    cut_rows = [len(line["token_ids"]) == 8 and "y" not in line["response"] for line in lines]
    assert any(cut_rows) and not all(cut_rows), "the seed should end some kept rows early and cut others"
    for line, cut in zip(lines, cut_rows):
        assert line.get("extra", {}) == ({"truncated": True} if cut else {})
        assert line["reward"] == pytest.approx(2.0)  # weighted sum; the None reward adds nothing
        assert line["source"] == f"teacher:{tiny_model_dir}"
        assert line["tokenizer"] == fingerprint
        assert 0 < len(line["logprobs"]) == len(line["token_ids"]) <= 8
        assert teacher.tokenizer.decode(line["token_ids"], skip_special_tokens=True) == line["response"]
        prompt_ids = rendered_prompt(teacher.tokenizer, teacher.chat_template, line["prompt"])
        expected = sampling_logprobs(teacher.model, prompt_ids, line["token_ids"], 1.0)
        assert torch.allclose(torch.tensor(line["logprobs"]), expected, atol=1e-4), line
    assert "samples" in report.summary() and str(out) in report.summary()


def test_temperature_override_is_the_logprob_temperature(tmp_path, tiny_model_dir):
    config = teacher_config(tmp_path, tiny_model_dir, [{"name": "teacher_rewards.accept_all"}], prompts=1)
    out = tmp_path / "hot.jsonl"
    generate_traces(config, None, str(tiny_model_dir), k=2, out=out, limit=None, temperature=1.7, max_new_tokens=5)
    teacher = load_teacher(str(tiny_model_dir), "float32")
    lines = read_lines(out)
    assert lines and all(len(line["token_ids"]) == 5 for line in lines)
    for line in lines:
        prompt_ids = rendered_prompt(teacher.tokenizer, teacher.chat_template, line["prompt"])
        expected = sampling_logprobs(teacher.model, prompt_ids, line["token_ids"], 1.7)
        assert torch.allclose(torch.tensor(line["logprobs"]), expected, atol=1e-4)


def test_identical_responses_are_kept_once_per_prompt(tmp_path, tiny_model_dir, monkeypatch):
    from brainforge.generation.engine import GenerationEngine, Rollout

    real_generate = GenerationEngine.generate

    def every_sample_twice(self, prompts, num_samples, params, generator=None):
        """Real samples, each repeated: row pairs (0, 1), (2, 3) of a prompt are identical."""
        half = real_generate(self, prompts, num_samples // 2, params, generator)
        twice = lambda t: t.repeat_interleave(2, dim=0)
        return Rollout([p for p in half.prompt_ids for _ in range(2)], twice(half.completion_ids),
                       twice(half.completion_mask), twice(half.truncated), [t for t in half.texts for _ in range(2)],
                       twice(half.logprobs))

    monkeypatch.setattr(GenerationEngine, "generate", every_sample_twice)
    config = teacher_config(tmp_path, tiny_model_dir, [{"name": "teacher_rewards.accept_all"}], prompts=2)
    out = tmp_path / "twice.jsonl"
    report = generate_traces(config, None, str(tiny_model_dir), k=4, out=out, limit=None, temperature=None, max_new_tokens=4)
    lines = read_lines(out)
    assert (report.samples, report.kept, report.duplicates, report.prompts_with_trace) == (8, 4, 4, 2)
    for prompt in ("What is 0 + 0?", "What is 1 + 1?"):
        responses = [line["response"] for line in lines if line["prompt"] == prompt]
        assert len(responses) == len(set(responses)) == 2


def test_empty_replies_are_not_written_even_when_rewarded(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Final norm weight 0: every logit is 0, greedy picks token 0, <|endoftext|>, a special
    # token that is not a stop token and decodes to "" -- an empty reply the reward accepts.
    silent = tmp_path / "silent-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.nn.init.zeros_(model.model.norm.weight)
    model.save_pretrained(silent)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(silent)
    config = teacher_config(tmp_path, tiny_model_dir, [{"name": "teacher_rewards.accept_all"}], prompts=2)
    out = tmp_path / "silent.jsonl"
    report = generate_traces(config, None, str(silent), k=2, out=out, limit=None, temperature=0.0, max_new_tokens=2)
    assert (report.samples, report.kept, report.empty) == (4, 0, 4)
    assert not out.exists()  # no empty (invalid) trace file


def test_limit_and_a_reward_that_never_applies_write_nothing(tmp_path, tiny_model_dir):
    config = teacher_config(tmp_path, tiny_model_dir, [NONE], prompts=5)
    out = tmp_path / "none.jsonl"
    report = generate_traces(config, None, str(tiny_model_dir), k=2, out=out, limit=2, temperature=None, max_new_tokens=3)
    assert (report.prompts, report.samples, report.kept, report.prompts_with_trace) == (2, 4, 0, 0)
    assert not out.exists() and "nothing written" in report.summary()


def test_a_reward_that_raises_stops_or_scores_none_as_the_config_says(tmp_path, tiny_model_dir):
    rewards = [{"name": "teacher_rewards.broken"}, {"name": "teacher_rewards.accept_all"}]
    config = teacher_config(tmp_path, tiny_model_dir, rewards, prompts=1)
    with pytest.raises(BrainforgeError, match="teacher_rewards.broken.*this reward is broken"):
        generate_traces(config, None, str(tiny_model_dir), k=2, out=tmp_path / "x.jsonl", limit=None, temperature=None,
                        max_new_tokens=3)
    report = generate_traces(config, ["algorithm.grpo.reward_errors=none"], str(tiny_model_dir), k=2,
                             out=tmp_path / "y.jsonl", limit=None, temperature=None, max_new_tokens=3)
    assert report.kept == 2 and all(line["reward"] == 1.0 for line in read_lines(tmp_path / "y.jsonl"))


def test_run_folder_teacher_uses_its_adapter_and_training_template(tmp_path, tiny_model_dir, tokenizer):
    from adapter_fixtures import make_random_adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from brainforge.data.templates import ALPACA_TEMPLATE

    run = tmp_path / "run"
    adapter = make_random_adapter(run / "adapter", tiny_model_dir, tokenizer)
    trained_tokenizer = AutoTokenizer.from_pretrained(adapter)
    trained_tokenizer.chat_template = ALPACA_TEMPLATE  # the run trained with output_format: alpaca
    trained_tokenizer.save_pretrained(adapter)

    config = teacher_config(tmp_path, tiny_model_dir, [{"name": "teacher_rewards.accept_all"}], prompts=1)
    out = tmp_path / "run.jsonl"
    generate_traces(config, None, str(run), k=2, out=out, limit=None, temperature=None, max_new_tokens=6)
    lines = read_lines(out)
    assert lines and all(line["source"] == f"teacher:{run}" for line in lines)
    # The log-probs are those of base + adapter on the prompt rendered with the run's template:
    # a teacher that dropped the adapter or rendered with the base template would not match.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    for line in lines:
        prompt_ids = rendered_prompt(trained_tokenizer, ALPACA_TEMPLATE, line["prompt"])
        expected = sampling_logprobs(model, prompt_ids, line["token_ids"], 1.0)
        assert torch.allclose(torch.tensor(line["logprobs"]), expected, atol=1e-4)


@pytest.mark.parametrize("make, says", [
    (lambda d: d / "missing-model", "no such file or folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no model"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "not .gguf"),
    (lambda d: "org/some-hub-model", "no such file or folder"),  # a hub id: nothing is fetched
])
def test_bad_teacher_is_one_line_naming_it_and_the_accepted_forms(tmp_path, tiny_model_dir, make, says):
    config = teacher_config(tmp_path, tiny_model_dir, [EVEN])
    teacher = str(make(tmp_path))
    out = tmp_path / "never.jsonl"
    with pytest.raises(BrainforgeError) as caught:
        generate_traces(config, None, teacher, k=2, out=out, limit=None, temperature=None, max_new_tokens=None)
    message = str(caught.value)
    assert "\n" not in message and f"--teacher {teacher}" in message and says in message
    assert "'default'" in message and ".gguf" in message and "run folder" in message
    assert not out.exists()


def test_teacher_that_cannot_be_loaded_is_one_line(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    config = teacher_config(tmp_path, tiny_model_dir, [EVEN])
    with pytest.raises(BrainforgeError) as caught:
        generate_traces(config, None, str(broken), k=2, out=tmp_path / "x.jsonl", limit=None, temperature=None, max_new_tokens=None)
    assert "\n" not in str(caught.value) and f"--teacher {broken}" in str(caught.value)


def test_run_folder_whose_base_is_not_local_is_refused(tmp_path, tiny_model_dir, tokenizer):
    from adapter_fixtures import make_random_adapter

    adapter = make_random_adapter(tmp_path / "run" / "adapter", tiny_model_dir, tokenizer)
    (adapter / "brainforge_adapter.json").write_text(json.dumps({"model": "SomeOrg/remote-base"}))
    config = teacher_config(tmp_path, tiny_model_dir, [EVEN])
    with pytest.raises(BrainforgeError, match="SomeOrg/remote-base.*not on this machine"):
        generate_traces(config, None, str(tmp_path / "run"), k=2, out=tmp_path / "x.jsonl", limit=None,
                        temperature=None, max_new_tokens=None)


def test_existing_out_file_is_refused_and_untouched(tmp_path, tiny_model_dir, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the out file must be checked before the teacher loads")

    monkeypatch.setattr("brainforge.teachers.sampled.load_teacher", no_loading)
    config = teacher_config(tmp_path, tiny_model_dir, [EVEN])
    out = tmp_path / "mine.jsonl"
    out.write_text("my own traces\n")
    with pytest.raises(BrainforgeError, match="mine.jsonl already exists.*--out"):
        generate_traces(config, None, str(tiny_model_dir), k=2, out=out, limit=None, temperature=None, max_new_tokens=None)
    assert out.read_text() == "my own traces\n"


@pytest.mark.parametrize("kwargs, says", [
    ({"k": 0}, "--k 0"),
    ({"limit": 0}, "--limit 0"),
    ({"temperature": -1.0}, "--temperature -1.0"),
    ({"temperature": math.nan}, "--temperature nan"),
    ({"max_new_tokens": 0}, "--max-new-tokens 0"),
])
def test_bad_arguments_are_one_line(tmp_path, tiny_model_dir, kwargs, says):
    config = teacher_config(tmp_path, tiny_model_dir, [EVEN])
    args = {"k": 2, "out": tmp_path / "x.jsonl", "limit": None, "temperature": None, "max_new_tokens": None, **kwargs}
    with pytest.raises(BrainforgeError, match=says.replace("+", r"\+")):
        generate_traces(config, None, str(tiny_model_dir), **args)


def test_a_config_that_is_not_rl_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(BrainforgeError, match="algorithm.name is sft.*RL config"):
        generate_traces(REPO / "configs" / "sft_demo.yaml", None, str(tiny_model_dir), k=2, out=tmp_path / "x.jsonl", limit=None,
                        temperature=None, max_new_tokens=None)


def test_no_prompts_is_an_error(tmp_path, tiny_model_dir):
    config = teacher_config(tmp_path, tiny_model_dir, [EVEN], prompts=0)
    with pytest.raises(BrainforgeError, match="prompts.jsonl"):
        generate_traces(config, None, str(tiny_model_dir), k=2, out=tmp_path / "x.jsonl", limit=None, temperature=None,
                        max_new_tokens=None)


@pytest.mark.slow
def test_default_model_on_two_digit_addition(tmp_path):
    from brainforge.data.traces import load_traces, trace_token_ids
    from brainforge.generation.engine import chat_stop_ids

    out = tmp_path / "arith.jsonl"
    report = generate_traces(REPO / "configs" / "grpo_arithmetic.yaml", None, "default", k=4, out=out, limit=4,
                             temperature=None, max_new_tokens=None)
    assert (report.prompts, report.samples) == (4, 16)
    # The 135M model is right ~6% of the time: it may keep nothing, and then writes no file.
    traces = load_traces(out) if report.kept else []
    assert len(traces) == report.kept and out.exists() == bool(report.kept)
    teacher = load_teacher("default")
    stops = chat_stop_ids(teacher.tokenizer)
    for trace in traces:
        assert trace.reward >= 1.0 and trace.source == "teacher:default"
        assert 0 < len(trace.logprobs) == len(trace.token_ids) <= 32
        assert all(math.isfinite(v) and v <= 0 for v in trace.logprobs)
        if trace.token_ids[-1] in stops:  # a reply that ended its turn: exactly the tokens the trainer renders
            messages = [{"role": "user", "content": trace.prompt}]
            assert trace_token_ids(teacher.tokenizer, teacher.chat_template, messages, trace.response) == trace.token_ids


def test_worked_teacher_writes_a_trace_file_the_trainer_and_cli_read(tmp_path):
    """`--teacher worked:arithmetic` needs no model: the built-in solutions become a normal trace file."""
    from typer.testing import CliRunner

    from brainforge.cli import app
    from brainforge.data.traces import load_traces
    from brainforge.teachers.sampled import generate_traces

    config = Path(__file__).resolve().parents[1] / "configs" / "luffy_arithmetic.yaml"
    out = tmp_path / "worked.jsonl"
    report = generate_traces(config, None, "worked:arithmetic", 1, out, 6, None, None)
    traces = load_traces(out)
    assert report.kept == len(traces) == 6 and all(t.source == "worked:arithmetic" and t.logprobs is None for t in traces)
    assert all(t.response.splitlines()[-1].startswith("Answer: ") for t in traces)
    shown = CliRunner().invoke(app, ["traces", "show", str(out), "--n", "2"])
    assert shown.exit_code == 0 and traces[0].response.splitlines()[0] in shown.output
    again = CliRunner().invoke(app, ["traces", "generate", str(config), "--teacher", "worked:arithmetic", "--out", str(out)])
    assert again.exit_code != 0 and load_traces(out) == traces    # an existing file is never overwritten
