"""Crash-safe checkpoints.

A checkpoint is a folder `checkpoints/step-000050/` holding `adapter/` (plain PEFT format)
and `trainer_state.ckpt` (optimizer, scheduler, loop counters, trainable weights). It is
written under a temporary name and renamed into place only when complete, and the
`checkpoints/latest` pointer is replaced atomically after that, so a kill at any moment
leaves the previous checkpoint intact and `latest` pointing at a complete one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.ckpt"


def write_adapter(model: Any, tokenizer: Any, chat_template: str, target: Path, meta: dict[str, Any]) -> None:
    """Save adapter + tokenizer (with the training chat template) into `target`, atomically."""
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging))
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(staging))
    (staging / "brainforge_adapter.json").write_text(json.dumps(meta, indent=2))
    _fsync_tree(staging)
    _replace_dir(staging, target)


def _replace_dir(staging: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def keep_trainable_state(model: Any, checkpoint: dict[str, Any]) -> None:
    """Strip frozen base weights from a Lightning checkpoint: they are reloaded from the
    base model on resume, and would make every checkpoint as large as the model."""
    trainable = {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    pointer = checkpoints_dir / LATEST
    if not pointer.exists():
        return None
    candidate = checkpoints_dir / pointer.read_text().strip()
    return candidate if (candidate / STATE_FILE).exists() else None


class AdapterCheckpoint(L.Callback):
    """Every N optimizer steps, and at the end: an atomic step checkpoint."""

    def __init__(self, checkpoints_dir: Path, every_n_steps: int, keep: int, tokenizer: Any, chat_template: str, meta: dict[str, Any]):
        self.dir = checkpoints_dir
        self.every = every_n_steps
        self.keep = keep
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.meta = meta
        self._last_saved = -1

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.save(trainer, module)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        # Nothing is saved here: the step in flight may be half done. The last complete
        # checkpoint is untouched by construction.
        latest = latest_checkpoint(self.dir)
        where = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was completed yet"
        log.warning("training stopped at step %d (%s); %s. Continue with: brainforge train CONFIG --resume",
                    trainer.global_step, type(exception).__name__, where)

    def save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_saved or step == 0:
            return
        self._last_saved = step
        name = f"step-{step:06d}"
        staging = self.dir / f".{name}.tmp"
        if trainer.is_global_zero:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        trainer.strategy.barrier()
        # Every rank calls save_checkpoint (it synchronises); only rank 0 writes.
        trainer.save_checkpoint(staging / STATE_FILE)
        if trainer.is_global_zero:
            write_adapter(module.model, self.tokenizer, self.chat_template, staging / "adapter", {**self.meta, "step": step})
            _fsync_tree(staging)
            _replace_dir(staging, self.dir / name)
            pointer_tmp = self.dir / f".{LATEST}.tmp"
            pointer_tmp.write_text(name)
            os.replace(pointer_tmp, self.dir / LATEST)
            self._prune()
            log.info("checkpoint written: %s", self.dir / name)
        trainer.strategy.barrier()

    def _prune(self) -> None:
        steps = sorted(p for p in self.dir.glob("step-*") if p.is_dir())
        for old in steps[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
