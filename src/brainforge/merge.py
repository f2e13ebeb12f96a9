"""Merging an adapter into its base, checked before it is declared a success.

The merge runs in fp32 so the only difference between "base + adapter" and "merged" is the
order of floating-point operations; greedy generations from both must then agree on the
check prompts, or the merge is reported as failed and nothing is left in place.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from brainforge.config import ModelConfig
from brainforge.errors import BrainforgeError, ModelError
from brainforge.inference import ChatModel
from brainforge.models.loader import adapter_base_model, load_adapter, load_base_model, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)

CHECK_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that adds two numbers.",
    "Give me one tip for learning a new language.",
]


def merge_adapter(run_or_adapter: Path, out_dir: Path | None = None, max_new_tokens: int = 32, save_dtype: str = "bfloat16") -> Path:
    adapter = run_or_adapter / "adapter" if (run_or_adapter / "adapter").is_dir() else run_or_adapter
    if not (adapter / "adapter_config.json").exists():
        raise ModelError(f"{run_or_adapter}: no adapter found (expected a run folder or an adapter folder)")
    out_dir = out_dir or (adapter.parent / "merged")
    base_name = adapter_base_model(adapter)
    path = resolve_model_path(base_name)
    tokenizer = load_tokenizer(str(adapter))

    with_adapter = load_adapter(load_base_model(ModelConfig(name_or_path=base_name), torch.float32, model_path=path), adapter)
    with_adapter.eval()
    expected = ChatModel(with_adapter, tokenizer).generate(CHECK_PROMPTS, max_new_tokens=max_new_tokens)
    merged = with_adapter.merge_and_unload()
    merged.config.use_cache = True

    staging = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    merged.to(getattr(torch, save_dtype)).save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))  # carries the training chat template
    del merged, with_adapter

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=torch.float32)
    reloaded.eval()
    got = ChatModel(reloaded, load_tokenizer(str(staging))).generate(CHECK_PROMPTS, max_new_tokens=max_new_tokens)
    mismatches = [(p, e, g) for p, e, g in zip(CHECK_PROMPTS, expected, got) if e != g]
    if mismatches:
        shutil.rmtree(staging, ignore_errors=True)
        prompt, want, have = mismatches[0]
        raise BrainforgeError(f"merge check failed: for {prompt!r} the adapter says {want!r} but the merged model says {have!r}; nothing was written")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    log.info("merged model written to %s; %d/%d check prompts agree", out_dir, len(CHECK_PROMPTS), len(CHECK_PROMPTS))
    return out_dir
