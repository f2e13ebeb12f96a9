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

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def brainforge(*args, timeout=600, **kwargs):
    return subprocess.run([sys.executable, "-m", "brainforge", *args], capture_output=True, text=True, timeout=timeout, env=ENV, **kwargs)


def run_dirs(tmp_path):
    return sorted((tmp_path / "outputs").iterdir())


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


def test_kill_leaves_checkpoint_and_resume_continues(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "killme.yaml", tiny_model_dir,
                          training={"max_steps": 400, "save_every_n_steps": 3, "run_name": "killme", "test_prompts": []})
    proc = subprocess.Popen([sys.executable, "-m", "brainforge", "train", str(config)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "outputs" / "killme" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "latest").exists() or (checkpoints / "latest").read_text() < "step-000006":
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = checkpoints / (checkpoints / "latest").read_text()
    assert (latest / "trainer_state.ckpt").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(latest / "adapter"))
    state = torch.load(latest / "trainer_state.ckpt", weights_only=False)
    saved_step = state["global_step"]
    assert saved_step >= 6 and all("lora" in k for k in state["state_dict"])

    result = brainforge("train", str(config), "--resume", "--set", f"training.max_steps={saved_step + 3}")
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


def test_ctrl_c_keeps_last_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "ctrlc.yaml", tiny_model_dir,
                          training={"max_steps": 400, "save_every_n_steps": 2, "run_name": "ctrlc", "test_prompts": []},
                          logging={"level": "INFO"})
    proc = subprocess.Popen([sys.executable, "-m", "brainforge", "train", str(config)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pointer = tmp_path / "outputs" / "ctrlc" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not pointer.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "--resume" in output
    latest = pointer.parent / pointer.read_text()
    assert (latest / "adapter" / "adapter_model.safetensors").exists() and (latest / "trainer_state.ckpt").exists()
    assert not (tmp_path / "outputs" / "ctrlc" / "adapter").exists()  # no final adapter from a cut run
