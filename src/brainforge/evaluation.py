"""`brainforge eval`: what did training buy, on prompts it never saw?

Scores the held-out split (`split: test`) of the config's prompt sources with the config's
reward functions, greedy (accuracy) and sampled (pass@k: the share of prompts where at
least one of k samples is correct), for the base model and, when given, base + adapter.
"Correct" means the first reward function scores it >= `success_threshold` (1.0 for the
0/1 correctness rewards).
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


def run_eval(config: BrainforgeConfig, adapter: Path | None, k: int, limit: int | None) -> list[EvalResult]:
    from brainforge.hardware import configure_threads
    from brainforge.inference import load_chat_model

    configure_threads(config.training.num_threads)
    prompts = held_out_prompts(config, limit)
    log.info("evaluating on %d held-out prompts", len(prompts))
    results = []
    base = load_chat_model(model=config.model.name_or_path)
    results.append(evaluate(base.model, base.tokenizer, config, prompts, f"base ({config.model.name_or_path})", k=k))
    if adapter is not None:
        tuned = load_chat_model(adapter=adapter, model=config.model.name_or_path)
        results.append(evaluate(tuned.model, tuned.tokenizer, config, prompts, f"adapter ({adapter})", k=k))
    return results
