"""LUFFY, ExGRPO and hybrid end to end on the tiny model: they train, log their own
figures, fail early on bad traces, and the experience buffer survives kill -9 + --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def rl_config(tmp_path, model_dir, algorithm, rewards=None, off_policy=None, experience=None, **training):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(8)))
    config = {
        "model": {"name_or_path": str(model_dir)},
        "peft": {"lora": {"r": 4, "lora_alpha": 8}},
        "data": {"source": {"path": str(prompts), "type": "prompt"}},
        "algorithm": {"name": algorithm, "grpo": {
            "num_generations": 4, "prompts_per_step": 2, "micro_batch_size": 4, "max_new_tokens": 16,
            "temperature": 1.0, "beta": 0.0, "reward_functions": rewards or [{"name": "last_number"}]},
            "off_policy": off_policy or {}, "experience": experience or {}},
        "training": {"output_dir": str(tmp_path / "outputs"), "max_steps": 3, "learning_rate": 1e-2,
                     "save_every_n_steps": 2, "test_prompts": [], **training},
    }
    path = tmp_path / f"{algorithm}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_traces(tmp_path, rows):
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def brainforge(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "brainforge", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in (run / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found[tag] = [e.value for e in acc.Scalars(tag)]
    return found


def good_traces(tmp_path):
    return write_traces(tmp_path, [{"prompt": f"What is {i} + {i}?", "response": f"{i} and {i} make {2 * i}.", "source": "test"}
                                   for i in range(8)])


def test_luffy_trains_and_logs_the_mixed_loss(tmp_path, tiny_model_dir):
    config = rl_config(tmp_path, tiny_model_dir, "luffy", off_policy={"traces": [str(good_traces(tmp_path))]})
    result = brainforge("train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kept 8 traces for 8 of 8 prompts" in result.stderr + result.stdout
    (run,) = list((tmp_path / "outputs").iterdir())
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    found = scalars(run)
    for tag in ("off_policy/on_loss", "off_policy/off_loss", "off_policy/token_share", "off_policy/trace_prob_mean",
                "reward/on_policy_mean", "reward/off_policy_mean", "off_policy/samples"):
        assert tag in found, tag
    assert all(v == 2.0 for v in found["off_policy/samples"])           # one trace in each of the 2 groups
    assert all(v == 1.0 for v in found["reward/off_policy_mean"])       # the traces are right
    assert all(0 < v < 1 for v in found["off_policy/token_share"])
    assert all(v != 0 for v in found["off_policy/off_loss"])            # positive advantage on trace tokens
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["algorithm"]["grpo"]["scale_rewards"] == "none" and saved["algorithm"]["grpo"]["loss_type"] == "dr_grpo"


def test_luffy_without_usable_traces_fails_before_the_model_loads(tmp_path):
    missing_model = tmp_path / "no-such-model"     # loading it would fail with a model error: traces are checked first
    empty = write_traces(tmp_path, [])
    result = brainforge("train", str(rl_config(tmp_path, missing_model, "luffy", off_policy={"traces": [str(empty)]})))
    assert result.returncode == 2 and "traces" in result.stderr and "no-such-model" not in result.stderr, result.stderr[-2000:]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "What is 1 + 1?", "response": "2"}) + "\n{not json\n")
    result = brainforge("train", str(rl_config(tmp_path, missing_model, "luffy", off_policy={"traces": [str(bad)]})))
    assert result.returncode == 2 and f"{bad}:2" in result.stderr, result.stderr[-2000:]
    result = brainforge("train", str(rl_config(tmp_path, missing_model, "luffy")))
    assert result.returncode == 2 and "algorithm.off_policy.traces" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_traces_for_no_prompt_or_too_long_are_counted(tmp_path, tiny_model_dir):
    rows = [{"prompt": "What is 1 + 1?", "response": "1 and 1 make 2."},
            {"prompt": "What is 2 + 2?", "response": "four " * 40 + "4"},          # longer than max_new_tokens: dropped
            {"prompt": "What is 3 + 3?", "response": "3 and 3 make 7."},           # wrong: dropped by default
            {"prompt": "A question nobody asked", "response": "42"}]
    config = rl_config(tmp_path, tiny_model_dir, "luffy", off_policy={"traces": [str(write_traces(tmp_path, rows))]}, max_steps=1)
    result = brainforge("train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    log = " ".join((result.stderr + result.stdout).split())
    assert "1 dropped, 0 cut" in log and "1 (dropped)" in log and "kept 1 traces for 1 of 8 prompts" in log, log[-3000:]


def wait_for(predicate, process, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return predicate()
        time.sleep(0.2)
    return False


def buffer_of(checkpoint_dir):
    state = torch.load(checkpoint_dir / "trainer_state.ckpt", map_location="cpu", weights_only=False)
    return state["brainforge"]["experience"], state["brainforge"]["history"]


@pytest.mark.slow
def test_experience_buffer_survives_kill_9_and_resume(tmp_path, tiny_model_dir):
    config = rl_config(tmp_path, tiny_model_dir, "exgrpo", rewards=[{"name": "reward_fixtures.even_length_reward"}],
                       experience={"start_solve_rate": 0.1}, max_steps=8, run_name="ex")
    checkpoints = tmp_path / "outputs" / "ex" / "checkpoints"
    process = subprocess.Popen([sys.executable, "-m", "brainforge", "train", str(config)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (checkpoints / "latest").exists() and (checkpoints / "latest").read_text().strip() == "step-000004", process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    saved, history = buffer_of(latest)
    assert saved["active"] and saved["entries"], "the buffer was active and held questions at the checkpoint"

    result = brainforge("train", str(config), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    final, history = buffer_of(checkpoints / "step-000008")
    assert [h["step"] for h in history] == sorted({h["step"] for h in history})          # history restored, not restarted
    assert any(h.get("experience/replayed_prompts", 0) > 0 and h.get("off_policy/samples", 0) > 0 for h in history)
    restored = [line for line in (result.stderr + result.stdout).splitlines() if "experience buffer restored" in line]
    assert restored and f"{len(saved['entries'])} questions" in restored[0], restored


@pytest.mark.slow
def test_resume_with_an_incompatible_buffer_says_what_differs(tmp_path, tiny_model_dir):
    config = rl_config(tmp_path, tiny_model_dir, "exgrpo", rewards=[{"name": "reward_fixtures.even_length_reward"}],
                       experience={"start_solve_rate": 0.1}, max_steps=2, run_name="ex")
    assert brainforge("train", str(config)).returncode == 0
    raw = yaml.safe_load(config.read_text())
    raw["algorithm"]["experience"]["lbound"] = 1
    raw["training"]["max_steps"] = 4
    config.write_text(yaml.safe_dump(raw))
    result = brainforge("train", str(config), "--resume")
    assert result.returncode == 2 and "lbound" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_hybrid_mixes_traces_and_replay(tmp_path, tiny_model_dir):
    traces = write_traces(tmp_path, [{"prompt": f"What is {i} + {i}?", "response": f"We add: {2 * i} {2 * i}"} for i in range(8)])
    config = rl_config(tmp_path, tiny_model_dir, "hybrid", rewards=[{"name": "reward_fixtures.even_length_reward"}],
                       off_policy={"traces": [str(traces)]}, experience={"start_solve_rate": 0.1}, max_steps=4)
    result = brainforge("train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = list((tmp_path / "outputs").iterdir())
    found = scalars(run)
    assert "experience/size" in found and "off_policy/samples" in found
    assert max(found["experience/replayed_prompts"]) >= 1
