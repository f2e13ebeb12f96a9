"""What LUFFY and ExGRPO change in the GRPO loss: how an off-policy token is weighted.

A group may hold samples the policy did not draw: a teacher's trace (LUFFY, ALGORITHMS.md
section 3) or one of the model's own past successes replayed (ExGRPO, section 4). Their
tokens (`prefix_mask` = 1) get the term

    l = -A * f(w),   f(w) = w / (w + gamma),   w = pi_theta / pi_behaviour

* LUFFY: the teacher's probability is unknown and taken as 1, so w = pi_theta itself.
  Recomputing pi_old for trace tokens instead would give a ratio of ~1 and turn the term
  into SFT scaled by A; here the gradient flows *through* f(pi_theta): d f / d log pi =
  pi * gamma / (pi + gamma)^2, largest (0.25) at pi = gamma, so the rare tokens of a trace
  are pushed up hardest and those the model already predicts barely move.
* A trace made by a teacher with this model's tokenizer carries its per-token log-probs,
  and ExGRPO replays carry the log-probs recorded when they were sampled: then w is the real
  importance ratio (w = 1 gives f = 1/1.1 = 0.909).

No clipping: with a behaviour probability of 1 the "ratio" is always <= 1, and a PPO clip
at 1 - epsilon would zero the gradient of most teacher tokens. Nothing is detached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OffPolicyLoss:
    gamma: float = 0.1
    """Shaping constant of f(w) = w / (w + gamma)."""
    on_scale: float = 1.0
    """Multiplier of the on-policy policy-gradient term (2 * on_weight / (on_weight + off_weight))."""
    off_scale: float = 1.0
    """Multiplier of the off-policy term (2 * off_weight / (on_weight + off_weight))."""

    @classmethod
    def from_weights(cls, gamma: float, on_weight: float, off_weight: float) -> "OffPolicyLoss":
        """The config's relative weights, normalised to sum to 2: 0.5 / 0.5 is LUFFY's loss."""
        total = on_weight + off_weight
        return cls(gamma=gamma, on_scale=2 * on_weight / total, off_scale=2 * off_weight / total)


def shaping(w: torch.Tensor, gamma: float) -> torch.Tensor:
    """f(w) = w / (w + gamma): policy shaping of the off-policy weight."""
    return w / (w + gamma)


def off_policy_weight(logps: torch.Tensor, behaviour_logps: torch.Tensor | None) -> torch.Tensor:
    """w = pi_theta / pi_behaviour per token, with gradient through pi_theta. A NaN (or
    absent) behaviour log-prob means "unknown": the behaviour probability is taken as 1."""
    if behaviour_logps is None:
        return torch.exp(logps)
    behaviour = torch.nan_to_num(behaviour_logps.to(device=logps.device, dtype=logps.dtype), nan=0.0)
    return torch.exp(logps - behaviour)


def off_policy_token_loss(logps: torch.Tensor, advantages: torch.Tensor, behaviour_logps: torch.Tensor | None,
                          gamma: float) -> torch.Tensor:
    """[N, T] per-token loss -A * f(w) of off-policy tokens (the caller masks it to them)."""
    return -advantages * shaping(off_policy_weight(logps, behaviour_logps), gamma)
