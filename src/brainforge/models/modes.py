"""Train/eval mode of a model's modules, switched for one pass and restored exactly.

`model.train()` after an eval-mode pass is not a restore: it flips *every* submodule,
including ones that must stay in eval mode (a frozen reference adapter's dropout) and
undoes whatever else the caller had set. Recording each module's flag and putting it
back leaves the model as it was found.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def kept_modes(model: torch.nn.Module) -> Iterator[None]:
    """Whatever the body does to train/eval flags (PEFT's `load_adapter` calls `eval()` on
    the whole model), each module that existed before gets its own flag back; modules
    the body added keep theirs."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the body with every module in eval mode (no dropout), then restore each
    module's own train/eval flag."""
    with kept_modes(model):
        model.eval()
        yield
