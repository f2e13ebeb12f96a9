"""The GRPO recipe: prompts + rewards in, adapter + curves out.

Adds to the run folder (see run.py): `reward_kl.png` (reward and KL per step) and GRPO
figures in `metrics.json` (reward at the start and end, time per step by phase).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from brainforge.config import BrainforgeConfig, dump_config
from brainforge.data.prompts import PromptExample, load_prompts
from brainforge.data.traces import Trace
from brainforge.data.templates import chat_format
from brainforge.inference import ChatModel
from brainforge.models.modes import kept_modes
from brainforge.training.checkpointing import AdapterCheckpoint, write_adapter
from brainforge.training.grpo import GRPOModule
from brainforge.training.run import build_trainer, peak_rss_mb, write_samples

log = logging.getLogger(__name__)


class PromptDataModule(L.LightningDataModule):
    def __init__(self, prompts: list[PromptExample], prompts_per_step: int, num_workers: int = 0,
                 retired: Callable[[str], bool] | None = None, seed: int = 0):
        super().__init__()
        self.prompts = prompts
        self.prompts_per_step = prompts_per_step
        self.num_workers = num_workers
        self.retired = retired
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        if self.retired is None:
            return DataLoader(self.prompts, batch_size=self.prompts_per_step, shuffle=True, drop_last=True,
                              collate_fn=list, num_workers=self.num_workers)
        sampler = RetiringSampler(self.prompts, self.retired, self.seed)
        return DataLoader(self.prompts, batch_size=self.prompts_per_step, sampler=sampler, drop_last=True,
                          collate_fn=list, num_workers=self.num_workers)


class RetiringSampler(Sampler[int]):
    """Shuffled prompt order, reshuffled each epoch, without the questions ExGRPO retired
    (solved K out of K): they carry no advantage and would only cost generation time."""

    def __init__(self, prompts: list[PromptExample], retired: Callable[[str], bool], seed: int = 0):
        from brainforge.rl.experience import question_uid

        self.uids = [question_uid(p.messages) for p in prompts]
        self.retired = retired
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _live(self) -> list[int]:
        return [i for i, uid in enumerate(self.uids) if not self.retired(uid)]

    def __iter__(self) -> Iterator[int]:
        live = self._live()
        order = torch.randperm(len(live), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        return iter([live[i] for i in order])

    def __len__(self) -> int:
        return len(self._live())


@dataclass
class RLInputs:
    """What an RL run needs besides the model, read and checked before the model loads."""

    prompts: list[PromptExample]
    traces: list[Trace] = field(default_factory=list)
    trace_report: list[str] = field(default_factory=list)


def prepare_rl_inputs(config: BrainforgeConfig, config_path: str | Path | None = None) -> RLInputs:
    """Prompts, and for luffy/hybrid the traces, for search_r1 the store: a bad or empty
    trace set or store fails here, in seconds, not after the model has loaded."""
    settings = config.algorithm.grpo
    prompts = training_prompts(config)
    if len(prompts) < settings.prompts_per_step:
        from brainforge.errors import DataError

        raise DataError(f"only {len(prompts)} prompts for prompts_per_step={settings.prompts_per_step}; add prompts or lower algorithm.grpo.prompts_per_step")
    inputs = RLInputs(prompts)
    if config.algorithm.name == "search_r1":
        from brainforge.reasoning.search_r1 import search_prompt
        from brainforge.reasoning.search_tool import require_search_store

        chunks = require_search_store(config.memory, config_path)
        inputs.prompts = [search_prompt(p, config.algorithm.search) for p in prompts]
        inputs.trace_report = [f"memory store {config.memory.store}: {chunks} chunks"]
    if config.algorithm.name in ("luffy", "hybrid"):
        from brainforge.training.luffy import check_trace_config, collect_traces

        check_trace_config(config.algorithm.off_policy, config.algorithm.name)
        inputs.traces, inputs.trace_report = collect_traces(config.algorithm.off_policy, prompts)
        if not inputs.traces:
            from brainforge.errors import DataError

            raise DataError("algorithm.off_policy.traces: the trace sources hold no traces (" + "; ".join(inputs.trace_report) + ")")
    return inputs


def run_grpo(config: BrainforgeConfig, run_dir: Path, checkpoint: Path | None, model: Any, tokenizer: Any,
             inputs: RLInputs | None = None) -> Path:
    settings = config.algorithm.grpo
    fmt = chat_format(config.datasets.output_format, tokenizer)
    inputs = inputs or prepare_rl_inputs(config)
    prompts = inputs.prompts
    if settings.reference_adapter:
        with kept_modes(model):  # load_adapter puts the whole model in eval mode: the policy's dropout would be off
            model.load_adapter(settings.reference_adapter, adapter_name="reference", is_trainable=False)
        model.set_adapter("default")  # the reference's modules stay in eval mode; its passes run in eval mode anyway
    total_steps = planned_grpo_steps(config, len(prompts))
    module = build_rl_module(config, model, tokenizer, fmt.template, inputs, total_steps, run_dir)
    datamodule = PromptDataModule(prompts, settings.prompts_per_step, config.data.num_workers,
                                  retired=module.replay.buffer.is_retired if module.replay is not None else None, seed=config.training.seed)
    meta = {"model": config.model.name_or_path, "output_format": config.datasets.output_format, "algorithm": config.algorithm.name}
    checkpointer = AdapterCheckpoint(run_dir / "checkpoints", config.training.save_every_n_steps,
                                     config.training.save_total_limit, tokenizer, fmt.template, meta)
    trainer = build_trainer(config, run_dir, total_steps, checkpointer, has_val=False)
    if trainer.is_global_zero:
        dump_config(config, run_dir / "config.yaml")
        log.info("run folder: %s (%d %s steps, %d prompts, %d completions per step)", run_dir, total_steps,
                 config.algorithm.name, len(prompts), settings.prompts_per_step * settings.num_generations)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint / "trainer_state.ckpt") if checkpoint else None)
    seconds = time.perf_counter() - started
    if trainer.is_global_zero:
        write_adapter(model, tokenizer, fmt.template, run_dir / "adapter", {**meta, "step": trainer.global_step})
        if module.search is not None:
            write_search_samples(model, tokenizer, config, module.search.search, run_dir / "samples.jsonl")
        else:
            write_samples(ChatModel(model, tokenizer), config, run_dir / "samples.jsonl")
        plot_curves(module.history, run_dir / "reward_kl.png", TITLES[config.algorithm.name])
        write_grpo_metrics(run_dir / "metrics.json", module.history, trainer.global_step, seconds)
    return run_dir


def build_rl_module(config: BrainforgeConfig, model: Any, tokenizer: Any, chat_template: str, inputs: RLInputs,
                    total_steps: int, run_dir: Path | None = None) -> GRPOModule:
    """The one RL core, with LUFFY's trace slots and/or ExGRPO's replay plugged in, or fed
    by an agent's recorded calls (agent_grpo; its trace store lives in `run_dir`)."""
    algorithm = config.algorithm
    settings = algorithm.grpo
    if algorithm.name == "agent_grpo":
        from brainforge.agents.run import build_agent_grpo_module

        assert run_dir is not None
        return build_agent_grpo_module(config, model, tokenizer, chat_template, total_steps, run_dir)
    if algorithm.name == "grpo":
        return GRPOModule(model, tokenizer, chat_template, settings, config.training, total_steps)
    if algorithm.name == "search_r1":
        return build_search_r1_module(config, model, tokenizer, chat_template, inputs, total_steps)
    module = GRPOModule(model, tokenizer, chat_template, settings, config.training, total_steps, off_policy=algorithm.off_policy)
    if algorithm.name in ("luffy", "hybrid"):
        from brainforge.training.luffy import prepare_trace_slots

        def score(prompts: list[PromptExample], texts: list[str]) -> list[float]:
            return score_texts(module, prompts, texts)

        module.traces = prepare_trace_slots(algorithm.off_policy, inputs.prompts, inputs.traces, tokenizer, chat_template,
                                            settings.max_new_tokens, score, algorithm.experience.success_threshold, config.training.seed)
        for line in inputs.trace_report + module.traces.report:
            log.info("traces: %s", line)
    if algorithm.name in ("exgrpo", "hybrid"):
        from brainforge.training.exgrpo import ExperienceReplay

        module.replay = ExperienceReplay(algorithm.experience, settings.num_generations, replay_signature(config), config.training.seed,
                                         skip_truncated=settings.mask_truncated_completions)
    return module


def write_search_samples(model: Any, tokenizer: Any, config: BrainforgeConfig, search: Any, path: Path) -> None:
    """search_r1's "Test Generation": the test prompts answered as `ask --adapter` answers
    them, by greedy search rollouts (transcript, searches, answer per question)."""
    from brainforge.reasoning.policy import answer_with_search
    from brainforge.reasoning.rollout import search_messages

    questions = config.training.test_prompts
    model.eval()
    prompts = [search_messages(q, config.algorithm.search, config.data.system_prompt) for q in questions]
    answers = answer_with_search(model, tokenizer, config, prompts, search) if questions else []
    with path.open("w") as handle:
        for question, (transcript, answer, search_log) in zip(questions, answers):
            handle.write(json.dumps({"prompt": question, "answer": answer, "searches": search_log.queries,
                                     "completion": transcript}) + "\n")


def build_search_r1_module(config: BrainforgeConfig, model: Any, tokenizer: Any, chat_template: str, inputs: RLInputs,
                           total_steps: int) -> GRPOModule:
    """GRPO on multi-turn search rollouts; the cold start's search traces go into LUFFY
    slots (with the off-policy loss) or a supervised warm-up."""
    from brainforge.reasoning.search_r1 import SEARCH_REWARDS, SearchRollouts, SearchTraces, tag_kwargs
    from brainforge.reasoning.search_tool import MemorySearch

    search_settings = config.algorithm.search
    settings = config.algorithm.grpo
    luffy = search_settings.cold_start == "luffy" and search_settings.trace_slots > 0
    module = GRPOModule(model, tokenizer, chat_template, settings, config.training, total_steps,
                        off_policy=config.algorithm.off_policy if luffy else None,
                        warmup_steps=search_settings.warmup_steps if search_settings.cold_start == "sft" else 0)
    search = MemorySearch(config.memory, search_settings)
    module.search = SearchRollouts(module.engine, search, search_settings)
    module.loss_config = dataclasses.replace(module.loss_config, max_completion_length=search_settings.max_total_tokens)
    if luffy:
        module.traces = SearchTraces(tokenizer, search, search_settings, search_settings.trace_slots)
    elif search_settings.cold_start == "sft":
        module.warmup_traces = SearchTraces(tokenizer, search, search_settings, 1)
    module.rewards = [(name, function, weight, {**tag_kwargs(search_settings), **kwargs} if name in SEARCH_REWARDS else kwargs)
                      for name, function, weight, kwargs in module.rewards]
    return module


def replay_signature(config: BrainforgeConfig) -> dict[str, Any]:
    """What a saved experience buffer must agree with to be replayed: its token ids, log-probs
    and success counts mean nothing under another model, template, K or bounds."""
    experience = config.algorithm.experience
    return {"model": config.model.name_or_path, "output_format": config.datasets.output_format,
            "num_generations": config.algorithm.grpo.num_generations, "lbound": experience.lbound,
            "rbound": experience.rbound if experience.rbound is not None else config.algorithm.grpo.num_generations - 1,
            "success_threshold": experience.success_threshold,
            "rewards": [f"{r.name}*{r.weight}" for r in config.algorithm.grpo.reward_functions]}


def score_texts(module: GRPOModule, prompts: list[PromptExample], texts: list[str]) -> list[float]:
    """Total reward of given replies (NaN = no verdict scores -inf: never a success)."""
    from brainforge.generation.engine import Rollout
    import torch

    rollout = Rollout(prompt_ids=[[] for _ in texts], completion_ids=torch.zeros((len(texts), 1), dtype=torch.long),
                      completion_mask=torch.zeros((len(texts), 1), dtype=torch.long), truncated=torch.zeros(len(texts), dtype=torch.bool), texts=texts)
    totals, _ = module.score_rows(prompts, rollout)
    return [-math.inf if math.isnan(v) else float(v) for v in totals.tolist()]


def training_prompts(config: BrainforgeConfig, limit: int | None = None) -> list[PromptExample]:
    """The RL prompts (the first `limit`), with memory context and SOP when memory is enabled."""
    prompts = load_prompts(config.sources(), config.data.system_prompt)[:limit]
    if config.memory.enabled:
        from brainforge.memory.assistant import augment_with_memory

        for prompt, messages in zip(prompts, augment_with_memory([p.messages for p in prompts], config.memory)):
            prompt.messages = messages
    return prompts


def planned_grpo_steps(config: BrainforgeConfig, num_prompts: int) -> int:
    """GRPO steps (one rollout batch each, `num_iterations` optimizer updates per step):
    max_steps, or epochs x batches."""
    settings = config.algorithm.grpo
    if config.training.max_steps is not None:
        return config.training.max_steps
    assert config.training.num_epochs is not None
    return config.training.num_epochs * (num_prompts // settings.prompts_per_step)


TITLES = {"grpo": "GRPO", "luffy": "LUFFY", "exgrpo": "ExGRPO", "hybrid": "LUFFY + ExGRPO", "search_r1": "Search-R1",
          "agent_grpo": "Agent GRPO"}


def plot_curves(history: list[dict[str, float]], path: Path, title: str = "GRPO") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [h for h in history if "reward/mean" in h]  # not the supervised warm-up steps
    steps = [h["step"] for h in history]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [h["reward/mean"] for h in history], label="reward (mean of the step)")
    top.plot(steps, _moving_average([h["reward/mean"] for h in history], 10), label="reward, 10-step average")
    if any("reward/on_policy_mean" in h for h in history):  # luffy/exgrpo: the traces lift reward/mean by themselves
        own = [h.get("reward/on_policy_mean", math.nan) for h in history]
        top.plot(steps, _moving_average(own, 10), label="own samples only, 10-step average")
    top.set_ylabel("reward")
    top.legend(loc="best")
    bottom.plot(steps, [h["kl"] for h in history], color="tab:red")
    bottom.set_ylabel("KL to reference")
    bottom.set_xlabel("optimizer step")
    figure.suptitle(f"{title} training")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def write_grpo_metrics(path: Path, history: list[dict[str, float]], steps: int, seconds: float) -> None:
    def mean(key: str, rows: list[dict[str, float]]) -> float | None:
        values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        return round(sum(values) / len(values), 4) if values else None

    warmup = [h for h in history if "warmup/nll" in h]
    history = [h for h in history if "reward/mean" in h]  # RL steps (search_r1's warm-up steps are reported apart)
    head, tail = history[:5], history[-5:]
    metrics = {
        "steps": steps,
        "reward_first5_mean": mean("reward/mean", head),
        "reward_last5_mean": mean("reward/mean", tail),
        "kl_last5_mean": mean("kl", tail),
        "completion_length_mean": mean("completion/length_mean", history),
        "seconds_per_step": mean("time/step_s", history),
        # the phases this algorithm has (agent_grpo: rollouts instead of plan/generation/remember)
        "seconds_per_step_by_phase": {k.removeprefix("time/").removesuffix("_s"): mean(k, history)
                                      for k in ("time/plan_s", "time/rollouts_s", "time/generation_s", "time/rewards_s", "time/reference_s", "time/loss_s",
                                                "time/optimizer_s", "time/remember_s") if any(k in h for h in history)},
        "completion_tokens_per_s": mean("tokens_per_s/step", history),
        "train_seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if any("agent/success_rate" in h for h in history):
        metrics["agent"] = {"success_first5": mean("agent/success_rate", head), "success_last5": mean("agent/success_rate", tail),
                            "calls_per_rollout": mean("agent/calls_per_rollout", history),
                            "failed_or_timed_out": history[-1].get("agent/failed_total") if history else None}
    if warmup:
        metrics["warmup"] = {"steps": len(warmup), "nll_first": mean("warmup/nll", warmup[:1]), "nll_last": mean("warmup/nll", warmup[-1:])}
    path.write_text(json.dumps(metrics, indent=2))
