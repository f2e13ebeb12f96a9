"""`brainforge eval`: what did training buy, on prompts it never saw?

Scores the held-out split (`split: test`) of the config's prompt sources with the config's
reward functions, greedy (accuracy) and sampled (pass@k: the share of prompts where at
least one of k samples is correct), for the base model and, when given, base + adapter.
"Correct" means the first reward function scores it >= `success_threshold` (1.0 for the
0/1 correctness rewards).

QA configs (algorithm search_r1, or a first reward that is `answer_match`) report instead
exact match and token F1 (best over the gold answers, on the last `<answer>` block, or the
whole completion when there is none) and the answer rate, greedy; search_r1 answers by
multi-turn search rollouts against the config's store, as it was trained, and also reports
search calls per question.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from brainforge.config import BrainforgeConfig, SourceConfig
from brainforge.data.prompts import PromptExample, load_prompts
from brainforge.data.templates import chat_format
from brainforge.generation.engine import GenerationEngine, SamplingParams
from brainforge.rewards.registry import call_reward, resolve_reward

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    model: str
    prompts: int
    greedy_accuracy: float
    pass_at_k: float
    k: int
    mean_reward_greedy: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "greedy_accuracy": round(self.greedy_accuracy, 4), "pass_at_k": round(self.pass_at_k, 4),
                "mean_reward_greedy": round(self.mean_reward_greedy, 4), "seconds": round(self.seconds, 1)}


def held_out_prompts(config: BrainforgeConfig, limit: int | None) -> list[PromptExample]:
    sources = [SourceConfig(**{**s.model_dump(), "options": dict(s.options)}) for s in config.sources()]
    prompts = load_prompts(sources, config.data.system_prompt, split="test")
    return prompts[:limit] if limit else prompts


def evaluate(model: Any, tokenizer: Any, config: BrainforgeConfig, prompts: list[PromptExample], label: str,
             k: int = 4, batch_size: int = 16, success_threshold: float = 1.0) -> EvalResult:
    settings = config.algorithm.grpo
    template = chat_format(config.datasets.output_format, tokenizer).template
    engine = GenerationEngine.for_chat(model, tokenizer)
    spec = settings.reward_functions[0]
    reward = resolve_reward(spec.name)
    started = time.perf_counter()
    greedy_scores: list[float] = []
    solved_any: list[bool] = []
    generator = torch.Generator().manual_seed(config.training.seed)
    for start in range(0, len(prompts), max(1, batch_size // max(k, 1))):
        chunk = prompts[start : start + max(1, batch_size // max(k, 1))]
        ids = [tokenizer(tokenizer.apply_chat_template(p.messages, chat_template=template, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for p in chunk]
        greedy = engine.generate(ids, 1, SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=0.0))
        greedy_scores += _scores(spec.name, reward, chunk, greedy.texts, 1, spec.kwargs)
        if k > 0:
            sampled = engine.generate(ids, k, SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p), generator=generator)
            scores = _scores(spec.name, reward, chunk, sampled.texts, k, spec.kwargs)
            solved_any += [any(s >= success_threshold for s in scores[i * k : (i + 1) * k]) for i in range(len(chunk))]
    accuracy = sum(s >= success_threshold for s in greedy_scores) / len(greedy_scores)
    return EvalResult(label, len(prompts), accuracy, sum(solved_any) / len(solved_any) if solved_any else float("nan"), k,
                      sum(greedy_scores) / len(greedy_scores), time.perf_counter() - started)


def _scores(name: str, function: Any, prompts: list[PromptExample], texts: list[str], k: int, kwargs: dict[str, Any]) -> list[float]:
    keys = sorted({key for p in prompts for key in p.columns})
    columns = {key: [p.columns.get(key) for p in prompts for _ in range(k)] for key in keys}
    values = call_reward(name, function, [p.text for p in prompts for _ in range(k)], texts, columns, kwargs)
    return [0.0 if v is None else v for v in values]


def run_eval(config: BrainforgeConfig, adapter: Path | None, k: int, limit: int | None) -> list[EvalResult | QAEvalResult]:
    from brainforge.hardware import configure_threads
    from brainforge.inference import load_chat_model

    configure_threads(config.training.num_threads)
    search = None
    if config.algorithm.name == "search_r1":  # the store is checked before any model loads
        from brainforge.reasoning.search_tool import MemorySearch, require_search_store

        require_search_store(config.memory)
        search = MemorySearch(config.memory, config.algorithm.search)
    prompts = held_out_prompts(config, limit)
    log.info("evaluating on %d held-out prompts", len(prompts))
    results: list[EvalResult | QAEvalResult] = []
    models: list[tuple[Path | None, str]] = [(None, f"base ({config.model.name_or_path})")]
    if adapter is not None:
        models.append((adapter, f"adapter ({adapter})"))
    for path, label in models:
        loaded = load_chat_model(adapter=path, model=config.model.name_or_path)
        if is_qa_config(config):
            results.append(evaluate_qa(loaded.model, loaded.tokenizer, config, prompts, label, search))
        else:
            results.append(evaluate(loaded.model, loaded.tokenizer, config, prompts, label, k=k))
    return results


# ---------------------------------------------------------------------------- QA


def is_qa_config(config: BrainforgeConfig) -> bool:
    """search_r1, or a config whose first (correctness) reward is answer_match."""
    return config.algorithm.name == "search_r1" or config.algorithm.grpo.reward_functions[0].name == "answer_match"


@dataclass
class QAEvalResult:
    model: str
    prompts: int
    """Questions scored (those with at least one usable gold answer)."""
    exact_match: float
    f1: float
    contains: float
    """Share of answers that contain a gold answer's words (sub-EM)."""
    answer_rate: float
    """Share of completions with a complete answer block."""
    searches_per_question: float | None
    """Mean search calls per question (search_r1 only)."""
    seconds: float
    skipped: int = 0
    """Questions without a usable gold answer (not scored)."""

    def as_dict(self) -> dict[str, Any]:
        rounded = {key: round(value, 4) for key, value in self.__dict__.items() if isinstance(value, float)}
        return {**self.__dict__, **rounded, "seconds": round(self.seconds, 1)}

    def summary(self) -> str:
        searches = f"   searches/question {self.searches_per_question:.2f}" if self.searches_per_question is not None else ""
        skipped = f", {self.skipped} without gold answers skipped" if self.skipped else ""
        return (f"{self.model:60} EM {self.exact_match:.3f}   F1 {self.f1:.3f}   contains {self.contains:.3f}   answer rate {self.answer_rate:.3f}{searches}   "
                f"(greedy, {self.prompts} questions{skipped}, {self.seconds:.0f}s)")


def qa_figures(texts: list[str], gold_values: list[Any], tags: Any, search_calls: list[int] | None = None) -> dict[str, Any]:
    """EM, F1, `contains` (a gold's words appear in the answer: Search-R1's sub-EM, fair to a
    model that answers in a sentence), answer rate (and search calls per question) over
    completions; a row without a usable gold answer is skipped and counted. The answer is
    the last complete answer block, or, when there is none, what the model itself wrote
    (observation blocks removed: retrieved text is not an answer); EM and F1 take the best gold."""
    from brainforge.reasoning.tags import last_answer, without_observations
    from brainforge.rewards.search_r1 import answer_score, contains_gold, gold_answers

    em: list[float] = []
    f1: list[float] = []
    contains: list[bool] = []
    answered: list[bool] = []
    calls: list[int] = []
    for index, (text, value) in enumerate(zip(texts, gold_values, strict=True)):
        golds = gold_answers(value)
        if golds is None:
            continue
        answer = last_answer(text, tags)
        answered.append(answer is not None)
        given = answer if answer is not None else without_observations(text, tags)
        em.append(answer_score(given, golds, "em"))
        f1.append(answer_score(given, golds, "f1"))
        contains.append(contains_gold(given, golds))
        if search_calls is not None:
            calls.append(search_calls[index])

    def mean(values: list[float] | list[bool] | list[int]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return {"prompts": len(em), "skipped": len(texts) - len(em), "exact_match": mean(em), "f1": mean(f1), "contains": mean(contains),
            "answer_rate": mean(answered), "searches_per_question": mean(calls) if search_calls is not None else None}


def evaluate_qa(model: Any, tokenizer: Any, config: BrainforgeConfig, prompts: list[PromptExample], label: str,
                search: Any = None, batch_size: int = 16) -> QAEvalResult:
    """Greedy QA figures; search_r1 answers through search rollouts (`search` is its tool)."""
    from brainforge.reasoning.rollout import tags_of
    from brainforge.rewards.search_r1 import search_tags

    started = time.perf_counter()
    golds = [p.columns.get("answer") for p in prompts]
    search_calls: list[int] | None = None
    if config.algorithm.name == "search_r1":
        from brainforge.reasoning.policy import answer_with_search
        from brainforge.reasoning.search_r1 import search_prompt

        settings = config.algorithm.search
        messages = [search_prompt(p, settings).messages for p in prompts]
        answered = answer_with_search(model, tokenizer, config, messages, search, batch_size)
        texts = [text for text, _, _ in answered]
        search_calls = [search_log.search_calls for _, _, search_log in answered]
        tags = tags_of(settings)
    else:
        template = chat_format(config.datasets.output_format, tokenizer).template
        engine = GenerationEngine.for_chat(model, tokenizer)
        params = SamplingParams(max_new_tokens=config.algorithm.grpo.max_new_tokens, temperature=0.0)
        texts = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = [tokenizer(tokenizer.apply_chat_template(p.messages, chat_template=template, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"] for p in chunk]
            texts += engine.generate(ids, 1, params).texts
        tags = search_tags(config.algorithm.grpo.reward_functions[0].kwargs)
    figures = qa_figures(texts, golds, tags, search_calls)
    return QAEvalResult(label, figures["prompts"], figures["exact_match"], figures["f1"], figures["contains"], figures["answer_rate"],
                        figures["searches_per_question"], time.perf_counter() - started, figures["skipped"])
