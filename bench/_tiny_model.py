"""A tiny randomly initialised Llama with the default model's real tokenizer, for benches that
measure machinery (checkpoints, resume, kills) rather than learning: a step takes a fraction
of a second, so a time-bounded bench gets many steps and many kills.

The recipe is `brainforge.models.tiny`, shared with the `tiny_model_dir` test fixture;
this adds only the build-once marker.
"""

from __future__ import annotations

from pathlib import Path

COMPLETE = ".tiny-complete"


def build_tiny_model(folder: Path) -> Path:
    """Write the tiny model into `folder` (once; reused when already complete) and return it."""
    if (folder / COMPLETE).exists():
        return folder
    from brainforge.models.gguf import ensure_default_model
    from brainforge.models.loader import load_tokenizer
    from brainforge.models.tiny import save_tiny_llama

    save_tiny_llama(folder, load_tokenizer(str(ensure_default_model())))
    (folder / COMPLETE).write_text("ok")
    return folder
