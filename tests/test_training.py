"""End to end on a tiny model: the run folder, resume after a kill, DDP, merge."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import write_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "400"}  # no wrapped log lines


def brainforge(*args, timeout=600, **kwargs):
    return subprocess.run([sys.executable, "-m", "brainforge", *args], capture_output=True, text=True, timeout=timeout, env=ENV, **kwargs)


def run_dirs(tmp_path):
    return sorted((tmp_path / "outputs").iterdir())


# Training children for kill / Ctrl-C tests: output goes to a file (an unread pipe fills and
# blocks the child), waits are on files with generous deadlines (a shared 2-core machine
# under load took 234 s to reach step 2), and the child is always killed in `finally`
# (a leftover 400-step run would slow every later test).
BUSY_MACHINE_S = 900


def start_training(log_path, *args):
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "brainforge", "train", *map(str, args)], env=ENV,
                                stdout=log, stderr=subprocess.STDOUT)


def wait_until(condition, proc, log_path, what, timeout=BUSY_MACHINE_S):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {what}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def pointer_at_least(checkpoints, name):
    def check():
        try:
            return (checkpoints / "latest").read_text() >= name
        except FileNotFoundError:
            return False
    return check


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("run")
    config = write_config(tmp / "tiny.yaml", tiny_model_dir, training={"max_steps": 12, "save_every_n_steps": 5, "learning_rate": 5e-3})
    result = brainforge("train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(tmp)
    return run


def test_run_folder_has_every_output(trained_run):
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/chat_template.jinja",
                 "config.yaml", "metrics.json", "samples.jsonl", "checkpoints/latest"):
        assert (trained_run / name).exists(), name
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["trained_tokens"] > 0 and metrics["val_loss"] is not None
    assert metrics["train_loss_last10_mean"] < metrics["train_loss_first"]  # it learns
    assert metrics["val_loss"] < metrics["val_loss_before"]
    samples = [json.loads(line) for line in (trained_run / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == "Say hi." and isinstance(samples[0]["completion"], str)
    # Checkpoints are pruned to save_total_limit and the pointer names a complete one.
    steps = sorted(p.name for p in (trained_run / "checkpoints").glob("step-*"))
    assert steps == ["step-000010", "step-000012"]
    assert (trained_run / "checkpoints" / "latest").read_text() == "step-000012"


def test_tensorboard_events_hold_the_scalars(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (trained_run / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "train/tokens_per_s"} <= tags
    assert any(tag.startswith("lr-") for tag in tags)


def test_adapter_loads_with_plain_peft(trained_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(trained_run / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(str(trained_run / "adapter"))
    assert tokenizer.chat_template == (trained_run / "adapter" / "chat_template.jinja").read_text()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # it trained (B starts at 0)
    out = model.generate(**tokenizer("hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 1


def test_generate_command(trained_run):
    result = brainforge("generate", "--adapter", str(trained_run), "--max-new-tokens", "4", "Hello there")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ">>> Hello there" in result.stdout


def test_merge_writes_a_plain_transformers_model(trained_run):
    result = brainforge("merge", str(trained_run), "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(trained_run / "merged")
    tokenizer = AutoTokenizer.from_pretrained(trained_run / "merged")
    assert tokenizer.chat_template
    assert merged.generate(**tokenizer("hi", return_tensors="pt"), max_new_tokens=2).shape[1] > 1


@pytest.mark.slow  # two training processes: minutes on a busy 2-core machine
def test_kill_leaves_checkpoint_and_resume_continues(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "killme.yaml", tiny_model_dir,
                          training={"max_steps": 400, "save_every_n_steps": 3, "run_name": "killme", "test_prompts": []})
    checkpoints = tmp_path / "outputs" / "killme" / "checkpoints"
    log_path = tmp_path / "train.log"
    proc = start_training(log_path, config)
    try:
        wait_until(pointer_at_least(checkpoints, "step-000006"), proc, log_path, "checkpoint step-000006")
        proc.send_signal(signal.SIGKILL)
    finally:
        stop(proc)
    latest = checkpoints / (checkpoints / "latest").read_text()
    assert (latest / "trainer_state.ckpt").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(latest / "adapter"))
    state = torch.load(latest / "trainer_state.ckpt", weights_only=False)
    saved_step = state["global_step"]
    assert saved_step >= 6 and all("lora" in k for k in state["state_dict"])

    result = brainforge("train", str(config), "--resume", "--set", f"training.max_steps={saved_step + 3}", timeout=BUSY_MACHINE_S)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs" / "killme" / "metrics.json").read_text())
    assert metrics["steps"] == saved_step + 3


def test_fresh_run_refuses_to_overwrite_named_run(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, training={"max_steps": 2, "run_name": "same", "test_prompts": []})
    assert brainforge("train", str(config)).returncode == 0
    again = brainforge("train", str(config))
    assert again.returncode == 2 and "pass --resume" in again.stderr


def test_ddp_two_cpu_processes(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "ddp.yaml", tiny_model_dir,
                          training={"max_steps": 3, "test_prompts": []},
                          hardware={"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    result = brainforge("train", str(config), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    assert (run / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow  # a training process: minutes on a busy 2-core machine
def test_ctrl_c_keeps_last_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "ctrlc.yaml", tiny_model_dir,
                          training={"max_steps": 400, "save_every_n_steps": 2, "run_name": "ctrlc", "test_prompts": []},
                          logging={"level": "INFO"})
    pointer = tmp_path / "outputs" / "ctrlc" / "checkpoints" / "latest"
    log_path = tmp_path / "train.log"
    proc = start_training(log_path, config)
    try:
        wait_until(pointer.exists, proc, log_path, "first checkpoint")
        proc.send_signal(signal.SIGINT)
        # The product bounds its own shutdown (60 s watchdog); the rest is a loaded machine's slack.
        proc.wait(timeout=300)
    finally:
        stop(proc)
    output = log_path.read_text()
    assert proc.returncode not in (0, -signal.SIGKILL), output[-3000:]
    assert f"continue with: brainforge train {config} --resume" in output  # said at once, with the real path
    assert "the last complete checkpoint is" in " ".join(output.split())
    latest = pointer.parent / pointer.read_text()
    assert (latest / "adapter" / "adapter_model.safetensors").exists() and (latest / "trainer_state.ckpt").exists()
    assert not (tmp_path / "outputs" / "ctrlc" / "adapter").exists()  # no final adapter from a cut run


# A child that trains the tiny model for `steps` steps and, at the start of its second
# step, gets a Ctrl-C that lands inside a finaliser (`__del__`): Python prints "Exception
# ignored in ..." and the KeyboardInterrupt is lost, a way a Ctrl-C could go unheeded for
# a whole run. Prints STEP <n> after every step to its log.
SWALLOWED_CTRL_C = """
import signal, sys
from brainforge.training.sft import LLMTrainingAgent
from brainforge.cli import main

class Finaliser:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)  # the handler runs here, inside __del__

original = LLMTrainingAgent.training_step

def training_step(self, batch, batch_idx):
    if self.global_step == 1:
        Finaliser()  # dropped at once: __del__ runs now
    loss = original(self, batch, batch_idx)
    print("STEP", self.global_step, flush=True)
    return loss

LLMTrainingAgent.training_step = training_step
sys.argv = ["brainforge", "train", sys.argv[1]]
main()
"""


@pytest.mark.slow  # a training process: minutes on a busy 2-core machine
def test_ctrl_c_swallowed_by_a_finaliser_still_stops_the_run(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "swallow.yaml", tiny_model_dir,
                          training={"max_steps": 8, "save_every_n_steps": 100, "run_name": "swallow", "test_prompts": []},
                          data={"val_split": 0})
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", SWALLOWED_CTRL_C, str(config)], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=BUSY_MACHINE_S)
    finally:
        stop(proc)
    output = log_path.read_text()
    assert "Exception ignored" in output and "KeyboardInterrupt" in output, output[-3000:]  # it was swallowed ...
    assert proc.returncode != 0, output[-3000:]  # ... and the run stopped anyway,
    assert "STEP 3" not in output, output[-3000:]  # at the next batch boundary (before step 3), not after 8 steps
    assert not (tmp_path / "outputs" / "swallow" / "adapter").exists()


@pytest.mark.slow  # two interpreters importing Lightning: minutes on a busy 2-core machine
def test_second_ctrl_c_exits_at_once_and_a_stalled_shutdown_is_bounded(tmp_path):
    """Lightning ignores SIGINT once it has caught one; a shutdown that then stalls must still
    end (the watchdog), and a second Ctrl-C must end it at once."""
    script = """
import signal, sys, time
from brainforge.training.interrupt import interrupt_guard
with interrupt_guard("resume hint here", grace_s=float(sys.argv[2])):
    open(sys.argv[1], "w").close()  # ready: the guard is installed
    try:
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        print("graceful shutdown started", flush=True)
        while True:  # a shutdown that never ends
            time.sleep(0.05)
"""
    for grace, second_signal in ((3.0, False), (600.0, True)):
        ready = tmp_path / f"ready-{grace}"
        log_path = tmp_path / f"child-{grace}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-c", script, str(ready), str(grace)], env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(ready.exists, proc, log_path, "the guard")
            proc.send_signal(signal.SIGINT)
            if second_signal:
                wait_until(lambda: "graceful shutdown started" in log_path.read_text(), proc, log_path, "graceful shutdown")
                proc.send_signal(signal.SIGINT)
            proc.wait(timeout=300)  # would block forever without the watchdog / second-signal exit
        finally:
            stop(proc)
        output = log_path.read_text()
        assert proc.returncode == 130, output
        assert ("second interrupt" if second_signal else "shutdown took over 3 s") in output and "resume hint here" in output


def test_max_minutes_ends_the_run_with_every_output(tmp_path, tiny_model_dir):
    """training.max_minutes stops a run long before max_steps; the run still writes its adapter
    and metrics, as after max_steps."""
    import json

    config = write_config(tmp_path / "budget.yaml", tiny_model_dir, training={"max_steps": 500, "max_minutes": 0.0005,
                                                                               "save_every_n_steps": 100})
    result = brainforge("train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    steps = json.loads((run / "metrics.json").read_text())["steps"]
    assert 1 <= steps < 500
