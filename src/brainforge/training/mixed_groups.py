"""Groups that mix fresh samples with samples the policy did not draw.

LUFFY puts a teacher's trace into a prompt's group, ExGRPO one of the model's own past
successes; either way the group keeps its size K: a prompt with n off-policy samples gets
K - n fresh ones, and advantages are computed over the whole mixed group. The off-policy
rows are marked token by token (`prefix_mask`) so the loss can weight them differently
(see rl/off_policy.py); their tokens are exactly the ids the trainer will score, as rendered
after the chat template, so the mask cannot drift from the text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from brainforge.generation.engine import Rollout


@dataclass
class OffPolicySample:
    token_ids: list[int]
    """The reply's tokens as they follow the rendered prompt (end-of-turn token included)."""
    text: str
    """The reply as text, for the reward functions."""
    source: str
    """"trace" (a teacher's, LUFFY) or "replay" (the model's own past success, ExGRPO)."""
    behaviour_logps: list[float] | None = None
    """Per-token log-probs of the policy that wrote it, aligned with token_ids; None = unknown."""
    truncated: bool = False
    """Cut to the completion budget before its end-of-turn token."""
    observation_mask: list[bool] | None = None
    """Per token: inserted by the environment (a search trace's retrieved text), attended to
    but never trained on; None = none."""
    search_log: Any = None
    """A search trace's reasoning.rollout.SearchLog."""


def assemble_groups(prompt_ids: list[list[int]], off_policy: list[list[OffPolicySample]], fresh: Rollout,
                    group_size: int, pad_id: int) -> Rollout:
    """One rollout of B groups of `group_size` rows: prompt i's off-policy samples first, then
    its fresh ones (`fresh` holds group_size - len(off_policy[i]) rows of prompt i, in order)."""
    counts = [group_size - len(samples) for samples in off_policy]
    if min(counts, default=0) < 0:
        raise ValueError(f"more off-policy samples than group slots ({group_size}) for a prompt")
    if sum(counts) != fresh.completion_ids.shape[0]:
        raise ValueError(f"fresh rollout has {fresh.completion_ids.shape[0]} rows, groups need {sum(counts)}")
    rows = len(prompt_ids) * group_size
    width = max([fresh.completion_ids.shape[1]] + [len(s.token_ids) for samples in off_policy for s in samples])
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    prefix = torch.zeros((rows, width), dtype=torch.bool)
    behaviour = torch.full((rows, width), math.nan)
    truncated = torch.zeros(rows, dtype=torch.bool)
    logprobs = torch.zeros((rows, width)) if fresh.logprobs is not None else None
    multi_turn = fresh.observation_mask is not None or any(s.observation_mask is not None for o in off_policy for s in o)
    observed = torch.zeros((rows, width), dtype=torch.bool) if multi_turn else None
    search_logs: list[Any] | None = [] if multi_turn else None
    texts: list[str] = []
    sources: list[str] = []
    all_prompts: list[list[int]] = []
    row, fresh_row = 0, 0
    for prompt, samples, count in zip(prompt_ids, off_policy, counts):
        for sample in samples:
            n = len(sample.token_ids)
            ids[row, :n] = torch.tensor(sample.token_ids, dtype=torch.long)
            mask[row, :n] = 1
            prefix[row, :n] = True
            if sample.behaviour_logps is not None and len(sample.behaviour_logps) == n:
                behaviour[row, :n] = torch.tensor(sample.behaviour_logps, dtype=torch.float32)
            truncated[row] = sample.truncated
            if observed is not None and sample.observation_mask is not None:
                observed[row, :n] = torch.tensor(sample.observation_mask, dtype=torch.bool)
            if search_logs is not None:
                search_logs.append(sample.search_log)
            texts.append(sample.text)
            sources.append(sample.source)
            all_prompts.append(list(prompt))
            row += 1
        for _ in range(count):
            t = fresh.completion_ids.shape[1]
            ids[row, :t] = fresh.completion_ids[fresh_row]
            mask[row, :t] = fresh.completion_mask[fresh_row]
            truncated[row] = fresh.truncated[fresh_row]
            if logprobs is not None:
                logprobs[row, :t] = fresh.logprobs[fresh_row]
            if observed is not None and fresh.observation_mask is not None:
                observed[row, :t] = fresh.observation_mask[fresh_row]
            if search_logs is not None:
                search_logs.append(fresh.search_logs[fresh_row] if fresh.search_logs else None)
            texts.append(fresh.texts[fresh_row])
            sources.append("policy")
            all_prompts.append(list(prompt))
            row += 1
            fresh_row += 1
    return Rollout(prompt_ids=all_prompts, completion_ids=ids, completion_mask=mask, truncated=truncated, texts=texts,
                   logprobs=logprobs, stats=dict(fresh.stats), prefix_mask=prefix, behaviour_logps=behaviour, sources=sources,
                   observation_mask=observed, search_logs=search_logs)
