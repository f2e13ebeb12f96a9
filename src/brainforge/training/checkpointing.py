"""Crash-safe checkpoints.

A checkpoint is a folder `checkpoints/step-000050/` holding `adapter/` (plain PEFT format)
and `trainer_state.ckpt` (optimizer, scheduler, loop counters, trainable weights). It is
written under a temporary name and renamed into place only when complete, and the
`checkpoints/latest` pointer is replaced atomically after that, so a kill at any moment
leaves the previous checkpoint intact and `latest` pointing at a complete one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.ckpt"


def write_adapter(model: Any, tokenizer: Any, chat_template: str, target: Path, meta: dict[str, Any]) -> None:
    """Save adapter + tokenizer (with the training chat template) into `target`, atomically."""
    for leftover in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # from a write that was cut short (one writer per run)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging))
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(staging))
    (staging / "brainforge_adapter.json").write_text(json.dumps(meta, indent=2))
    _fsync_tree(staging)
    _replace_dir(staging, target)


def _replace_dir(staging: Path, target: Path) -> None:
    """Put the complete folder `staging` in `target`'s place. An existing target is swapped
    with it in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`), so a reader or a kill
    sees the old folder or the new one, never neither; the old one is then deleted. Where the
    kernel or filesystem cannot swap, two renames leave a short window without `target`."""
    if target.exists() and _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the old folder
    elif target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths; False where this platform or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc older than 2.28
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable (a kill does not need this; a power cut does)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_pointer(checkpoints_dir: Path, name: str) -> None:
    """Point `latest` at `name`: written aside, flushed, then renamed over the old pointer."""
    temporary = checkpoints_dir / f".{LATEST}.tmp"
    with temporary.open("w") as handle:
        handle.write(name)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, checkpoints_dir / LATEST)
    _fsync_dir(checkpoints_dir)


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step-"))


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

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # After a resume the state at this step is the checkpoint itself: saving it again
        # would replace the very folder `latest` points at.
        self._last_saved = trainer.global_step
        if trainer.is_global_zero and self.dir.exists():
            for leftover in [*self.dir.glob(".step-*.tmp"), *self.dir.glob(".step-*.deleting")]:  # a save or prune cut short
                shutil.rmtree(leftover, ignore_errors=True)

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
            _replace_dir(staging, self.dir / name)  # complete under its final name ...
            _fsync_dir(self.dir)
            _write_pointer(self.dir, name)  # ... before `latest` names it
            self._prune(step)
            log.info("checkpoint written: %s", self.dir / name)
        trainer.strategy.barrier()

    def _prune(self, step: int) -> None:
        """Keep the newest `keep` checkpoints up to `step` (the one `latest` now names is the
        newest). Folders of later steps are from a run that was killed after writing them but
        before pointing `latest` at them, and this run has resumed from an earlier one: they are
        stale, and keeping them by name order would prune the checkpoint `latest` names."""
        folders = [p for p in self.dir.glob("step-*") if p.is_dir() and p.name.removeprefix("step-").isdigit()]
        kept = sorted((p for p in folders if _step_of(p) <= step), key=_step_of)
        stale = [p for p in folders if _step_of(p) > step]
        for old in kept[: -self.keep] + stale:
            # Renamed out of the way first: a kill halfway through deleting must not leave a
            # half-deleted folder under a checkpoint's name.
            trash = self.dir / f".{old.name}.deleting"
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
