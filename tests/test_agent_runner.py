"""The agent runner: K rollouts per task, concurrently; an agent that raises, hangs or returns
junk is counted as failed and the others go on; results stay in task-major order."""

from __future__ import annotations

import threading
import time

import pytest

from brainforge.agents.runner import Agent, load_agent, run_rollouts
from brainforge.agents.store import TraceStore
from brainforge.config import AgentSettings
from brainforge.errors import ConfigError

URL = "http://127.0.0.1:9/v1"  # never contacted: these agents make no LLM call


def test_rollouts_are_task_major_and_recorded(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite")
    seen = []

    def agent(task, client, prompt=None):
        seen.append((task["n"], prompt, client.default_headers["X-Rollout-Id"]))
        return task["n"] * 10

    results = run_rollouts(Agent(agent), [{"n": 1}, {"n": 2}, {"n": 3}], 2, URL, store, prompt="P", timeout_s=60,
                           max_concurrency=4, group_prefix="step-0/", task_ids=["a", "b", "c"])
    assert [(r.task_index, r.sample_index, r.reward) for r in results] == [(0, 0, 10), (0, 1, 10), (1, 0, 20), (1, 1, 20), (2, 0, 30), (2, 1, 30)]
    assert {p for _, p, _ in seen} == {"P"}
    # each rollout's client carried its own rollout id, and the store closed each with its reward
    assert sorted(h for _, _, h in seen) == sorted(r.rollout_id for r in results)
    for result in results:
        record = store.get_rollout(result.rollout_id)
        assert record.status == "succeeded" and record.reward == result.reward
    assert {r.group_id for r in store.list_rollouts()} == {"step-0/a", "step-0/b", "step-0/c"}


def test_raising_hanging_and_junk_agents_are_counted_and_the_rest_go_on(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite")
    release = threading.Event()

    def agent(task, client):  # no prompt parameter: called with two arguments
        if task["kind"] == "raise":
            raise RuntimeError("tool exploded")
        if task["kind"] == "hang":
            release.wait()  # never set while the runner waits
            return 1.0
        if task["kind"] == "junk":
            return "very good"
        if task["kind"] == "nan":
            return float("nan")
        if task["kind"] == "none":
            return None
        return 0.5

    tasks = [{"kind": k} for k in ("ok", "raise", "hang", "junk", "nan", "none")]
    started = time.perf_counter()
    try:
        results = run_rollouts(Agent(agent), tasks, 1, URL, store, prompt=None, timeout_s=3, max_concurrency=6)
    finally:
        release.set()
    by_kind = {t["kind"]: r for t, r in zip(tasks, results)}
    assert by_kind["ok"].status == "succeeded" and by_kind["ok"].reward == 0.5
    assert by_kind["none"].status == "succeeded" and by_kind["none"].reward is None  # scored by the reward functions
    assert by_kind["raise"].status == "failed" and "RuntimeError: tool exploded" in by_kind["raise"].error
    assert by_kind["hang"].status == "timeout" and "timed out" in by_kind["hang"].error
    assert by_kind["junk"].status == "failed" and "must return a number" in by_kind["junk"].error
    assert by_kind["nan"].status == "failed" and "non-finite" in by_kind["nan"].error
    assert store.get_rollout(by_kind["hang"].rollout_id).status == "timeout"
    assert not store.is_open(by_kind["hang"].rollout_id)  # the server refuses its late calls
    assert time.perf_counter() - started < 120  # the hung agent did not hold the step


def test_concurrency_is_bounded(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite")
    lock, running, peak = threading.Lock(), [0], [0]
    gate = threading.Barrier(3, timeout=60)

    def agent(task, client):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if task["i"] < 3:
            gate.wait()  # the first three must run at the same time, or this times out
        with lock:
            running[0] -= 1
        return 1.0

    results = run_rollouts(Agent(agent), [{"i": i} for i in range(9)], 1, URL, store, prompt=None, timeout_s=120, max_concurrency=3)
    assert all(r.status == "succeeded" for r in results)
    assert peak[0] == 3


def test_load_agent_from_file_and_module(tmp_path):
    path = tmp_path / "my_agent.py"
    path.write_text("def solve(task, client, prompt=None):\n    return 1.0\n")
    agent = load_agent(AgentSettings(function=f"{path}:solve"))
    assert agent.takes_prompt and agent.function({}, None) == 1.0
    assert load_agent(AgentSettings(function="brainforge.agents.runner:task_dict")).function is not None
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_agent(AgentSettings(function=f"{path}:nope"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_agent(AgentSettings(function=f"{tmp_path / 'missing.py'}:solve"))
    with pytest.raises(ConfigError, match="cannot import"):
        load_agent(AgentSettings(function="no_such_package_xyz.agent:solve"))
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('half-written')\n")
    with pytest.raises(ConfigError, match="importing .*broken.py failed"):
        load_agent(AgentSettings(function=f"{broken}:solve"))
