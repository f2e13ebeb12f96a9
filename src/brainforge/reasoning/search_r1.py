"""Search-R1's parts of a GRPO step: prompts that invite searching, multi-turn sampling,
search traces for the cold start, and the per-step search figures.

The training step itself is the GRPO core's (training/grpo.py); what changes is how the
completions are sampled (rollout.py: turns with search calls, the observation tokens masked
out of the loss) and, while the policy does not search on its own yet, what fills a slot of
each group: a programmatic *search trace* (search with the question, read the results,
answer with the gold answer found in them). A 135M model never writes `<search>` by itself,
and a reward that is the same for every sample of a group teaches nothing; a trace is a
success in the group, so it has a positive advantage from the first step.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from brainforge.config import SearchSettings
from brainforge.data.prompts import PromptExample
from brainforge.generation.engine import GenerationEngine, Rollout, SamplingParams
from brainforge.reasoning.rollout import ObservationWriter, SearchFunction, SearchLog, search_rollout, tags_of
from brainforge.rewards.search_r1 import contains_gold, gold_answers
from brainforge.rl.experience import question_uid
from brainforge.training.mixed_groups import OffPolicySample

log = logging.getLogger(__name__)

SEARCH_REWARDS = ("answer_match", "tag_order", "search_bonus", "search_r1_format")
"""Rewards that read the tags, so they are told the config's tag names."""


def tag_kwargs(settings: SearchSettings) -> dict[str, str]:
    return {"think_tag": settings.think_tag, "search_tag": settings.search_tag,
            "observation_tag": settings.observation_tag, "answer_tag": settings.answer_tag}


def question_of(prompt: PromptExample) -> str:
    """The bare question: the `question` column (QA sources), else the last user message."""
    question = prompt.columns.get("question")
    return str(question) if question else prompt.text


def search_prompt(prompt: PromptExample, settings: SearchSettings) -> PromptExample:
    """The prompt with its last message replaced by the search instruction around the bare
    question (kept in the `question` column)."""
    question = question_of(prompt)
    messages = [dict(m) for m in prompt.messages]
    messages[-1]["content"] = settings.instruction.replace("{question}", question.strip())
    return PromptExample(messages, {**prompt.columns, "question": question})


class SearchRollouts:
    """The sampler of a search_r1 step: multi-turn rollouts against the search tool."""

    def __init__(self, engine: GenerationEngine, search: SearchFunction, settings: SearchSettings):
        self.engine = engine
        self.search = search
        self.settings = settings

    def sample(self, prompt_ids: list[list[int]], counts: list[int], params: SamplingParams,
               generator: torch.Generator | None = None) -> Rollout:
        return search_rollout(self.engine, prompt_ids, counts, params, self.search, self.settings, generator)


class SearchTraces:
    """Programmatic search traces, built on first use per question and kept: search with the
    bare question, and if a gold answer is in the results, read them and answer with it.
    A question whose search does not find a gold answer gets no trace (a trace that answers
    without evidence would teach guessing)."""

    def __init__(self, tokenizer: Any, search: SearchFunction, settings: SearchSettings, slots: int = 1):
        self.tokenizer = tokenizer
        self.search = search
        self.settings = settings
        self.slots = slots
        self.writer = ObservationWriter(tokenizer, settings)
        self.tags = tags_of(settings)
        self._cache: dict[str, OffPolicySample | None] = {}
        self.built = self.found = 0

    def samples_for(self, prompt: PromptExample) -> list[OffPolicySample]:
        if self.slots == 0:
            return []
        uid = question_uid(prompt.messages)
        if uid not in self._cache:
            self._cache[uid] = self.trace(prompt)
        sample = self._cache[uid]
        return [sample] if sample is not None else []

    def trace(self, prompt: PromptExample) -> OffPolicySample | None:
        question = question_of(prompt)
        golds = gold_answers(prompt.columns.get("answer"))
        self.built += 1
        if golds is None:
            return None
        try:
            texts = self.search([question])[0][: self.settings.top_k]
        except Exception as exc:  # no trace for this question; training goes on
            log.warning("search trace for %r: the search failed (%s)", question[:80], exc)
            return None
        observation = self.writer.results(texts)
        if observation is None:
            return None
        seen = self.tokenizer.decode(observation, skip_special_tokens=True)
        found = next((g for g in golds if contains_gold(seen, [g])), None)  # the search_bonus rule: the trace earns it
        if found is None:
            return None
        self.found += 1
        t = self.tags
        before = (f"{t.open(t.think)} I need to look this up. {t.close(t.think)}\n"
                  f"{t.open(t.search)} {question.strip()} {t.close(t.search)}")
        after = (f"{t.open(t.think)} The search results give the answer. {t.close(t.think)}\n"
                 f"{t.open(t.answer)} {found.strip()} {t.close(t.answer)}")
        first = self._ids(before)
        last = self._ids(after)
        ids = first + observation + last
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        trace_log = SearchLog(search_calls=1, answered=True, ended="answer", queries=[question.strip()])
        return OffPolicySample(token_ids=ids, text=text, source="trace",
                               observation_mask=[False] * len(first) + [True] * len(observation) + [False] * len(last),
                               search_log=trace_log)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def metrics(self) -> dict[str, float]:
        return {"search/traces_found_frac": self.found / self.built if self.built else math.nan}


def search_metrics(rollout: Rollout) -> dict[str, float]:
    """Per step, over the policy's own rows (traces would lift every figure by themselves):
    searches per rollout, the share that answered, invalid actions, failed and empty searches,
    how rollouts ended, and tokens the policy wrote vs. observation tokens."""
    if not rollout.search_logs:
        return {}
    own = [i for i, source in enumerate(rollout.sources or ["policy"] * len(rollout.search_logs)) if source == "policy"]
    logs = [rollout.search_logs[i] for i in own if rollout.search_logs[i] is not None]
    if not logs:
        return {}
    n = len(logs)
    observed = rollout.observation_mask[own] if rollout.observation_mask is not None else None
    lengths = rollout.completion_mask[own].sum(1).float()
    observation_tokens = observed.sum(1).float() if observed is not None else torch.zeros(n)
    metrics = {
        "search/calls_mean": sum(g.search_calls for g in logs) / n,
        "search/call_rate": sum(g.search_calls > 0 for g in logs) / n,
        "search/answer_rate": sum(g.answered for g in logs) / n,
        "search/invalid_actions_mean": sum(g.invalid_actions for g in logs) / n,
        "search/failed_searches": float(sum(g.failed_searches for g in logs)),
        "search/empty_searches": float(sum(g.empty_searches for g in logs)),
        "search/total_cap_frac": sum(g.ended == "total_cap" for g in logs) / n,
        "completion/policy_tokens_mean": float((lengths - observation_tokens).mean()),
        "completion/observation_tokens_mean": float(observation_tokens.mean()),
    }
    return metrics
