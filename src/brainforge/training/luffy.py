"""LUFFY's part of a step: which teacher traces take slots in which groups.

Traces are read, filtered, matched to the training prompts and tokenized once, before
training (so a bad trace file fails before minutes of model loading are wasted, and every
trace is counted once in the report). During training, a prompt with traces gets up to
`n_prefix` of them in its group of K, the rest are fresh samples (ALGORITHMS.md section 3).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from brainforge.config import OffPolicySettings
from brainforge.data.prompts import PromptExample
from brainforge.data.traces import Trace, filter_min_reward, load_traces, match_traces, tokenizer_fingerprint, trace_token_ids
from brainforge.errors import ConfigError, DataError
from brainforge.rl.experience import question_uid
from brainforge.training.mixed_groups import OffPolicySample

log = logging.getLogger(__name__)

WORKED = "worked:"


def collect_traces(settings: OffPolicySettings, prompts: list[PromptExample]) -> tuple[list[Trace], list[str]]:
    """Every trace the config names (files and built-in teachers), min-reward filtered, and
    report lines. Raises before any model is loaded when there is nothing to learn from."""
    traces: list[Trace] = []
    report: list[str] = []
    for source in settings.traces:
        if source.startswith(WORKED):
            from brainforge.teachers.worked import worked_traces

            made, unsolved = worked_traces(prompts, source.removeprefix(WORKED))
            report.append(f"{source}: {len(made)} worked solutions, {unsolved} prompts it cannot solve")
            traces += made
        else:
            loaded = load_traces(source, settings.trace_columns or None)
            report.append(f"{source}: {len(loaded)} traces")
            traces += loaded
    traces, dropped = filter_min_reward(traces, settings.min_off_policy_reward)
    if dropped:
        report.append(f"min_off_policy_reward {settings.min_off_policy_reward}: dropped {dropped} traces")
    return traces, report


@dataclass
class TraceSlots:
    """Tokenized traces per question (uid), and how many slots of a group they may take."""

    by_uid: dict[str, list[OffPolicySample]]
    n_prefix: int
    seed: int = 0
    report: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def samples_for(self, prompt: PromptExample) -> list[OffPolicySample]:
        """Up to n_prefix of this prompt's traces (a random choice when it has more)."""
        samples = self.by_uid.get(question_uid(prompt.messages), [])
        if len(samples) <= self.n_prefix:
            return list(samples)
        return self._random.sample(samples, self.n_prefix)


def prepare_trace_slots(settings: OffPolicySettings, prompts: list[PromptExample], traces: list[Trace], tokenizer: Any,
                        chat_template: str, max_new_tokens: int, score: Callable[[list[PromptExample], list[str]], list[float]],
                        success_threshold: float, seed: int = 0) -> TraceSlots:
    """Match, tokenize (as rendered after the chat template), apply the length budget, score
    with the config's reward, and report what was kept and dropped."""
    match = match_traces(prompts, traces)
    report = [match.report()]
    fingerprint = tokenizer_fingerprint(tokenizer)
    by_uid: dict[str, list[OffPolicySample]] = {}
    cut = too_long = wrong = with_logprobs = 0
    candidates: list[tuple[PromptExample, OffPolicySample]] = []
    for index, matched in match.by_prompt.items():
        prompt = prompts[index]
        for trace in matched:
            ids = trace_token_ids(tokenizer, chat_template, prompt.messages, trace.response, where=trace.where)
            sample = OffPolicySample(token_ids=ids, text=trace.response, source="trace")
            if settings.use_behaviour_logprobs and trace.logprobs is not None and trace.tokenizer == fingerprint \
                    and trace.token_ids is not None and list(trace.token_ids) == ids[: len(trace.token_ids)] \
                    and len(trace.logprobs) == len(trace.token_ids):
                # The teacher's tokens are the student's: the real importance ratio is known.
                sample.behaviour_logps = list(trace.logprobs) + [0.0] * (len(ids) - len(trace.logprobs))
                with_logprobs += 1
            if len(ids) > max_new_tokens:
                if settings.too_long == "drop":
                    too_long += 1
                    continue
                cut += 1
                sample.token_ids = ids[:max_new_tokens]
                sample.text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
                sample.truncated = True
                if sample.behaviour_logps is not None:
                    sample.behaviour_logps = sample.behaviour_logps[:max_new_tokens]
            candidates.append((prompt, sample))
    scores = score([p for p, _ in candidates], [s.text for _, s in candidates]) if candidates else []
    for (prompt, sample), value in zip(candidates, scores):
        if value < success_threshold:
            wrong += 1
            if settings.wrong_traces == "drop":
                continue
        by_uid.setdefault(question_uid(prompt.messages), []).append(sample)
    report.append(f"traces longer than max_new_tokens={max_new_tokens}: {too_long} dropped, {cut} cut")
    report.append(f"traces the reward scores below {success_threshold}: {wrong} ({'dropped' if settings.wrong_traces == 'drop' else 'kept'})")
    report.append(f"traces with usable teacher log-probs: {with_logprobs}")
    kept = sum(len(v) for v in by_uid.values())
    report.append(f"kept {kept} traces for {len(by_uid)} of {len(prompts)} prompts")
    if not by_uid:
        raise DataError("algorithm.off_policy.traces: no usable trace is left for any training prompt (" + "; ".join(report) + ")")
    return TraceSlots(by_uid, settings.n_prefix, seed, report)


def check_trace_config(settings: OffPolicySettings, algorithm: str) -> None:
    if algorithm in ("luffy", "hybrid") and not settings.traces:
        raise ConfigError(f"algorithm.off_policy.traces: {algorithm} needs traces: a JSONL file or a built-in teacher such as worked:arithmetic")
