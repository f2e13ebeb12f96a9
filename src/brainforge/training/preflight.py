"""Checks a training run passes before any model loads: `config validate` and `train` run them.

Each failure here used to surface minutes into a run, or as a traceback: an `output_dir`
that is a file (or under one, or on a read-only filesystem) failed at the first checkpoint;
a damaged adapter to continue from failed inside PEFT; a run too large for the machine
failed in the allocator. Now each is a one-line `BrainforgeError` naming the key and the fix.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from brainforge.config import BrainforgeConfig
from brainforge.errors import ConfigError
from brainforge.training.estimate import MemoryEstimate, check_memory


def preflight(config: BrainforgeConfig, available: int | None = None) -> MemoryEstimate | None:
    """Output folder, adapters, memory; returns the memory estimate (None: model not local)."""
    check_output_dir(Path(config.training.output_dir))
    from brainforge.models.loader import check_adapter_folder

    if config.model.adapter_path:
        check_adapter_folder(config.model.adapter_path)
    if config.algorithm.is_rl and config.algorithm.grpo.reference_adapter:
        check_adapter_folder(config.algorithm.grpo.reference_adapter)
    return check_memory(config, available)


def check_output_dir(output_dir: Path) -> None:
    """`training.output_dir` is (or can be created as) a writable folder; nothing is created here."""
    key = "training.output_dir"
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{key}: {output_dir} is a file, not a folder; choose a folder path (it is created if missing)")
    existing = output_dir
    while not existing.exists():
        parent = existing.parent
        if parent == existing:
            break
        existing = parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {output_dir} cannot be created because {existing} is a file; choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {existing} is not writable (permissions or a read-only filesystem); "
                          f"choose a folder you can write to")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP):
            raise ConfigError(f"{key}: cannot inspect {existing} ({exc.strerror})") from None
        read_only = False
    if read_only:
        raise ConfigError(f"{key}: {existing} is on a read-only filesystem; choose a folder you can write to")
