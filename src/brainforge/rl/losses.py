"""The GRPO objective over tensors: clipped surrogate, k3 KL, loss aggregation.

Shapes: N completions (B prompts x G), T completion tokens (padded). All per-token inputs
are [N, T]; `mask` is 1 on tokens that get a gradient (0 on padding, on tool/retrieved
tokens, and on whole truncated completions when those are masked).

Aggregation modes differ only in the denominator (ALGORITHMS.md section 2). Every
denominator is a *whole-step* quantity (`StepTotals`), so splitting a step into
micro-batches changes neither the loss nor its gradient, whatever the mode:
    grpo     sum over sequences of (sum_t m*l / sum_t m) / N            -- length-biased
    bnpo     sum m*l / active tokens of this process's whole step batch
    dapo     sum m*l / (active tokens of the step on all processes / num_processes)
    dr_grpo  sum m*l / (N * max_completion_length)                     -- constant per row
N is the number of completions that take part (a completion with no reward, NaN, takes no
part: mask 0 and not counted; a masked truncated completion still counts, as in TRL), over
all processes / num_processes. DDP averages gradients over processes, so dapo, grpo and
dr_grpo give the single-process result on the union of the processes' batches. bnpo is the
one mode normalised per process (TRL's bnpo normalises per micro-batch, which made the
result depend on micro_batch_size); on one process it equals dapo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from brainforge.rl.off_policy import OffPolicyLoss, off_policy_token_loss

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
    clip: bool = True
    """Clip the (on-policy) ratio; the LUFFY recipe turns this off."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss subtracts entropy_coef x the step's mean token entropy."""
    off_policy: OffPolicyLoss | None = None
    """How tokens marked off-policy (`prefix_mask`) are weighted (LUFFY / ExGRPO); None: GRPO."""


@dataclass(frozen=True)
class StepTotals:
    """Whole-step quantities that micro-batch losses are normalised by, so that the
    micro-batch losses of a step add up to the step's loss however it is split."""

    rows: int
    """Completions that take part in this process's step batch (those with a reward)."""
    tokens: float
    """Active (mask = 1) completion tokens in this process's step batch."""
    rows_global: int
    """`rows` summed over all processes (= rows on one process)."""
    tokens_global: float
    """`tokens` summed over all processes (= tokens on one process)."""
    world_size: int = 1

    @classmethod
    def of(cls, mask: torch.Tensor, rows: int | None = None) -> "StepTotals":
        """Totals of a step batch's [N, T] loss mask (`rows`: how many of its N rows take
        part; default N). Under torch.distributed the counts are summed over all processes,
        so every process must call this once per step."""
        counts = [float(mask.shape[0] if rows is None else rows), float(mask.sum())]
        world, global_counts = 1, counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                device = mask.device
                if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
                    device = torch.device("cuda", torch.cuda.current_device())
                summed = torch.tensor(counts, dtype=torch.float64, device=device)
                torch.distributed.all_reduce(summed)
                global_counts = summed.tolist()
        return cls(rows=int(counts[0]), tokens=counts[1], rows_global=int(global_counts[0]), tokens_global=global_counts[1],
                   world_size=world)


def grpo_loss(
    logps: torch.Tensor,                   # [N, T] log pi_theta of the sampled tokens
    advantages: torch.Tensor,              # [N]
    mask: torch.Tensor,                    # [N, T] float 0/1
    config: GRPOLossConfig,
    old_logps: torch.Tensor | None = None,  # [N, T]; None means on-policy (ratio exactly 1)
    ref_logps: torch.Tensor | None = None,  # [N, T]; needed when beta > 0
    active_tokens_global: float | None = None,
    totals: StepTotals | None = None,
    prefix_mask: torch.Tensor | None = None,       # [N, T] bool: off-policy (trace / replay) tokens
    behaviour_logps: torch.Tensor | None = None,   # [N, T] their behaviour log-probs; NaN = unknown (prob 1)
    entropy: torch.Tensor | None = None,           # [N, T] token entropies with grad (entropy_coef > 0)
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss to minimise and detached statistics (means over this call's active tokens,
    and `tokens`, their count, to weight them when averaging over micro-batches).

    `totals` describes the whole step this call is a micro-batch of; without it the call
    is its own step (and `active_tokens_global`, if given, is dapo's global token count).

    On-policy tokens get the (optionally clipped) ratio term; tokens in `prefix_mask` get
    the off-policy term of `config.off_policy` (see off_policy.py) instead. Both share one
    denominator, so with no off-policy token this is exactly the GRPO loss."""
    mask = mask.to(device=logps.device, dtype=logps.dtype)  # rollout tensors live on the CPU
    old = logps.detach() if old_logps is None else old_logps.to(logps.device)
    ratio = torch.exp(logps - old)                                                    # [N, T]
    adv = advantages.to(device=logps.device, dtype=logps.dtype).unsqueeze(1)          # [N, 1]
    unclipped = ratio * adv
    if config.clip:
        clipped = torch.clamp(ratio, 1 - config.epsilon_low, 1 + config.epsilon_high) * adv
        on_policy = -torch.min(unclipped, clipped)                                    # [N, T]
    else:
        on_policy = -unclipped
    off = torch.zeros_like(mask) if prefix_mask is None else prefix_mask.to(device=logps.device, dtype=logps.dtype)
    on = mask * (1 - off)                                                             # [N, T] on-policy active tokens
    off = mask * off                                                                  # [N, T] off-policy active tokens
    shaping = config.off_policy or OffPolicyLoss()
    on_policy = torch.where(on > 0, on_policy, torch.zeros_like(on_policy))           # no NaN leaks from off-policy/padding rows
    per_token = shaping.on_scale * on_policy * on if config.off_policy else on_policy * on
    off_policy = None
    if prefix_mask is not None and bool(off.any()):
        if config.off_policy is None:
            raise ValueError("off-policy tokens (prefix_mask) need config.off_policy")
        off_policy = off_policy_token_loss(logps, adv, behaviour_logps, shaping.gamma)   # [N, T]
        per_token = per_token + shaping.off_scale * off_policy * off
    pg_only = per_token
    kl = None
    if config.beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = k3_kl(logps, ref_logps.to(logps.device))                                 # [N, T]
        per_token = per_token + config.beta * kl

    loss = aggregate(per_token, mask, config, active_tokens_global, totals=totals)
    if config.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs token entropies with gradient")
        loss = loss - config.entropy_coef * mean_over_step(entropy, mask, totals, active_tokens_global)

    with torch.no_grad():
        is_clipped = ((ratio < 1 - config.epsilon_low) & (adv < 0)) | ((ratio > 1 + config.epsilon_high) & (adv > 0))
        stats = {
            "clip_fraction": float(masked_mean(is_clipped.to(mask.dtype), on)) if config.clip else 0.0,
            "ratio_mean": float(masked_mean(ratio, on)),
            "kl": float(masked_mean(kl, mask)) if kl is not None else 0.0,
            "tokens": float(mask.sum()),
            "on_tokens": float(on.sum()),
            "off_tokens": float(off.sum()),
            # The step loss split into its policy-gradient parts (they add up to it without KL/entropy).
            "on_policy_loss": float(aggregate(pg_only * on, mask, config, active_tokens_global, totals=totals)),
            "off_policy_loss": float(aggregate(pg_only * off, mask, config, active_tokens_global, totals=totals)),
            "off_policy_prob": float(masked_mean(torch.exp(logps), off)) if off_policy is not None else 0.0,
            "entropy": float(masked_mean(entropy, mask)) if entropy is not None else 0.0,
        }
    return loss, stats


def mean_over_step(values: torch.Tensor, mask: torch.Tensor, totals: StepTotals | None, active_tokens_global: float | None) -> torch.Tensor:
    """This micro-batch's share of the step's token mean of `values` (like dapo's denominator)."""
    masked = (values * mask).sum()
    if totals is None:
        return masked / max(active_tokens_global if active_tokens_global is not None else float(mask.sum()), 1.0)
    return masked / (max(totals.tokens_global, 1.0) / totals.world_size)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, config: GRPOLossConfig, active_tokens_global: float | None = None,
              *, totals: StepTotals | None = None) -> torch.Tensor:
    """This micro-batch's share of the step loss (see the module docstring)."""
    if totals is None:
        tokens = float(mask.sum())
        rows = int(per_token.shape[0])
        totals = StepTotals(rows=rows, tokens=tokens, rows_global=rows,
                            tokens_global=active_tokens_global if active_tokens_global is not None else tokens)
    masked = per_token * mask
    rows_per_process = max(totals.rows_global, 1) / totals.world_size   # DDP averages gradients over processes
    if config.loss_type == "grpo":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / rows_per_process
    if config.loss_type == "bnpo":
        return masked.sum() / max(totals.tokens, 1.0)
    if config.loss_type == "dapo":
        return masked.sum() / (max(totals.tokens_global, 1.0) / totals.world_size)
    if config.loss_type == "dr_grpo":
        return masked.sum() / (rows_per_process * config.max_completion_length)
    raise ValueError(f"unknown loss_type {config.loss_type!r}; use grpo, bnpo, dapo or dr_grpo")


TOKEN_STATS = ("clip_fraction", "ratio_mean", "kl", "entropy")
"""Statistics averaged over the step's active tokens."""
ON_POLICY_STATS = ("clip_fraction", "ratio_mean")
"""The TOKEN_STATS that grpo_loss averages over on-policy tokens only (a trace token has no
ratio to clip), so they are weighted by on-policy tokens across micro-batches."""
SUM_STATS = ("on_policy_loss", "off_policy_loss", "on_tokens", "off_tokens")
"""Statistics that add up over micro-batches."""


def loss_pass(
    logps_fn: Callable[[slice], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: GRPOLossConfig,
    totals: StepTotals,
    micro_batch_size: int | None = None,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    prefix_mask: torch.Tensor | None = None,
    behaviour_logps: torch.Tensor | None = None,
    keep_logps: list[torch.Tensor] | None = None,
) -> tuple[float, dict[str, float]]:
    """One gradient pass over a step batch in micro-batches: `logps_fn(rows)` gives the
    policy log-probs [n, T] of those rows (with grad), or (log-probs, entropies) when the
    loss has an entropy bonus; each micro-batch's loss is back-propagated with `backward`
    as soon as it is computed (so only one micro-batch's activations are alive), and the
    gradients add up to the whole batch's. `keep_logps`, if given, receives each
    micro-batch's log-probs, detached (ExGRPO records them as the sampling policy's).

    Returns the step loss and its statistics: TOKEN_STATS averaged over the whole batch's
    active tokens (each micro-batch weighted by its tokens, not averaged per micro-batch;
    ON_POLICY_STATS over on-policy tokens), SUM_STATS summed, and `off_policy_prob` averaged over off-policy tokens."""
    rows = int(mask.shape[0])
    micro = micro_batch_size or rows
    step_loss, tokens, off_tokens = 0.0, 0.0, 0.0
    weighted = dict.fromkeys(TOKEN_STATS, 0.0)
    summed = dict.fromkeys(SUM_STATS, 0.0)
    off_prob = 0.0
    for start in range(0, rows, micro):
        part = slice(start, min(start + micro, rows))
        out = logps_fn(part)
        logps, entropy = out if isinstance(out, tuple) else (out, None)
        if keep_logps is not None:
            keep_logps.append(logps.detach())
        loss, stats = grpo_loss(
            logps, advantages[part], mask[part], config,
            old_logps=old_logps[part] if old_logps is not None else None,
            ref_logps=ref_logps[part] if ref_logps is not None else None,
            totals=totals,
            prefix_mask=prefix_mask[part] if prefix_mask is not None else None,
            behaviour_logps=behaviour_logps[part] if behaviour_logps is not None else None,
            entropy=entropy if config.entropy_coef > 0 else None,
        )
        backward(loss)
        step_loss += float(loss.detach())
        if entropy is not None and config.entropy_coef == 0:
            with torch.no_grad():
                stats["entropy"] = float(masked_mean(entropy.detach(), mask[part].to(entropy.device, entropy.dtype)))
        for key in TOKEN_STATS:
            weighted[key] += stats[key] * stats["on_tokens" if key in ON_POLICY_STATS else "tokens"]
        for key in SUM_STATS:
            summed[key] += stats[key]
        off_prob += stats["off_policy_prob"] * stats["off_tokens"]
        tokens += stats["tokens"]
        off_tokens += stats["off_tokens"]
    result = {key: value / max(summed["on_tokens"] if key in ON_POLICY_STATS else tokens, 1.0) for key, value in weighted.items()}
    result.update(summed)
    result["off_policy_prob"] = off_prob / max(off_tokens, 1.0)
    return step_loss, result


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_length - cache, then a linear ramp to -1
    at max_length, and -1 beyond."""
    lengths = lengths.float()
    start = max_length - cache
    ramp = (start - lengths) / cache
    return torch.where(lengths <= start, torch.zeros_like(lengths), torch.where(lengths <= max_length, ramp, -torch.ones_like(lengths)))
