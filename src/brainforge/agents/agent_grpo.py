"""agent_grpo: GRPO on the LLM calls an agent made through the policy server (LightningRL).

One training step reads top to bottom:
    1. rollouts      K rollouts of each of the B tasks, run concurrently by the runner; the
                     agent's calls reach the in-process policy server, which batches them
                     into the one generation engine and records each call's prompt and
                     completion token ids and sampling log-probs in the trace store
    2. rewards       each rollout's reward as the agent returned it (None: the configured
                     reward functions score its last reply); failed or timed-out rollouts
                     have no reward and no part in the loss
    3. advantages    per rollout, against the group of the K rollouts of the same task
                     (reward minus the group mean, optionally / std); every LLM call of a
                     rollout gets its rollout's advantage (a call with its own reported
                     reward is compared with the same group mean instead)
    4. transitions   one row per recorded call: prompt = the recorded prompt ids,
                     completion = the recorded sampled ids, never re-tokenised text; tool
                     outputs and earlier turns are in the prompt, so only sampled tokens
                     carry loss
    5. loss, update  the GRPO core's clipped surrogate (+ beta * KL to the adapter-free
                     base), token-level aggregation over the whole step by default (calls
                     that begin alike compute that beginning once: training.shared_prefix), then
                     the optimizer step, holding the server's model lock: the next
                     rollouts are served by the updated adapter

The same weights serve and train, in one process: the server's generation worker and the
update never overlap (the model lock), and a rollout that outlives its timeout is refused
further calls, so a late call never reads half-updated weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from typing import Any

import torch

from brainforge.agents.runner import Agent, RolloutResult, run_rollouts, task_dict
from brainforge.agents.store import CallRecord, TraceStore
from brainforge.config import AgentSettings, GRPOSettings, TrainingConfig
from brainforge.data.prompts import PromptExample
from brainforge.generation.engine import Rollout
from brainforge.rl.advantages import scored_mask
from brainforge.rl.losses import TOKEN_STATS, StepTotals, loss_pass
from brainforge.training.grpo import GRPOModule
from brainforge.training.shared_prefix import prefix_groups, shared_prefix_completion_logps, supports_shared_prefix

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 64
"""Calls sharing fewer prompt tokens than this are not grouped (the padding-free path is as cheap)."""


class AgentGRPOModule(GRPOModule):
    def __init__(self, model: Any, tokenizer: Any, chat_template: str, settings: GRPOSettings, training: TrainingConfig,
                 total_steps: int, *, agent: Agent, agent_settings: AgentSettings, server: Any, store: TraceStore,
                 api_key: str | None = None):
        super().__init__(model, tokenizer, chat_template, settings, training, total_steps)
        self.agent = agent
        self.agent_settings = agent_settings
        self.server = server
        self.store = store
        self.api_key = api_key
        self.base_url: str | None = None
        self.rollout_counts: Counter[str] = Counter()

    # ------------------------------------------------------------------ serving

    def on_fit_start(self) -> None:
        self.base_url = self.server.start()
        log.info("policy server for the agent's calls: %s (trace store %s)", self.base_url, self.store.path)

    def teardown(self, stage: str) -> None:
        self.server.stop()

    # ------------------------------------------------------------------ log-probs

    def completion_logps(self, rollout: Rollout, rows: slice | None = None, grad: bool = True,
                         entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """As GRPO's, but calls that begin with the same tokens (system prompt, tool list,
        worked examples, the task; for a later call also the rollout's earlier turns) are
        grouped, and each group's shared beginning is computed once instead of once per call
        (see training.shared_prefix). Calls sharing too little go through the padding-free path."""
        rows = rows or slice(0, rollout.completion_ids.shape[0])
        prompts = rollout.prompt_ids[rows]
        lengths = rollout.completion_mask[rows].sum(dim=1).tolist()
        if not supports_shared_prefix(self.model):
            return super().completion_logps(rollout, rows=rows, grad=grad, entropy_grad=entropy_grad)
        n, T = rollout.completion_ids[rows].shape
        logps: list[torch.Tensor | None] = [None] * n
        entropies: list[torch.Tensor | None] = [None] * n
        alone: list[int] = []
        for group, shared in prefix_groups(prompts, MIN_SHARED_PREFIX):
            if shared == 0 or min(lengths[i] for i in group) == 0:
                alone.extend(group)
                continue
            got = shared_prefix_completion_logps(
                self.model, [prompts[i] for i in group], rollout.completion_ids[rows][group], [lengths[i] for i in group], shared,
                self.settings.temperature, self.engine.pad_id, self.device, grad, entropy_grad)
            for j, i in enumerate(group):
                logps[i], entropies[i] = got[0][j], got[1][j]
        if alone:
            got = super().completion_logps(_select(rollout, rows, alone), grad=grad, entropy_grad=entropy_grad)
            for j, i in enumerate(alone):
                logps[i], entropies[i] = got[0][j], got[1][j]
        return torch.stack(logps), torch.stack(entropies)                                 # [n, T] each, rows in order

    # ------------------------------------------------------------------ the step

    def training_step(self, prompts: list[PromptExample], batch_idx: int) -> torch.Tensor:
        K = self.settings.num_generations
        timings: dict[str, float] = {}

        clock = time.perf_counter()
        self.server.policy_version = f"step-{self.global_step}"
        results = run_rollouts(self.agent, [task_dict(p) for p in prompts], K, self.base_url or self.server.start(), self.store,
                               prompt=self.agent_settings.system_prompt, timeout_s=self.agent_settings.timeout_s,
                               max_concurrency=self.agent_settings.max_concurrency, group_prefix=f"step-{self.global_step}/",
                               api_key=self.api_key, task_ids=[task_id(p) for p in prompts])   # [B*K], task-major
        calls = [self.store.calls(r.rollout_id) if r.status == "succeeded" else [] for r in results]
        timings["rollouts"] = time.perf_counter() - clock

        clock = time.perf_counter()
        rewards = self.rollout_rewards(prompts, results, calls)                               # [B*K], NaN = no reward
        rollout, advantages, owner = transitions(calls, rewards, K, self.settings.scale_rewards, self.engine.pad_id)  # rows = calls
        row_rewards = rewards[owner] if len(owner) else torch.zeros(0)
        mask = self.loss_mask(rollout, scored_mask(row_rewards))                             # [N, T] sampled tokens of scored calls
        timings["rewards"] = time.perf_counter() - clock

        with self.server.model_lock:                                                         # no serving while weights change
            clock = time.perf_counter()
            ref_logps = self.reference_logps(rollout) if self.settings.beta > 0 and len(owner) else None
            timings["reference"] = time.perf_counter() - clock
            clock = time.perf_counter()
            optimizer, scheduler = self.optimizers(), self.lr_schedulers()
            loss, stats = 0.0, dict.fromkeys(TOKEN_STATS, math.nan)
            if len(owner) and float(mask.sum()) > 0:
                totals = StepTotals.of(mask, rows=int(scored_mask(row_rewards).sum()))
                entropy_grad = self.loss_config.entropy_coef > 0
                loss, stats = loss_pass(lambda rows: self.completion_logps(rollout, rows=rows, grad=True, entropy_grad=entropy_grad),
                                        advantages, mask,
                                        self.loss_config, totals, self.settings.micro_batch_size, ref_logps=ref_logps,
                                        backward=self.manual_backward)
            timings["loss"] = time.perf_counter() - clock
            clock = time.perf_counter()
            grad_norm = self.clip_and_check(optimizer)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            timings["optimizer"] = time.perf_counter() - clock

        metrics = self.agent_metrics(results, rewards, calls, rollout, timings)
        metrics.update({key: stats[key] for key in TOKEN_STATS})
        metrics.update(loss=loss, grad_norm=grad_norm)
        self.record_agent_step(metrics)
        return torch.tensor(loss)

    def rollout_rewards(self, prompts: list[PromptExample], results: list[RolloutResult],
                        calls: list[list[CallRecord]]) -> torch.Tensor:
        """The agent's reward per rollout; where it returned None, the reward functions score the
        rollout's last reply (its text, and its tool calls in the OpenAI layout) as an answer to
        the task. Failed and timed-out rollouts, and rollouts that made no call, get NaN."""
        K = self.settings.num_generations
        rewards = torch.full((len(results),), math.nan)
        to_score: list[int] = []
        for i, (result, made) in enumerate(zip(results, calls)):
            if result.status != "succeeded" or not made:
                continue
            if result.reward is not None:
                rewards[i] = result.reward
            else:
                to_score.append(i)
        if to_score:
            replies = [final_reply(calls[i][-1]) for i in to_score]
            scored = self.score_rows([prompts[i // K] for i in to_score], _text_rollout(replies))[0]
            rewards[to_score] = scored
        return rewards

    # ------------------------------------------------------------------ logging

    def agent_metrics(self, results: list[RolloutResult], rewards: torch.Tensor, calls: list[list[CallRecord]],
                      rollout: Rollout, timings: dict[str, float]) -> dict[str, float]:
        K = self.settings.num_generations
        statuses = Counter(r.status for r in results)
        self.rollout_counts.update(statuses)
        valid = rewards[~torch.isnan(rewards)]
        grouped = rewards.view(-1, K)
        flat = [call for made in calls for call in made]
        tokens = float(rollout.completion_mask.sum()) if len(flat) else 0.0
        metrics = {
            "reward/mean": float(valid.mean()) if len(valid) else math.nan,
            "reward/std": float(valid.std()) if len(valid) > 1 else 0.0,
            "reward/none_frac": float(torch.isnan(rewards).float().mean()),
            "frac_reward_zero_std": float(sum(1 for row in grouped if len(set(row[~torch.isnan(row)].tolist())) <= 1) / max(len(grouped), 1)),
            "agent/success_rate": float((valid >= self.agent_settings.min_reward).float().sum() / max(len(results), 1)),
            "agent/failed": float(statuses["failed"]),
            "agent/timeouts": float(statuses["timeout"]),
            "agent/failed_total": float(self.rollout_counts["failed"] + self.rollout_counts["timeout"]),
            "agent/calls_per_rollout": len(flat) / max(len(results), 1),
            "agent/tool_calls_per_rollout": sum(len(c.tool_calls) for c in flat) / max(len(results), 1),
            "agent/rollout_s_mean": sum(r.seconds for r in results) / max(len(results), 1),
            "completion/length_mean": tokens / max(len(flat), 1),
            "completion/truncated_frac": sum(c.finish_reason == "length" for c in flat) / max(len(flat), 1),
            "tokens_per_s/rollouts": tokens / max(timings["rollouts"], 1e-9),
        }
        for key, seconds in timings.items():
            metrics[f"time/{key}_s"] = seconds
        metrics["time/step_s"] = sum(timings.values())
        return metrics

    def record_agent_step(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if not math.isnan(value):
                name = f"grpo/{key}" if key in ("loss", "kl", "clip_fraction", "entropy") else key
                self.log(name, value, on_step=True, on_epoch=False, prog_bar=key in ("reward/mean", "agent/success_rate"))
        self.history.append({"step": float(self.global_step), **metrics})
        self._warn({"frac_reward_zero_std": metrics["frac_reward_zero_std"], "reward/mean": metrics["reward/mean"],
                    "completion/repetition": 0.0, "completion/truncated_frac": metrics["completion/truncated_frac"],
                    **({"entropy": metrics["entropy"]} if not math.isnan(metrics.get("entropy", math.nan)) else {})})


def transitions(calls: list[list[CallRecord]], rewards: torch.Tensor, group_size: int, scale: str,
                pad_id: int) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
    """One row per recorded LLM call of a rollout with a reward: (rows as a Rollout with the
    recorded ids and log-probs, each row's advantage [N], each row's rollout index [N]).

    Advantages are computed per rollout within its group of K (LightningRL's credit
    assignment: every call of a rollout gets the rollout's advantage); a call that carries
    its own reported reward is compared with the same group baseline instead."""
    K = group_size
    grouped = rewards.view(-1, K)                                                       # [B, K]
    scored = ~torch.isnan(grouped)
    count = scored.sum(dim=1)                                                           # [B]
    mean = torch.nan_to_num(grouped, nan=0.0).sum(dim=1) / count.clamp(min=1)           # [B]
    centred = torch.where(scored, grouped - mean[:, None], torch.zeros_like(grouped))
    if scale == "group":
        std = ((centred**2).sum(dim=1) / (count - 1).clamp(min=1)).sqrt()               # [B] sample std
    elif scale == "batch":
        values = rewards[~torch.isnan(rewards)]
        std = (values.std() if values.numel() > 1 else torch.tensor(0.0)).expand(len(mean))
    else:
        std = torch.zeros(len(mean))
    divisor = std + 1e-4 if scale != "none" else torch.ones(len(mean))
    comparable = count >= 2                                                             # [B] one scored rollout: nothing to compare

    prompt_ids, completions, logprobs, owner, advantages, truncated = [], [], [], [], [], []
    for index, made in enumerate(calls):
        if math.isnan(float(rewards[index])):
            continue
        group = index // K
        for call in made:
            reward = call.reward if call.reward is not None else float(rewards[index])
            advantage = (reward - float(mean[group])) / float(divisor[group]) if bool(comparable[group]) else 0.0
            prompt_ids.append(list(call.prompt_ids))
            completions.append(list(call.completion_ids))
            logprobs.append(list(call.logprobs))
            owner.append(index)
            advantages.append(advantage)
            truncated.append(call.finish_reason == "length")
    width = max((len(c) for c in completions), default=0)
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.long)
    sampled = torch.zeros((len(completions), width))
    for row, (completion, logp) in enumerate(zip(completions, logprobs)):
        ids[row, : len(completion)] = torch.tensor(completion, dtype=torch.long)
        mask[row, : len(completion)] = 1
        sampled[row, : len(logp)] = torch.tensor(logp, dtype=torch.float32)
    rollout = Rollout(prompt_ids=prompt_ids, completion_ids=ids, completion_mask=mask,
                      truncated=torch.tensor(truncated, dtype=torch.bool), texts=[""] * len(completions),
                      logprobs=sampled, sources=["policy"] * len(completions))
    return rollout, torch.tensor(advantages, dtype=torch.float32), torch.tensor(owner, dtype=torch.long)


def final_reply(call: CallRecord) -> str:
    """A rollout's last reply as text for the reward functions: its content, and its tool
    calls in the OpenAI layout (the function-calling reward reads that)."""
    if not call.tool_calls:
        return call.text
    return (call.text + "\n" if call.text else "") + json.dumps({"tool_calls": call.tool_calls})


def task_id(prompt: PromptExample) -> str:
    """A stable id for a task: its `id` / `task_id` column, or a hash of its messages."""
    for key in ("task_id", "id"):
        if prompt.columns.get(key) is not None:
            return str(prompt.columns[key])
    return hashlib.sha1(json.dumps(prompt.messages, sort_keys=True).encode()).hexdigest()[:12]


def _text_rollout(texts: list[str]) -> Rollout:
    n = len(texts)
    return Rollout(prompt_ids=[[] for _ in texts], completion_ids=torch.zeros((n, 1), dtype=torch.long),
                   completion_mask=torch.zeros((n, 1), dtype=torch.long), truncated=torch.zeros(n, dtype=torch.bool), texts=texts)


def _select(rollout: Rollout, rows: slice, picked: list[int]) -> Rollout:
    """The rows `picked` (indices within `rows`) of a rollout, as a rollout of their own."""
    index = torch.arange(rollout.completion_ids.shape[0])[rows][picked]
    return Rollout(prompt_ids=[rollout.prompt_ids[int(i)] for i in index], completion_ids=rollout.completion_ids[index],
                   completion_mask=rollout.completion_mask[index], truncated=rollout.truncated[index],
                   texts=[rollout.texts[int(i)] for i in index])
