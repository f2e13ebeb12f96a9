"""A tiny randomly initialised Llama carrying a real tokenizer.

For tests and for benches that measure machinery (checkpoints, resume, kills) rather than
learning: it builds in seconds and a step takes a fraction of a second, while the real
tokenizer keeps chat templates and loss masks the real ones. One recipe, so the test
fixture and the benches train the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_tiny_llama(folder: Path, tokenizer: Any, seed: int = 0) -> Path:
    """Write a 2-layer, 64-wide Llama sized to `tokenizer`'s vocabulary (and the tokenizer)
    into `folder`, initialised from `seed`; returns `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
