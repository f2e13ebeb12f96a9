"""ExGRPO's part of a step: replay the model's own past successes (ALGORITHMS.md section 4).

Before generation: once replay is active, up to floor(rho x B) of the step's B prompts are
questions drawn from the experience buffer (Gaussian over how many of K samples were right
last time: medium difficulty first); each gets one stored correct trajectory (the one the
*current* policy is least uncertain about) in its group, and the step keeps B prompts.
After the update: every question of the step with lbound < k <= rbound successes stores its
fresh correct samples with the log-probs the trainer computed for them, and a question
solved K out of K times is retired for good.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from brainforge.config import ExperienceSettings
from brainforge.data.prompts import PromptExample
from brainforge.generation.engine import Rollout
from brainforge.rl.experience import Experience, ExperienceBuffer, question_uid, select_lowest_entropy
from brainforge.training.mixed_groups import OffPolicySample

log = logging.getLogger(__name__)

EntropyFn = Callable[[PromptExample, list[Experience]], list[float]]


class ExperienceReplay:
    def __init__(self, settings: ExperienceSettings, group_size: int, signature: dict[str, Any], seed: int = 0,
                 skip_truncated: bool = False):
        self.settings = settings
        self.group_size = group_size
        self.skip_truncated = skip_truncated
        """With mask_truncated_completions, a truncated success is no lesson: not stored."""
        self.buffer = ExperienceBuffer(settings, group_size, signature)
        self.generator = torch.Generator().manual_seed(seed)
        """All of replay's randomness; saved in checkpoints so a resumed run draws as an uninterrupted one."""
        self.last_replayed = 0
        self.last_batch = 0
        self.length_mismatches = 0

    def plan(self, prompts: list[PromptExample], mean_entropies: EntropyFn) -> tuple[list[PromptExample], list[list[OffPolicySample]]]:
        """The step's prompts (fresh ones first, then replayed questions; still B of them)
        and each one's off-policy samples (one replayed trajectory for replayed questions)."""
        replays = self.buffer.replay_count(len(prompts))
        self.last_replayed = replays
        self.last_batch = len(prompts)
        if replays == 0:
            return prompts, [[] for _ in prompts]
        uids = self.buffer.sample_questions(replays, self.generator)
        fresh = prompts[: len(prompts) - replays]
        chosen: list[PromptExample] = []
        samples: list[list[OffPolicySample]] = []
        for uid in uids:
            prompt = self.buffer.prompt(uid)
            trajectories = self.buffer.trajectories(uid)
            if self.settings.selection == "lowest_entropy" and len(trajectories) > 1:
                pick = select_lowest_entropy(trajectories, mean_entropies(prompt, trajectories))
            else:
                pick = int(torch.randint(len(trajectories), (1,), generator=self.generator))
            best = trajectories[pick]
            behaviour: list[float] | None = list(best.logprobs)
            if len(best.logprobs) != len(best.token_ids):  # recorded under other tokens: fall back to w = pi_theta
                self.length_mismatches += 1
                behaviour = None
            chosen.append(prompt)
            samples.append([OffPolicySample(list(best.token_ids), best.text, "replay", behaviour)])
        return fresh + chosen, [[] for _ in fresh] + samples

    def collect(self, prompts: list[PromptExample], rollout: Rollout, rewards: torch.Tensor, logps: torch.Tensor) -> None:
        """After the update: activate replay on the first step whose fresh samples are right
        more often than start_solve_rate, then store each question's fresh successes with
        their trainer-computed log-probs (from before this step's update: the policy that
        sampled them) and move or retire it by its count k of K."""
        K = self.group_size
        threshold = self.settings.success_threshold
        correct = (rewards >= threshold) & ~torch.isnan(rewards)                       # [N]
        fresh = torch.tensor([source == "policy" for source in (rollout.sources or ["policy"] * len(rewards))])
        if bool(fresh.any()):
            self.buffer.observe_solve_rate(float(correct[fresh].float().mean()))
        if not self.buffer.active:
            return
        lengths = rollout.completion_mask.sum(dim=1).tolist()
        for group, prompt in enumerate(prompts):
            rows = [r for r in range(group * K, (group + 1) * K) if bool(fresh[r])]
            # k counts the question's latest fresh samples only: a replayed success says nothing new about it.
            successes = sum(bool(correct[r]) for r in rows)
            stored = [
                Experience(token_ids=rollout.completion_ids[r, : lengths[r]].tolist(),
                           logprobs=logps[r, : lengths[r]].tolist(), text=rollout.texts[r])
                for r in rows if bool(correct[r]) and not (self.skip_truncated and bool(rollout.truncated[r]))
            ]
            self.buffer.record_group(question_uid(prompt.messages), prompt, successes, stored)

    def metrics(self) -> dict[str, float]:
        return {**self.buffer.stats(), "experience/replayed_prompts": float(self.last_replayed),
                "experience/replay_share": self.last_replayed / self.last_batch if self.last_batch else 0.0,
                "experience/length_mismatches": float(self.length_mismatches)}
