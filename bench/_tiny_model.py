"""A tiny randomly initialised Llama with the default model's real tokenizer, for benches that
measure machinery (checkpoints, resume, kills) rather than learning: a step takes a fraction
of a second, so a time-bounded bench gets many steps and many kills.

Same recipe as the `tiny_model_dir` test fixture (tests/conftest.py); kept here so a bench
never imports from tests/.
"""

from __future__ import annotations

from pathlib import Path

COMPLETE = ".tiny-complete"


def build_tiny_model(folder: Path) -> Path:
    """Write the tiny model into `folder` (once; reused when already complete) and return it."""
    if (folder / COMPLETE).exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from brainforge.models.gguf import ensure_default_model
    from brainforge.models.loader import load_tokenizer

    tokenizer = load_tokenizer(str(ensure_default_model()))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / COMPLETE).write_text("ok")
    return folder
