"""Group-relative advantages (ALGORITHMS.md section 2).

Completions arrive grouped: the G completions of one prompt sit next to each other, so a
flat reward vector of length B*G reshapes to [B, G]. The std is the *sample* std (Bessel's
correction), as in TRL and verl; with population std, rewards [1, 0, 0, 1] would give
+-1.0 instead of +-0.866.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: ScaleRewards = "group", eps: float = 1e-4) -> torch.Tensor:
    """Advantage of each completion: its reward minus its group's mean, optionally scaled.

    A NaN reward (every reward function returned None: no verdict) is *excluded*: it does
    not enter its group's mean or std, nor the batch std, and gets advantage 0. (Counting
    it as 0 would hand the scored completions of its group advantages they did not earn:
    [0.5, 0.5, 0.5, None] would give +0.5 to three equal rewards.) A group with fewer than
    two scored completions has no comparison to make: advantages 0. The caller also masks
    such completions out of the loss (see `scored_mask`).

    Args:
        rewards: [B*G] total reward per completion, grouped consecutively; NaN = no reward.
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
    scored = ~torch.isnan(rewards).view(-1, group_size)                                       # [B, G]
    grouped = torch.nan_to_num(rewards.view(-1, group_size).float(), nan=0.0)                  # [B, G]
    count = scored.sum(dim=1, keepdim=True)                                                    # [B, 1]
    mean = grouped.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(scored, grouped - mean, torch.zeros_like(grouped))                   # [B, G]
    if scale == "group":
        # Sample std over the scored members only; 0 (so advantages 0) below two of them.
        variance = (centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        centred = centred / (variance.sqrt() + eps)
    elif scale == "batch":
        values = rewards[~torch.isnan(rewards)].float()
        std = values.std() if values.numel() > 1 else torch.tensor(0.0)
        centred = centred / (std + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    centred = torch.where(count >= 2, centred, torch.zeros_like(centred))
    return centred.reshape(-1).to(rewards.dtype)


def scored_mask(rewards: torch.Tensor) -> torch.Tensor:
    """[N] bool: completions that got a reward (not NaN). The others take no part in the
    loss: no policy-gradient term, no KL term, no tokens in any denominator."""
    return ~torch.isnan(rewards)


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose scored rewards are all equal (NaN = no reward is ignored; a
    group with fewer than two scored completions counts as equal): they carry no
    learning signal."""
    grouped = rewards.view(-1, group_size)
    scored = ~torch.isnan(grouped)
    high = torch.where(scored, grouped, torch.full_like(grouped, -math.inf)).max(dim=1).values
    low = torch.where(scored, grouped, torch.full_like(grouped, math.inf)).min(dim=1).values
    flat = (scored.sum(dim=1) < 2) | (high == low)
    return float(flat.float().mean())
