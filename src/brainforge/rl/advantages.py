"""Group-relative advantages (ALGORITHMS.md section 2).

Completions arrive grouped: the G completions of one prompt sit next to each other, so a
flat reward vector of length B*G reshapes to [B, G]. The std is the *sample* std (Bessel's
correction), as in TRL and verl; with population std, rewards [1, 0, 0, 1] would give
+-1.0 instead of +-0.866.
"""

from __future__ import annotations

from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: ScaleRewards = "group", eps: float = 1e-4) -> torch.Tensor:
    """Advantage of each completion: its reward minus its group's mean, optionally scaled.

    Args:
        rewards: [B*G] total reward per completion, grouped consecutively. NaN (no reward
            function applied) gets advantage 0.
        group_size: G, completions per prompt (>= 2).
        scale: "group" divides by the group's std, "batch" by the whole batch's std,
            "none" does not divide (Dr. GRPO).
    Returns:
        [B*G] advantages; each group's advantages sum to 0.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to compare completions, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    missing = torch.isnan(rewards)
    grouped = torch.where(missing, torch.zeros_like(rewards), rewards).view(-1, group_size)   # [B, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)                                      # [B, G]
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (grouped.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return centred.reshape(-1).masked_fill(missing, 0.0)


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal: they carry no learning signal."""
    grouped = rewards.view(-1, group_size)
    return float((grouped.max(dim=1).values - grouped.min(dim=1).values == 0).float().mean())
