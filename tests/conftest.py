"""Shared fixtures: a tiny randomly initialised Llama with the default model's real
tokenizer (so chat templates and masks are the real ones), built in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from brainforge.models.gguf import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path):
    from brainforge.models.loader import load_tokenizer

    return load_tokenizer(str(default_model_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    from brainforge.models.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def write_config(path: Path, model: Path | str, **sections) -> Path:
    """A small SFT config on the bundled samples, with section overrides."""
    config = {
        "model": {"name_or_path": str(model)},
        "peft": {"lora": {"r": 4, "lora_alpha": 8}},
        "datasets": {
            "multi_source_enabled": True,
            "sources": [
                {"name": "sample:chat", "type": "chat", "weight": 0.5, "max_samples": 16},
                {"name": "sample:coding", "type": "coding", "weight": 0.5, "max_samples": 16},
            ],
        },
        "data": {"max_seq_length": 192, "val_split": 0.1},
        "training": {
            "output_dir": str(path.parent / "outputs"), "max_steps": 4, "per_device_batch_size": 2,
            "learning_rate": 1e-3, "save_every_n_steps": 2, "test_prompts": ["Say hi."], "sample_max_new_tokens": 8,
        },
        "logging": {"level": "WARNING"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path
