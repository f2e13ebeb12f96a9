"""GRPO as a LightningModule: sample K completions per prompt, score them, compare them
within their group, and push the policy toward the better ones.

One training step reads top to bottom:
    0. plan groups   which prompts, and which of their K slots hold samples the policy did
                     not draw: a teacher's trace (LUFFY, luffy.py) or a replayed past
                     success (ExGRPO, exgrpo.py); plain GRPO has none
    1. generate      the remaining completions of each group (one batched call)
    2. score         every reward function; weighted sum per completion
    3. advantages    group-normalised (rewards minus the group mean, optionally / std)
    4. reference     log-probs with the LoRA adapter disabled (same weights, no 2nd model)
    5. loss          clipped surrogate + beta * k3 KL, aggregated per `loss_type`, in
                     micro-batches sized independently of the generation batch
                     (off-policy tokens weighted by f(w) = w/(w+gamma), rl/off_policy.py)
    6. update        clip, optimizer step, LR schedule; log everything
    7. remember      ExGRPO: store this step's successes in the experience buffer

Why the logged loss sits near 0 at the start: with one update per generation the ratio is
exactly 1, the advantages of each group sum to 0, and (with `grpo` aggregation) the loss
value is the mean of +A and -A terms, i.e. ~0, plus beta*KL, which is 0 while the adapter is
still at its zero initialisation. The gradient is not zero: it is -A * grad log pi per
token. Watch reward, KL and clip fraction, not the loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

import lightning as L
import torch

from brainforge.config import GRPOSettings, OffPolicySettings, TrainingConfig
from brainforge.data.prompts import PromptExample
from brainforge.generation.engine import GenerationEngine, Rollout, SamplingParams
from brainforge.rewards.registry import RewardError, call_reward, resolve_reward
from brainforge.models.modes import eval_mode
from brainforge.rl.advantages import group_advantages, scored_mask, zero_std_fraction
from brainforge.rl.losses import SUM_STATS, TOKEN_STATS, GRPOLossConfig, StepTotals, loss_pass
from brainforge.rl.off_policy import OffPolicyLoss
from brainforge.rl.experience import Experience
from brainforge.training.mixed_groups import OffPolicySample, assemble_groups
from brainforge.training.checkpointing import keep_trainable_state
from brainforge.data.collate import packed_collate
from brainforge.data.templates import IGNORE_INDEX, TokenizedExample
from brainforge.training.losses import decoder_and_head, packed_hidden_states, token_logps_and_entropies
from brainforge.training.sft import lr_lambda, warmup_steps

log = logging.getLogger(__name__)


class GRPOModule(L.LightningModule):
    def __init__(self, model: Any, tokenizer: Any, chat_template: str, settings: GRPOSettings, training: TrainingConfig, total_steps: int,
                 off_policy: OffPolicySettings | None = None, traces: Any = None, replay: Any = None, search: Any = None,
                 warmup_traces: Any = None, warmup_steps: int = 0):
        """`off_policy` switches on the mixed-policy loss; `traces` (luffy.TraceSlots, or
        search_r1.SearchTraces) and `replay` (exgrpo.ExperienceReplay) fill group slots with
        off-policy samples; `search` (search_r1.SearchRollouts) samples multi-turn rollouts
        with search calls; the first `warmup_steps` steps are supervised on `warmup_traces`."""
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.settings = settings
        self.training_cfg = training
        self.total_steps = total_steps
        self.automatic_optimization = False
        self.strict_loading = False
        self.engine = GenerationEngine.for_chat(model, tokenizer)
        self.sampling = SamplingParams(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
            stop_strings=tuple(settings.stop_strings),
        )
        self.off_policy = off_policy
        self.traces = traces
        self.replay = replay
        self.search = search
        self.warmup_traces = warmup_traces
        self.warmup_steps = warmup_steps
        self.loss_config = GRPOLossConfig(
            epsilon_low=settings.epsilon, epsilon_high=settings.epsilon_high if settings.epsilon_high is not None else settings.epsilon,
            beta=settings.beta, loss_type=settings.loss_type,
            max_completion_length=search.settings.max_total_tokens if search is not None else settings.max_new_tokens,
            clip=off_policy.clip_on_policy if off_policy else True,
            entropy_coef=off_policy.entropy_coef if off_policy else 0.0,
            off_policy=OffPolicyLoss.from_weights(off_policy.shaping_gamma, off_policy.on_weight, off_policy.off_weight) if off_policy else None,
        )
        self.skip_grad_norm = off_policy.skip_update_grad_norm if off_policy else None
        self.skipped_updates = 0
        self.rewards = [(spec.name, resolve_reward(spec.name), spec.weight, dict(spec.kwargs)) for spec in settings.reward_functions]
        self.history: list[dict[str, float]] = []
        self._zero_signal_streak = 0
        self._reward_window: deque[float] = deque(maxlen=20)

    # ------------------------------------------------------------------ the step

    def training_step(self, prompts: list[PromptExample], batch_idx: int) -> torch.Tensor:
        """One step: one rollout batch, `num_iterations` optimizer updates on it.
        `global_step` (checkpoint, log and schedule intervals, `max_steps`) advances once
        per step, however many updates it makes."""
        K = self.settings.num_generations
        timings: dict[str, float] = {}
        if self.global_step < self.warmup_steps and self.warmup_traces is not None:
            return self.warmup_step(prompts)

        clock = time.perf_counter()
        prompts, off_policy = self.plan_groups(prompts)                                    # B prompts, off-policy samples of each
        timings["plan"] = time.perf_counter() - clock
        clock = time.perf_counter()
        prompt_ids = [self.encode_prompt(p) for p in prompts]
        counts = [K - len(o) for o in off_policy]
        fresh = self.search.sample(prompt_ids, counts, self.sampling) if self.search else self.engine.generate(prompt_ids, counts, self.sampling)
        rollout = assemble_groups(prompt_ids, off_policy, fresh, K, self.engine.pad_id)    # [N = B*K] rows, groups of K
        timings["generation"] = time.perf_counter() - clock

        clock = time.perf_counter()
        rewards, per_function = self.score(prompts, rollout)                               # [N], {name: [N]}
        advantages = group_advantages(rewards, K, self.settings.scale_rewards)             # [N] over the whole mixed group
        scored = scored_mask(rewards)                                                      # [N] no reward: no part in the loss
        mask = self.loss_mask(rollout, scored)                                             # [N, T]
        totals = StepTotals.of(mask, rows=int(scored.sum()))                               # counts summed over DDP ranks
        timings["rewards"] = time.perf_counter() - clock

        clock = time.perf_counter()
        old_logps = self.frozen_logps(rollout) if self.settings.num_iterations > 1 else None
        ref_logps = self.reference_logps(rollout) if self.settings.beta > 0 else None
        timings["reference"] = time.perf_counter() - clock

        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        with_entropy_grad = self.loss_config.entropy_coef > 0

        def policy_logps(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            return self.completion_logps(rollout, rows=rows, grad=True, entropy_grad=with_entropy_grad)

        iterations = self.settings.num_iterations
        step_loss, stats_sum = 0.0, dict.fromkeys((*TOKEN_STATS, *SUM_STATS, "off_policy_prob"), 0.0)
        sampling_logps: list[torch.Tensor] | None = [] if self.replay is not None else None
        timings["loss"] = timings["optimizer"] = 0.0
        grad_norm = math.nan
        for iteration in range(iterations):
            clock = time.perf_counter()
            loss, stats = loss_pass(policy_logps, advantages, mask, self.loss_config, totals, self.settings.micro_batch_size,
                                    old_logps=old_logps, ref_logps=ref_logps, backward=self.manual_backward,
                                    prefix_mask=rollout.prefix_mask, behaviour_logps=rollout.behaviour_logps,
                                    keep_logps=sampling_logps if iteration == 0 else None)
            step_loss += loss
            for key in stats_sum:
                stats_sum[key] += stats[key]
            timings["loss"] += time.perf_counter() - clock
            clock = time.perf_counter()
            grad_norm = self.clip_and_check(optimizer)
            if iteration == iterations - 1:
                optimizer.step()      # counted: global_step += 1 for the whole rollout batch
                scheduler.step()
            else:                     # the same update, not counted as a step
                self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)
            optimizer.zero_grad(set_to_none=True)
            timings["optimizer"] += time.perf_counter() - clock

        clock = time.perf_counter()
        if self.replay is not None and sampling_logps is not None:
            self.replay.collect(prompts, rollout, rewards, torch.cat(sampling_logps).cpu())
        timings["remember"] = time.perf_counter() - clock

        metrics = self.step_metrics(rollout, rewards, per_function, advantages, mask, timings)
        metrics.update({key: stats_sum[key] / iterations for key in TOKEN_STATS})
        metrics.update(loss=step_loss / iterations, grad_norm=grad_norm, skipped_updates=float(self.skipped_updates))
        if self.off_policy is not None:
            metrics.update(self.off_policy_metrics(rollout, rewards, stats_sum, iterations))
        if self.search is not None:
            from brainforge.reasoning.search_r1 import search_metrics

            metrics.update(search_metrics(rollout))
            for traces in (self.traces, self.warmup_traces):
                if hasattr(traces, "metrics"):
                    metrics.update(traces.metrics())
        self.record(metrics, prompts, rollout, rewards)
        return torch.tensor(step_loss / iterations)

    def loss_mask(self, rollout: Rollout, scored: torch.Tensor) -> torch.Tensor:
        """[N, T] 1 on the tokens the loss, the KL and the entropy are taken over: the
        completion tokens of rows with a reward, minus the environment's observation tokens
        (state masking: they stay in the packed sequence, so later tokens attend to them),
        minus truncated rows when `mask_truncated_completions`."""
        mask = rollout.completion_mask.float() * scored.float()[:, None]
        if rollout.observation_mask is not None:
            mask = mask * (~rollout.observation_mask).float()
        if self.settings.mask_truncated_completions:
            mask = mask * (~rollout.truncated).float()[:, None]
        return mask

    def warmup_step(self, prompts: list[PromptExample]) -> torch.Tensor:
        """A supervised step on the off-policy samples of this step's prompts (search_r1's
        `cold_start: sft`): mean negative log-likelihood of their tokens, observation tokens
        excluded, one optimizer step. It counts as a step (schedule, checkpoints)."""
        samples = [self.warmup_traces.samples_for(p)[:1] for p in prompts]
        chosen = [(p, s) for p, s in zip(prompts, samples) if s]
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        nll = math.nan
        if chosen:
            prompt_ids = [self.encode_prompt(p) for p, _ in chosen]
            rollout = assemble_groups(prompt_ids, [s for _, s in chosen], self.engine._empty_rollout(), 1, self.engine.pad_id)
            mask = self.loss_mask(rollout, torch.ones(len(chosen), dtype=torch.bool))
            logps, _ = self.completion_logps(rollout, grad=True)
            loss = -(logps * mask.to(logps.device)).sum() / mask.sum().clamp(min=1)
            self.manual_backward(loss)
            self.clip_and_check(optimizer)
            nll = float(loss.detach())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"warmup/nll": nll, "warmup/samples": float(len(chosen))}
        for logger in self.loggers:  # straight to the loggers: self.log would repeat the last value at every later step
            logger.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)}, step=self.global_step)
        self.history.append({"step": float(self.global_step), **metrics})
        return torch.tensor(0.0 if math.isnan(nll) else nll)

    def plan_groups(self, prompts: list[PromptExample]) -> tuple[list[PromptExample], list[list[OffPolicySample]]]:
        """Plain GRPO: every slot is a fresh sample. ExGRPO swaps some prompts for replayed
        questions (with one past success each); LUFFY gives the others their traces."""
        off_policy: list[list[OffPolicySample]] = [[] for _ in prompts]
        if self.replay is not None:
            prompts, off_policy = self.replay.plan(prompts, self.mean_entropies)
        if self.traces is not None:
            off_policy = [samples or self.traces.samples_for(prompt) for prompt, samples in zip(prompts, off_policy)]
        return prompts, off_policy

    def clip_and_check(self, optimizer: Any) -> float:
        """Clip the gradient norm; with `skip_update_grad_norm`, drop a non-finite or huge
        gradient entirely (the optimizer then skips every parameter: no momentum step either)."""
        params = [p for group in optimizer.optimizer.param_groups for p in group["params"] if p.grad is not None]
        limit = self.training_cfg.max_grad_norm
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit if limit is not None else math.inf)) if params else 0.0
        if self.skip_grad_norm is not None and (not math.isfinite(norm) or norm > self.skip_grad_norm):
            log.warning("step %d: gradient norm %s above %s; update skipped", self.global_step, norm, self.skip_grad_norm)
            self.skipped_updates += 1
            for p in params:
                p.grad = None
        return norm

    # ------------------------------------------------------------------ pieces

    def encode_prompt(self, prompt: PromptExample) -> list[int]:
        text = self.tokenizer.apply_chat_template(prompt.messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def score(self, prompts: list[PromptExample], rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of all reward functions; NaN where every function returned None."""
        K = self.settings.num_generations
        return self.score_rows([p for p in prompts for _ in range(K)], rollout)

    def score_rows(self, row_prompts: list[PromptExample], rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards of rollout row i as a reply to row_prompts[i]."""
        prompt_texts = [p.text for p in row_prompts]
        keys = sorted({k for p in row_prompts for k in p.columns})
        columns = {k: [p.columns.get(k) for p in row_prompts] for k in keys}
        total = torch.zeros(len(rollout.texts))
        seen = torch.zeros(len(rollout.texts), dtype=torch.bool)
        per_function: dict[str, torch.Tensor] = {}
        for name, function, weight, kwargs in self.rewards:
            try:
                values = call_reward(name, function, prompt_texts, rollout.texts, columns, kwargs)
            except RewardError:
                if self.settings.reward_errors == "raise":
                    raise
                log.warning("reward %s raised; its scores for this batch are None", name, exc_info=True)
                values = [None] * len(rollout.texts)
            tensor = torch.tensor([math.nan if v is None else v for v in values])
            per_function[name] = tensor
            present = ~torch.isnan(tensor)
            total[present] += weight * tensor[present]
            seen |= present
        total[~seen] = math.nan
        return total, per_function

    def completion_logps(self, rollout: Rollout, rows: slice | None = None, grad: bool = True,
                         entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs [n, T] of the completion tokens at the sampling temperature, and
        per-token entropies (with gradient when `entropy_grad`, for an entropy bonus;
        detached otherwise), 0 on padding.

        Padding-free: each row's prompt and its *actual* completion are laid end to end in
        one packed row (attention kept inside each, positions restarting), so no compute is
        spent on the padding that right-pads short completions to the longest one (with a
        64-token cap and 24-token completions that padding was most of the batch). The head
        runs on completion positions only."""
        rows = rows or slice(0, rollout.completion_ids.shape[0])
        prompts = rollout.prompt_ids[rows]
        completion = rollout.completion_ids[rows]                                          # [n, T]
        lengths = rollout.completion_mask[rows].sum(dim=1).tolist()                        # [n]
        n, T = completion.shape
        sequences = [p + completion[i, : lengths[i]].tolist() for i, p in enumerate(prompts)]
        sequences = [TokenizedExample(ids, [IGNORE_INDEX] * len(ids)) for ids in sequences]
        batch = packed_collate([sequences], self.engine.pad_id)                            # one row of sum(len) tokens
        # Position predicting completion token t of row i: its offset + prompt length - 1 + t.
        offsets = torch.tensor([0] + [len(s.input_ids) for s in sequences]).cumsum(0)[:-1]
        row_index = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths))         # [C]
        token_index = torch.cat([torch.arange(c) for c in lengths])                          # [C]
        source = offsets[row_index] + torch.tensor([len(p) for p in prompts])[row_index] - 1 + token_index
        targets = completion[row_index, token_index]                                         # [C]
        device = self.device
        with torch.set_grad_enabled(grad):
            hidden = packed_hidden_states(self.model, batch, device)[0][source.to(device)]   # [C, H]
        _, head = decoder_and_head(self.model)
        logps, entropy = token_logps_and_entropies(head, hidden, targets, row_index, token_index, (n, T),
                                                   self.settings.temperature, grad, entropy_grad)
        return logps, entropy

    @torch.no_grad()
    def mean_entropies(self, prompt: PromptExample, trajectories: list[Experience]) -> list[float]:
        """Mean token entropy of each stored trajectory under the *current* policy (ExGRPO
        replays the one it is least uncertain about), in eval mode like the sampler."""
        prompt_ids = self.encode_prompt(prompt)
        width = max(len(t.token_ids) for t in trajectories)
        ids = torch.full((len(trajectories), width), self.engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(trajectories), width), dtype=torch.long)
        for i, t in enumerate(trajectories):
            ids[i, : len(t.token_ids)] = torch.tensor(t.token_ids)
            mask[i, : len(t.token_ids)] = 1
        batch = Rollout(prompt_ids=[prompt_ids] * len(trajectories), completion_ids=ids, completion_mask=mask,
                        truncated=torch.zeros(len(trajectories), dtype=torch.bool), texts=[t.text for t in trajectories])
        with eval_mode(self.model):
            _, entropy = self.completion_logps(batch, grad=False)
        entropy = entropy.cpu()
        return ((entropy * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()

    @torch.no_grad()
    def frozen_logps(self, rollout: Rollout) -> torch.Tensor:
        """Log-probs [N, T] under the current weights without gradient, in the same
        micro-batches as the loss pass (memory, and identical packing: at the same weights
        they equal the loss pass's values exactly), in eval mode like the sampler that
        produced the rollout: the behaviour policy of `num_iterations > 1`."""
        micro = self.settings.micro_batch_size or rollout.completion_ids.shape[0]
        with eval_mode(self.model):
            return torch.cat([self.completion_logps(rollout, slice(start, start + micro), grad=False)[0]
                              for start in range(0, rollout.completion_ids.shape[0], micro)])

    @torch.no_grad()
    def reference_logps(self, rollout: Rollout) -> torch.Tensor:
        """The reference policy: base weights with the adapter disabled, or a frozen
        reference adapter when `reference_adapter` is set. Eval mode: the reference's
        dropout is off while the policy keeps its own train/eval mode for the loss pass."""
        if not self.settings.reference_adapter:
            with self.model.disable_adapter():
                return self.frozen_logps(rollout)
        self.model.set_adapter("reference")
        try:
            return self.frozen_logps(rollout)
        finally:
            self.model.set_adapter("default")

    # ------------------------------------------------------------------ logging

    def off_policy_metrics(self, rollout: Rollout, rewards: torch.Tensor, stats: dict[str, float], iterations: int) -> dict[str, float]:
        """The mixed loss's parts, and the reward of the model's own samples alone (the
        trace rows would otherwise lift `reward/mean` without the model learning a thing)."""
        fresh = torch.tensor([source == "policy" for source in (rollout.sources or ["policy"] * len(rewards))])
        valid = ~torch.isnan(rewards)

        def mean(selected: torch.Tensor) -> float:
            return float(rewards[selected & valid].mean()) if bool((selected & valid).any()) else math.nan

        tokens = stats["on_tokens"] + stats["off_tokens"]
        metrics = {
            "off_policy/on_loss": stats["on_policy_loss"] / iterations,
            "off_policy/off_loss": stats["off_policy_loss"] / iterations,
            "off_policy/token_share": stats["off_tokens"] / max(tokens, 1.0),
            "off_policy/trace_prob_mean": stats["off_policy_prob"] / iterations if stats["off_tokens"] else math.nan,
            "off_policy/samples": float((~fresh).sum()),
            "reward/on_policy_mean": mean(fresh),
            "reward/off_policy_mean": mean(~fresh),
        }
        if self.replay is not None:
            metrics.update(self.replay.metrics())
        return metrics

    def step_metrics(self, rollout: Rollout, rewards: torch.Tensor, per_function: dict[str, torch.Tensor],
                     advantages: torch.Tensor, mask: torch.Tensor, timings: dict[str, float]) -> dict[str, float]:
        K = self.settings.num_generations
        scored = scored_mask(rewards)                     # completions with no reward count in no reward/advantage figure
        valid, scored_advantages = rewards[scored], advantages[scored]
        lengths = rollout.lengths.float()
        metrics = {
            "reward/mean": float(valid.mean()) if len(valid) else math.nan,
            "reward/std": float(valid.std()) if len(valid) > 1 else 0.0,
            "reward/none_frac": float((~scored).float().mean()),
            "frac_reward_zero_std": zero_std_fraction(rewards, K),
            "advantage/mean": float(scored_advantages.mean()) if len(valid) else math.nan,
            "advantage/std": float(scored_advantages.std()) if len(valid) > 1 else 0.0,
            "advantage/abs_mean": float(scored_advantages.abs().mean()) if len(valid) else math.nan,
            "completion/length_mean": float(lengths.mean()),
            "completion/length_max": float(lengths.max()),
            "completion/truncated_frac": float(rollout.truncated.float().mean()),
            "completion/repetition": float(sum(_repetition(t) for t in rollout.texts) / len(rollout.texts)),
            "tokens_per_s/generation": rollout.stats["completion_tokens"] / max(timings["generation"], 1e-9),
        }
        for name, values in per_function.items():
            present = values[~torch.isnan(values)]
            metrics[f"reward/{name}/mean"] = float(present.mean()) if len(present) else math.nan
            metrics[f"reward/{name}/none_frac"] = float(torch.isnan(values).float().mean())
        total_time = sum(timings.values())
        metrics["tokens_per_s/step"] = rollout.stats["completion_tokens"] / max(total_time, 1e-9)
        for key, seconds in timings.items():
            metrics[f"time/{key}_s"] = seconds
        metrics["time/step_s"] = total_time
        return metrics

    def record(self, metrics: dict[str, float], prompts: list[PromptExample], rollout: Rollout, rewards: torch.Tensor) -> None:
        for key, value in metrics.items():
            if not math.isnan(value):
                name = f"grpo/{key}" if key in ("loss", "kl", "clip_fraction", "entropy") else key
                self.log(name, value, on_step=True, on_epoch=False, prog_bar=key in ("reward/mean", "kl"))
        self.history.append({"step": float(self.global_step), **metrics})
        step = self.global_step
        every = self.settings.log_completions_every_n_steps
        if step % every == 0 or step == 1:
            self._log_completions(prompts, rollout, rewards, step)
        self._warn(metrics)

    def _log_completions(self, prompts: list[PromptExample], rollout: Rollout, rewards: torch.Tensor, step: int) -> None:
        K = self.settings.num_generations
        lines = []
        for i in range(min(len(rollout.texts), 2 * K)):
            lines.append(f"**prompt** {prompts[i // K].text[:300]}\n\n**completion** (reward {float(rewards[i]):.3f}) {rollout.texts[i][:600]}\n\n---")
        text = "\n".join(lines)
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("completions", text, global_step=step)
        log.debug("step %d completions:\n%s", step, text)

    def _warn(self, metrics: dict[str, float]) -> None:
        if metrics["frac_reward_zero_std"] >= 0.75:
            self._zero_signal_streak += 1
            if self._zero_signal_streak == 5:
                log.warning(
                    "for 5 steps most groups (%.0f%%) had identical rewards for all completions: they carry no learning "
                    "signal. Make the task easier or the reward more graded (partial credit), or raise num_generations.",
                    100 * metrics["frac_reward_zero_std"],
                )
        else:
            self._zero_signal_streak = 0
        if metrics.get("entropy", 1.0) < 0.05:
            log.warning("policy entropy collapsed to %.3f: completions are nearly deterministic; lower the learning rate or raise beta", metrics["entropy"])
        reward = metrics["reward/mean"]
        if not math.isnan(reward):
            self._reward_window.append(reward)
        window = list(self._reward_window)
        if len(window) == self._reward_window.maxlen:
            rising = sum(window[-5:]) / 5 > sum(window[:5]) / 5 + 0.1
            degenerate = metrics["completion/repetition"] > 0.5 or metrics["completion/truncated_frac"] > 0.5
            if rising and degenerate:
                log.warning(
                    "reward is rising while completions degenerate (repetition %.2f, truncated %.0f%%): the policy may be "
                    "gaming the reward; read the sample completions in TensorBoard",
                    metrics["completion/repetition"], 100 * metrics["completion/truncated_frac"],
                )

    # ------------------------------------------------------------------ optimizer & checkpoints

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.training_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler, warmup_steps(cfg, self.total_steps), self.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The experience buffer goes into the same atomically written checkpoint as the
        adapter and optimizer: a kill never leaves one without the other."""
        keep_trainable_state(self.model, checkpoint)
        checkpoint["brainforge"] = {"history": self.history, "skipped_updates": self.skipped_updates}
        if self.replay is not None:
            checkpoint["brainforge"]["experience"] = self.replay.buffer.state_dict()
            checkpoint["brainforge"]["replay_rng"] = self.replay.generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("brainforge", {})
        self.history = list(state.get("history", []))
        self.skipped_updates = int(state.get("skipped_updates", 0))
        if self.replay is not None:
            if "experience" not in state:
                from brainforge.errors import ConfigError

                raise ConfigError("--resume: this checkpoint has no experience buffer (it was written by a run without "
                                  "ExGRPO replay); start a new run for algorithm exgrpo/hybrid")
            self.replay.buffer.load_state_dict(state["experience"])
            if "replay_rng" in state:
                self.replay.generator.set_state(state["replay_rng"])
            stats = self.replay.buffer.stats()
            log.info("experience buffer restored: %d questions, %d trajectories, %d retired", stats["experience/questions"],
                     stats["experience/size"], stats["experience/retired"])


def _repetition(text: str) -> float:
    """Share of repeated word 3-grams: 0 for varied text, near 1 for loops."""
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0
