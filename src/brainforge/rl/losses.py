"""The GRPO objective over tensors: clipped surrogate, k3 KL, loss aggregation.

Shapes: N completions (B prompts x G), T completion tokens (padded). All per-token inputs
are [N, T]; `mask` is 1 on tokens that get a gradient (0 on padding, on tool/retrieved
tokens, and on whole truncated completions when those are masked).

Aggregation modes differ only in the denominator (ALGORITHMS.md section 2):
    grpo     mean over sequences of (sum_t m*l / sum_t m)   -- length-biased
    bnpo     sum m*l / sum m over this micro-batch
    dapo     sum m*l / (active tokens of the whole accumulated batch / num_processes)
    dr_grpo  sum m*l / (N * max_completion_length)          -- constant
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: >= 0, and 0 with zero
    gradient where the two log-probs are equal."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass(frozen=True)
class GRPOLossConfig:
    epsilon_low: float = 0.2
    """Lower clip: for negative advantages the ratio stops mattering below 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """Upper clip: for positive advantages the ratio stops mattering above 1 + epsilon_high
    (DAPO's clip-higher uses 0.28)."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference policy, added per token to the loss."""
    loss_type: LossType = "dapo"
    max_completion_length: int = 256
    """Dr. GRPO's constant denominator per sequence."""


def grpo_loss(
    logps: torch.Tensor,                   # [N, T] log pi_theta of the sampled tokens
    advantages: torch.Tensor,              # [N]
    mask: torch.Tensor,                    # [N, T] float 0/1
    config: GRPOLossConfig,
    old_logps: torch.Tensor | None = None,  # [N, T]; None means on-policy (ratio exactly 1)
    ref_logps: torch.Tensor | None = None,  # [N, T]; needed when beta > 0
    active_tokens_global: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss to minimise and detached statistics."""
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)                                                    # [N, T]
    adv = advantages.unsqueeze(1)                                                     # [N, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - config.epsilon_low, 1 + config.epsilon_high) * adv
    per_token = -torch.min(unclipped, clipped)                                        # [N, T]
    kl = None
    if config.beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = k3_kl(logps, ref_logps)                                                  # [N, T]
        per_token = per_token + config.beta * kl

    loss = aggregate(per_token, mask, config, active_tokens_global)

    with torch.no_grad():
        is_clipped = ((ratio < 1 - config.epsilon_low) & (adv < 0)) | ((ratio > 1 + config.epsilon_high) & (adv > 0))
        stats = {
            "clip_fraction": float(masked_mean(is_clipped.to(mask.dtype), mask)),
            "ratio_mean": float(masked_mean(ratio, mask)),
            "kl": float(masked_mean(kl, mask)) if kl is not None else 0.0,
        }
    return loss, stats


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, config: GRPOLossConfig, active_tokens_global: float | None = None) -> torch.Tensor:
    masked = per_token * mask
    if config.loss_type == "grpo":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if config.loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1)
    if config.loss_type == "dapo":
        denominator = active_tokens_global if active_tokens_global is not None else float(mask.sum())
        return masked.sum() / max(denominator, 1.0)
    if config.loss_type == "dr_grpo":
        return masked.sum() / (per_token.shape[0] * config.max_completion_length)
    raise ValueError(f"unknown loss_type {config.loss_type!r}; use grpo, bnpo, dapo or dr_grpo")


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_length - cache, then a linear ramp to -1
    at max_length, and -1 beyond."""
    lengths = lengths.float()
    start = max_length - cache
    ramp = (start - lengths) / cache
    return torch.where(lengths <= start, torch.zeros_like(lengths), torch.where(lengths <= max_length, ramp, -torch.ones_like(lengths)))
