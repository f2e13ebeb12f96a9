"""Merging an adapter into its base, checked before it is declared a success.

The merge runs in fp32 so the only difference between "base + adapter" and "merged" is the
order of floating-point operations; greedy generations from both must then agree on the
check prompts, or the merge is reported as failed and nothing is left in place.

The output folder is the user's: the merge never deletes what it did not write.
- A target that exists and is not empty is refused, before any model is loaded, unless
  `force` is given; even then only a previous merge output (it carries `MARKER`) or an empty
  folder is replaced. A file, the current directory or a folder containing it is refused.
- The model is written to a staging folder beside the target (`.NAME.merge-staging`, marked
  as ours the moment it is created) and renamed into place only once it is complete and
  checked, so an interrupted merge leaves the old target as it was. With `force` the old
  merge is first renamed aside (`.NAME.merge-old`), the new one renamed in, and only then is
  the old one deleted; if the process dies between the two renames, the next merge puts the
  old one back before doing anything else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

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
MARKER = "brainforge_merge.json"
"""Written into every merged model folder; `--force` replaces only folders that carry it."""
_STAGING_MARKER = ".brainforge-merge-staging"


def merge_adapter(run_or_adapter: Path, out_dir: Path | None = None, max_new_tokens: int = 32, save_dtype: str = "bfloat16",
                  force: bool = False) -> Path:
    adapter = run_or_adapter / "adapter" if (run_or_adapter / "adapter").is_dir() else run_or_adapter
    if not (adapter / "adapter_config.json").exists():
        raise ModelError(f"{run_or_adapter}: no adapter found (expected a run folder or an adapter folder)")
    out_dir = Path(os.path.abspath(out_dir or (adapter.parent / "merged")))
    staging, aside = _side_paths(out_dir)
    _restore_interrupted_swap(out_dir, aside)
    _check_target(out_dir, force)
    _clear_stale(staging, _STAGING_MARKER, "an unfinished merge")
    _clear_stale(aside, MARKER, "a replaced merge")

    base_name = adapter_base_model(adapter)
    path = resolve_model_path(base_name)
    tokenizer = load_tokenizer(str(adapter))
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise BrainforgeError(f"--out {out_dir}: cannot create {staging} ({exc.strerror or exc}); choose a writable place") from None
    (staging / _STAGING_MARKER).write_text("a brainforge merge in progress; safe to delete when no merge is running\n")
    try:
        _write_checked_merge(adapter, base_name, path, tokenizer, staging, max_new_tokens, save_dtype)
        (staging / _STAGING_MARKER).unlink()
        (staging / MARKER).write_text(json.dumps({"adapter": str(Path(os.path.abspath(adapter))), "base_model": base_name,
                                                 "dtype": save_dtype}, indent=2) + "\n")
        _swap_in(staging, out_dir, aside)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # ours: created above
        raise
    log.info("merged model written to %s; %d/%d check prompts agree", out_dir, len(CHECK_PROMPTS), len(CHECK_PROMPTS))
    return out_dir


def _side_paths(out_dir: Path) -> tuple[Path, Path]:
    return out_dir.parent / f".{out_dir.name}.merge-staging", out_dir.parent / f".{out_dir.name}.merge-old"


def _check_target(out_dir: Path, force: bool) -> None:
    """Everything that could lose the user's files is refused here, before any loading."""
    cwd = Path.cwd().resolve()
    resolved = out_dir.resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise BrainforgeError(f"--out {out_dir}: that is the current directory (or contains it); a merge replaces its "
                              "target folder, so give a new folder, e.g. --out merged-model")
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise BrainforgeError(f"--out {out_dir}: exists and is not a folder; give a path for a new folder")
        if any(out_dir.iterdir()):
            if not force:
                raise BrainforgeError(f"--out {out_dir}: the folder is not empty; pass --force to replace a previous merge "
                                      "output there, or choose another --out")
            if not (out_dir / MARKER).is_file():
                raise BrainforgeError(f"--out {out_dir}: the folder is not empty and is not a brainforge merge output (no "
                                      f"{MARKER}); --force only replaces earlier merges, so empty it yourself or choose another --out")
    parent = out_dir.parent
    if parent.exists() and not parent.is_dir():
        raise BrainforgeError(f"--out {out_dir}: {parent} is a file, not a folder; choose another --out")


def _clear_stale(folder: Path, marker: str, what: str) -> None:
    """Leftovers of a killed merge are removed only if they carry our marker."""
    if not (folder.exists() or folder.is_symlink()):
        return
    if folder.is_dir() and not folder.is_symlink() and (folder / marker).is_file():
        log.info("removing %s left by %s", folder, what)
        shutil.rmtree(folder)
        return
    raise BrainforgeError(f"{folder} is in the way of the merge and was not written by it; move it away or choose another --out")


def _restore_interrupted_swap(out_dir: Path, aside: Path) -> None:
    """A merge killed between its two renames left the old output aside and none in place."""
    if not out_dir.exists() and (aside / MARKER).is_file():
        log.warning("putting back %s, moved aside by a merge that was interrupted", out_dir)
        os.rename(aside, out_dir)


def _swap_in(staging: Path, out_dir: Path, aside: Path) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        os.rename(staging, out_dir)  # rename(2) replaces an empty folder atomically
        return
    if out_dir.exists():
        os.rename(out_dir, aside)  # a previous merge (checked): kept until the new one is in place
        os.rename(staging, out_dir)
        shutil.rmtree(aside)
        return
    os.rename(staging, out_dir)


def _write_checked_merge(adapter: Path, base_name: str, path: str, tokenizer: Any, staging: Path, max_new_tokens: int,
                         save_dtype: str) -> None:
    with_adapter = load_adapter(load_base_model(ModelConfig(name_or_path=base_name), torch.float32, model_path=path), adapter)
    with_adapter.eval()
    expected = ChatModel(with_adapter, tokenizer).generate(CHECK_PROMPTS, max_new_tokens=max_new_tokens)
    merged = with_adapter.merge_and_unload()
    merged.config.use_cache = True
    merged.to(getattr(torch, save_dtype)).save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))  # carries the training chat template
    del merged, with_adapter

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=torch.float32)
    reloaded.eval()
    got = ChatModel(reloaded, load_tokenizer(str(staging))).generate(CHECK_PROMPTS, max_new_tokens=max_new_tokens)
    mismatches = [(p, e, g) for p, e, g in zip(CHECK_PROMPTS, expected, got) if e != g]
    if mismatches:
        prompt, want, have = mismatches[0]
        raise BrainforgeError(f"merge check failed: for {prompt!r} the adapter says {want!r} but the merged model says {have!r}; nothing was written")
