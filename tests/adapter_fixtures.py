"""A brainforge-style adapter folder for tests that need an adapter which visibly changes outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def make_random_adapter(folder: Path, model_dir: Path, tokenizer: Any, seed: int = 1) -> Path:
    """Adapter weights with large random LoRA B (a fresh adapter has B = 0 and changes nothing),
    the tokenizer and the meta file, as `brainforge train` writes them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (Path(folder) / "brainforge_adapter.json").write_text(json.dumps({"model": str(model_dir)}))
    return Path(folder)
