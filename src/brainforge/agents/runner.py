"""Running an agent K times per task against the policy server, concurrently, with timeouts.

An agent is a plain function `agent(task, client)` or `agent(task, client, prompt)` that
returns the rollout's reward (or None: score it with the configured reward functions). Its
`client` is an `openai.OpenAI` pointed at the policy server whose every request carries the
rollout id in a header, so the server files each LLM call under the right rollout without
the agent knowing. An agent in another process or language is an HTTP endpoint instead
(`algorithm.agent.endpoint`): each rollout is one POST of `{task, rollout_id, base_url, prompt}`
answered by `{"reward": x}`; its LLM calls carry the rollout id themselves (header
`X-Rollout-Id` or `metadata.rollout_id`).

Why threads and not a pool's futures: an agent that hangs cannot be interrupted in Python.
Each rollout runs in its own daemon thread; when it overruns `timeout_s` the rollout is
marked `timeout` in the store, the server refuses its further calls (a finished rollout
takes no more), the thread is abandoned, and the step goes on. A daemon thread never keeps
the process alive at exit.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from brainforge.agents.store import TraceStore
from brainforge.config import AgentSettings
from brainforge.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

ROLLOUT_HEADER = "X-Rollout-Id"


@dataclass
class RolloutResult:
    rollout_id: str
    task_index: int
    sample_index: int
    reward: float | None
    status: str                  # "succeeded" | "failed" | "timeout"
    error: str | None
    seconds: float


AgentFn = Callable[..., Any]


@dataclass
class Agent:
    """What the runner calls once per rollout: a function, or an HTTP endpoint."""

    function: AgentFn | None = None
    endpoint: str | None = None
    name: str = ""

    @property
    def takes_prompt(self) -> bool:
        if self.function is None:
            return True
        try:
            parameters = inspect.signature(self.function).parameters
        except (TypeError, ValueError):
            return False
        return "prompt" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())

    def __call__(self, task: dict[str, Any], client: Any, rollout_id: str, base_url: str, prompt: str | None) -> Any:
        if self.function is not None:
            return self.function(task, client, prompt=prompt) if self.takes_prompt else self.function(task, client)
        import httpx

        response = httpx.post(self.endpoint, json={"task": task, "rollout_id": rollout_id, "base_url": base_url, "prompt": prompt},
                              timeout=None)
        response.raise_for_status()
        body = response.json()
        if not isinstance(body, dict) or "reward" not in body:
            raise ValueError(f"agent endpoint {self.endpoint} answered {str(body)[:200]!r}; expected a JSON object with a 'reward'")
        return body["reward"]


def load_agent(settings: AgentSettings, base_dir: Path | None = None) -> Agent:
    """The configured agent: `package.module:function` or `path/to/file.py:function`
    (relative to `base_dir`, the config file's folder), or an endpoint URL."""
    if settings.endpoint is not None:
        return Agent(endpoint=settings.endpoint, name=settings.endpoint)
    assert settings.function is not None
    target, _, attribute = settings.function.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"algorithm.agent.function: {path} does not exist")
        module_name = f"brainforge_agent_{path.stem}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"algorithm.agent.function: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"algorithm.agent.function: cannot import {target!r} ({exc})") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"algorithm.agent.function: {target} has no function {attribute!r}")
    return Agent(function=function, name=settings.function)


def openai_client(base_url: str, rollout_id: str | None, api_key: str | None, timeout_s: float) -> Any:
    """An `openai.OpenAI` whose every request names the rollout it belongs to."""
    try:
        import openai
    except ImportError as exc:
        raise MissingDependencyError("openai", "agent", "agent training") from exc
    headers = {ROLLOUT_HEADER: rollout_id} if rollout_id else None
    return openai.OpenAI(base_url=base_url, api_key=api_key or "brainforge", default_headers=headers,
                         max_retries=0, timeout=timeout_s)


def run_rollouts(agent: Agent, tasks: list[dict[str, Any]], samples_per_task: int, base_url: str, store: TraceStore, *,
                 prompt: str | None, timeout_s: float, max_concurrency: int, group_prefix: str = "",
                 api_key: str | None = None, task_ids: list[str] | None = None) -> list[RolloutResult]:
    """`samples_per_task` rollouts of every task, at most `max_concurrency` at once; results in
    task-major order (the K rollouts of task i are rows i*K .. i*K+K-1), whatever happened to them."""
    jobs: queue.Queue[tuple[int, int, int]] = queue.Queue()
    for task_index in range(len(tasks)):
        for sample_index in range(samples_per_task):
            jobs.put((task_index * samples_per_task + sample_index, task_index, sample_index))
    results: list[RolloutResult | None] = [None] * (len(tasks) * samples_per_task)

    def work() -> None:
        while True:
            try:
                slot, task_index, sample_index = jobs.get_nowait()
            except queue.Empty:
                return
            task_id = task_ids[task_index] if task_ids else str(tasks[task_index].get("task_id", task_index))
            results[slot] = _one_rollout(agent, tasks[task_index], task_index, sample_index, base_url, store, prompt=prompt,
                                         timeout_s=timeout_s, group_id=f"{group_prefix}{task_id}", task_id=task_id, api_key=api_key)

    workers = [threading.Thread(target=work, daemon=True, name=f"rollout-worker-{i}")
               for i in range(min(max_concurrency, len(results)))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return [r for r in results if r is not None]


def _one_rollout(agent: Agent, task: dict[str, Any], task_index: int, sample_index: int, base_url: str, store: TraceStore, *,
                 prompt: str | None, timeout_s: float, group_id: str, task_id: str, api_key: str | None) -> RolloutResult:
    rollout_id = store.start_rollout(task_id=task_id, group_id=group_id, task=task, metadata={"sample": sample_index})
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def call_agent() -> None:
        try:
            client = openai_client(base_url, rollout_id, api_key, timeout_s) if agent.function is not None else None
            outcome["reward"] = agent(task, client, rollout_id, base_url, prompt)
        except BaseException as exc:  # the agent's own failure: counted, never fatal to training
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            done.set()

    started = time.perf_counter()
    threading.Thread(target=call_agent, daemon=True, name=f"agent-{rollout_id[:8]}").start()
    finished = done.wait(timeout_s)
    seconds = time.perf_counter() - started
    if not finished:
        error = f"timed out after {timeout_s:g} s"
        store.finish_rollout(rollout_id, "timeout", error=error)
        log.warning("rollout %s (task %s) %s; marked timeout", rollout_id, task_id, error)
        return RolloutResult(rollout_id, task_index, sample_index, None, "timeout", error, seconds)
    if "error" in outcome:
        store.finish_rollout(rollout_id, "failed", error=outcome["error"])
        log.warning("rollout %s (task %s) failed: %s", rollout_id, task_id, outcome["error"])
        return RolloutResult(rollout_id, task_index, sample_index, None, "failed", outcome["error"], seconds)
    reward, error = _as_reward(outcome.get("reward"))
    if error is not None:
        store.finish_rollout(rollout_id, "failed", error=error)
        log.warning("rollout %s (task %s) failed: %s", rollout_id, task_id, error)
        return RolloutResult(rollout_id, task_index, sample_index, None, "failed", error, seconds)
    store.finish_rollout(rollout_id, "succeeded", reward=reward)
    return RolloutResult(rollout_id, task_index, sample_index, reward, "succeeded", None, seconds)


def _as_reward(value: Any) -> tuple[float | None, str | None]:
    """(reward, error): a number, or None for "score it with the reward functions"."""
    if value is None:
        return None, None
    if isinstance(value, dict) and "reward" in value:
        value = value["reward"]
        if value is None:
            return None, None
    try:
        reward = float(value)
    except (TypeError, ValueError):
        return None, f"the agent returned {str(value)[:100]!r}; it must return a number (the reward) or None"
    if not math.isfinite(reward):
        return None, f"the agent returned a non-finite reward ({reward})"
    return reward, None


def task_dict(example: Any) -> dict[str, Any]:
    """The task an agent receives for a prompt example: its text, messages and columns."""
    return {"prompt": example.text, "messages": [dict(m) for m in example.messages], **example.columns}
