"""Held-out success of an agent: `brainforge eval` for agent configs (agent_grpo, apo, agent_sft).

The configured agent runs once on each held-out task (`split: test` of the config's sources)
against an in-process policy server holding the model to evaluate, greedy by default (the
server imposes the temperature, whatever the agent asks for). Success = the rollout's reward
reaches `algorithm.agent.min_reward`; failed and timed-out rollouts count as failures. The
rollouts are recorded in a trace store like any other, for `brainforge traces show`.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from brainforge.agents.runner import load_agent, run_rollouts
from brainforge.agents.store import TraceStore
from brainforge.config import BrainforgeConfig


@dataclass
class AgentEvalResult:
    model: str
    tasks: int
    success_rate: float
    mean_reward: float
    failed: int
    """Rollouts that raised or timed out (counted as failures)."""
    calls_per_task: float
    tool_calls_per_task: float
    by_kind: dict[str, str] = field(default_factory=dict)
    """Successes per task `kind` column, e.g. {"calculator": "12/44"}."""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def summary(self) -> str:
        kinds = "  ".join(f"{k} {v}" for k, v in sorted(self.by_kind.items()))
        return (f"{self.model:60} success {self.success_rate:.3f}   mean reward {self.mean_reward:.3f}   "
                f"tool calls/task {self.tool_calls_per_task:.2f}   {kinds}   ({self.tasks} tasks, {self.failed} failed, {self.seconds:.0f}s)")


def evaluate_agent(model: Any, tokenizer: Any, chat_template: str, config: BrainforgeConfig, tasks: list[dict[str, Any]],
                   label: str, store: TraceStore, *, prompt: str | None = None, temperature: float = 0.0) -> AgentEvalResult:
    """Run the configured agent once per task against `model` and score the rollouts."""
    from brainforge.agents.run import policy_server, server_api_key

    agent_settings = config.algorithm.agent
    started = time.perf_counter()
    server = policy_server(config, model, tokenizer, chat_template, store, forced_sampling=(temperature, 1.0))
    with server:
        results = run_rollouts(load_agent(agent_settings), tasks, 1, server.base_url, store,
                               prompt=prompt if prompt is not None else agent_settings.system_prompt,
                               timeout_s=agent_settings.timeout_s, max_concurrency=agent_settings.max_concurrency,
                               group_prefix=f"eval/{label}/", api_key=server_api_key(config))
    wins: dict[str, list[bool]] = defaultdict(list)
    rewards, calls, tool_calls = [], 0, 0
    for task, result in zip(tasks, results):
        won = result.reward is not None and result.reward >= agent_settings.min_reward
        wins[str(task.get("kind", "all"))].append(won)
        rewards.append(result.reward if result.reward is not None else 0.0)
        made = store.calls(result.rollout_id)
        calls += len(made)
        tool_calls += sum(len(c.tool_calls) for c in made)
    n = max(len(results), 1)
    statuses = Counter(r.status for r in results)
    return AgentEvalResult(model=label, tasks=len(results), success_rate=sum(sum(w) for w in wins.values()) / n,
                           mean_reward=sum(rewards) / n, failed=statuses["failed"] + statuses["timeout"],
                           calls_per_task=calls / n, tool_calls_per_task=tool_calls / n,
                           by_kind={k: f"{sum(w)}/{len(w)}" for k, w in wins.items()}, seconds=time.perf_counter() - started)


def run_agent_eval(config: BrainforgeConfig, adapter: Path | None, limit: int | None, store_path: Path,
                   include_base: bool = True) -> list[AgentEvalResult]:
    """Base model, and base + adapter when given, on the first `limit` held-out tasks; for an
    apo run folder (no adapter, a best_prompt.txt), the base model with its best prompt."""
    from brainforge.agents.run import agent_tasks
    from brainforge.data.templates import chat_format
    from brainforge.inference import load_chat_model

    tasks = agent_tasks(config, "test")[:limit] if limit else agent_tasks(config, "test")
    prompt = _best_prompt(adapter) if adapter is not None else None
    store = TraceStore(store_path)
    results = []
    models: list[tuple[Path | None, str]] = [(None, f"base ({config.model.name_or_path})")] if include_base else []
    if adapter is not None and _has_adapter(adapter):
        models.append((adapter, f"adapter ({adapter})"))
    for path, label in models:
        loaded = load_chat_model(adapter=path, model=config.model.name_or_path)
        template = chat_format(config.datasets.output_format, loaded.tokenizer).template
        results.append(evaluate_agent(loaded.model, loaded.tokenizer, template, config, tasks, label, store))
    if prompt is not None:  # an apo run: its best prompt, on the base model
        loaded = load_chat_model(model=config.model.name_or_path)
        template = chat_format(config.datasets.output_format, loaded.tokenizer).template
        results.append(evaluate_agent(loaded.model, loaded.tokenizer, template, config, tasks, f"base + APO prompt ({adapter})",
                                      store, prompt=prompt))
    return results


def _has_adapter(run: Path) -> bool:
    return (run / "adapter").is_dir() or (run / "adapter_config.json").is_file()


def _best_prompt(run: Path) -> str | None:
    path = run / "best_prompt.txt"
    return path.read_text() if path.is_file() else None
