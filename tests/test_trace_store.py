"""The SQLite trace store (issue 12, item 2): every field round-trips exactly (log-probs
included), several threads and processes write calls to the same rollouts without a lost or
duplicated index, a writer killed with SIGKILL leaves a sound store holding everything it
committed, and bad ids / bad files are one-line errors naming the store."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from brainforge.agents.store import (
    CallRecord,
    TraceStore,
    ToolEvent,
    UnknownRolloutError,
    resolve_store_path,
)
from brainforge.errors import BrainforgeError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
DEADLINE_S = 120.0
"""Generous: two shared cores, four other people's tests."""


def make_call(rollout_id: str | None, n: int = 0, **changes) -> CallRecord:
    values = dict(
        rollout_id=rollout_id,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {n} é ✓"}],
        tools=[{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}],
        prompt_ids=[1, 2, 3, 151643 + n],
        completion_ids=[7, 8, 151645],
        logprobs=[-0.1, -1.2345678901234567e-7, -23.000000000000004],
        text=f"answer {n}",
        tool_calls=[{"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": '{"x": "1+1"}'}}],
        finish_reason="tool_calls",
        params={"temperature": 0.7, "top_p": 0.95, "max_tokens": 64, "stop": ["\n\n"], "n": 1},
        policy_version="step-3",
    )
    values.update(changes)
    return CallRecord(**values)


# ------------------------------------------------------------------------------ round trip


def test_every_field_round_trips_exactly(tmp_path):
    import numpy as np

    store = TraceStore(tmp_path / "deep" / "folder" / "traces.sqlite")
    rid = store.start_rollout(task_id="t-7", group_id="step-1/task-7", task={"prompt": "2+2?", "answer": "4"},
                              metadata={"sample": 2, "nested": {"a": [1, 2]}})
    # float32 log-probs as a sampler gives them: stored as the doubles they are, not re-rounded
    f32 = np.array([-0.1, -2.5e-8, -13.7], dtype=np.float32)
    first = make_call(rid, logprobs=list(f32), completion_ids=list(np.array([5, 6, 7], dtype=np.int64)), reward=0.25,
                      tokenizer="151665:abcdef0123456789")
    call_id = store.record_call(first)
    second = make_call(rid, 1, tools=None, tool_calls=[], finish_reason="stop", logprobs=[-1e-300, -0.0, -745.1332191019412])
    store.record_call(second)
    assert (first.call_id, first.index, second.index) == (call_id, 0, 1) and first.created > 0
    store.record_tool(ToolEvent(rid, "calc", {"x": "1+1"}, "2", call_index=0))
    store.record_tool(ToolEvent(rid, "python", "print(1", "", error="SyntaxError: '(' was never closed", call_index=1))
    store.set_reward(rid, 0.5, call_index=1)
    assert store.finish_rollout(rid, "succeeded", reward=1.0)

    reopened = TraceStore(tmp_path / "deep" / "folder" / "traces.sqlite", create=False)
    record = reopened.get_rollout(rid)
    assert (record.task_id, record.group_id, record.task, record.metadata) == (
        "t-7", "step-1/task-7", {"prompt": "2+2?", "answer": "4"}, {"sample": 2, "nested": {"a": [1, 2]}})
    assert (record.status, record.reward, record.error, record.num_calls) == ("succeeded", 1.0, None, 2)
    assert record.finished is not None and record.finished >= record.created
    got_first, got_second = record.calls
    for got, sent in ((got_first, first), (got_second, second)):
        for name in ("rollout_id", "messages", "tools", "prompt_ids", "completion_ids", "text", "tool_calls",
                     "finish_reason", "params", "policy_version", "call_id", "index", "created", "tokenizer"):
            assert getattr(got, name) == getattr(sent, name), name
    assert got_first.logprobs == [float(v) for v in f32]  # bit-exact doubles of the float32 values
    assert [v.hex() for v in got_second.logprobs] == [v.hex() for v in second.logprobs]
    assert got_first.completion_ids == [5, 6, 7] and all(type(v) is int for v in got_first.completion_ids)
    assert (got_first.reward, got_second.reward) == (0.25, 0.5)
    assert [(e.name, e.arguments, e.output, e.error, e.call_index) for e in record.tool_events] == [
        ("calc", {"x": "1+1"}, "2", None, 0), ("python", "print(1", "", "SyntaxError: '(' was never closed", 1)]
    assert reopened.calls(rid) == record.calls


def test_listing_filters_and_counts(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite")
    ids = [store.start_rollout(f"r{i}", task_id=f"t{i % 2}", group_id=f"g{i % 3}") for i in range(6)]
    for i in range(3):
        store.record_call(make_call("r0", i))
    store.finish_rollout("r1", "failed", error="agent raised ValueError")
    store.finish_rollout("r2", "timeout")
    assert [r.rollout_id for r in store.list_rollouts()] == ids
    assert [r.rollout_id for r in store.list_rollouts(newest_first=True, limit=2)] == ["r5", "r4"]
    assert [r.rollout_id for r in store.list_rollouts(status="running")] == ["r0", "r3", "r4", "r5"]
    assert [r.rollout_id for r in store.list_rollouts(group_id="g0")] == ["r0", "r3"]
    assert [r.rollout_id for r in store.list_rollouts(task_id="t1", status="failed")] == ["r1"]
    listed = store.list_rollouts(limit=1)[0]
    assert (listed.num_calls, listed.calls, listed.tool_events) == (3, [], [])
    with pytest.raises(BrainforgeError, match="status 'done'"):
        store.list_rollouts(status="done")
    names = {row[0] for row in sqlite3.connect(store.path).execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"rollouts_by_status", "rollouts_by_group", "rollouts_by_task"} <= names


def test_rollout_lifecycle(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite")
    assert store.is_open("external-1")  # unknown: calls may open it
    store.ensure_rollout("external-1")
    store.ensure_rollout("external-1")
    assert store.get_rollout("external-1").status == "running" and store.is_open("external-1")
    # a call for an id the store has never seen creates the rollout (external agents name their own ids)
    store.record_call(make_call("external-2"))
    assert store.get_rollout("external-2").num_calls == 1
    # a call outside any rollout has no index
    loose = make_call(None)
    store.record_call(loose)
    assert loose.index is None and loose.call_id is not None

    assert store.finish_rollout("external-1", "failed")
    assert not store.is_open("external-1")
    # the first finish wins; a later one only fills in a missing reward
    assert not store.finish_rollout("external-1", "succeeded", reward=0.75)
    record = store.get_rollout("external-1")
    assert (record.status, record.reward) == ("failed", 0.75)
    assert not store.finish_rollout("external-1", "succeeded", reward=0.1)
    assert store.get_rollout("external-1").reward == 0.75

    with pytest.raises(BrainforgeError, match="already exists"):
        store.start_rollout("external-1")
    with pytest.raises(BrainforgeError, match="not a finished status"):
        store.finish_rollout("external-2", "running")
    with pytest.raises(BrainforgeError, match="finite number"):
        store.set_reward("external-2", float("nan"))
    with pytest.raises(BrainforgeError, match="finite number"):
        store.set_reward("external-2", "1.0")
    with pytest.raises(BrainforgeError, match="has no call 5 .it has 1 calls"):
        store.set_reward("external-2", 1.0, call_index=5)
    with pytest.raises(BrainforgeError, match="one per token"):
        store.record_call(make_call("external-2", logprobs=[-0.1]))


@pytest.mark.parametrize("operation", [
    lambda s: s.get_rollout("no-such-id"),
    lambda s: s.calls("no-such-id"),
    lambda s: s.set_reward("no-such-id", 1.0),
    lambda s: s.set_reward("no-such-id", 1.0, call_index=0),
    lambda s: s.finish_rollout("no-such-id", "succeeded"),
], ids=["get_rollout", "calls", "set_reward", "set_call_reward", "finish_rollout"])
def test_unknown_rollout_is_a_one_line_error_naming_id_and_store(tmp_path, operation):
    store = TraceStore(tmp_path / "t.sqlite")
    with pytest.raises(UnknownRolloutError) as caught:
        operation(store)
    message = str(caught.value)
    assert "'no-such-id'" in message and str(store.path) in message and "\n" not in message


# ------------------------------------------------------------------------------ bad files


def test_a_file_that_is_not_sqlite_is_a_one_line_error(tmp_path):
    junk = tmp_path / "traces.sqlite"
    junk.write_bytes(b"this is a text file, not a database\n" * 200)
    with pytest.raises(BrainforgeError) as caught:
        TraceStore(junk)
    assert str(junk) in str(caught.value) and "not a database" in str(caught.value) and "\n" not in str(caught.value)
    assert junk.read_bytes().startswith(b"this is a text file")  # left untouched


def test_a_truncated_store_is_a_one_line_error(tmp_path):
    path = tmp_path / "t.sqlite"
    store = TraceStore(path)
    store.record_call(make_call("r"))
    store.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 400)  # header kept, first page damaged
    with pytest.raises(BrainforgeError, match=str(path)):
        TraceStore(path).get_rollout("r")


def test_other_sqlite_databases_and_newer_schemas_are_refused(tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE people (name TEXT)")
    with pytest.raises(BrainforgeError, match=r"other\.sqlite: is an SQLite database of something else \(tables people\)"):
        TraceStore(other)

    newer = tmp_path / "newer.sqlite"
    TraceStore(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(BrainforgeError, match=r"newer\.sqlite: written by a newer brainforge \(schema 99"):
        TraceStore(newer)


def test_missing_store_and_directories(tmp_path):
    with pytest.raises(BrainforgeError, match="no such file"):
        TraceStore(tmp_path / "absent.sqlite", create=False)
    assert not (tmp_path / "absent.sqlite").exists()
    with pytest.raises(BrainforgeError, match="is a directory"):
        TraceStore(tmp_path)
    assert resolve_store_path(tmp_path) == tmp_path / "traces.sqlite"
    assert resolve_store_path(None) == Path(".brainforge") / "traces.sqlite"


def test_close_then_reuse_and_wal(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite")
    store.record_call(make_call("r"))
    store.close()
    store.close()
    store.record_call(make_call("r"))  # reopens
    assert [c.index for c in store.calls("r")] == [0, 1]
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


# ------------------------------------------------------------------------------ concurrency

WRITER = textwrap.dedent("""
    import os, sys
    from brainforge.agents.store import CallRecord, TraceStore
    path, name, count, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    store = TraceStore(path)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for i in range(count):
        rollout = f"shared-{i % 3}"
        call = CallRecord(rollout_id=rollout, messages=[{"role": "user", "content": name}], tools=None,
                          prompt_ids=[i], completion_ids=[i, 2], logprobs=[-0.5, -float(i) / 7], text=f"{name}:{i}",
                          tool_calls=[], finish_reason="stop", params={})
        store.record_call(call)
        os.write(fd, f"{rollout} {call.index} {name}:{i}\\n".encode())  # after the commit
""")


def _writer(tmp_path: Path, store: Path, name: str, count: int) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "writer.py"
    if not script.exists():
        script.write_text(WRITER)
    log = tmp_path / f"{name}.log"
    process = subprocess.Popen([sys.executable, str(script), str(store), name, str(count), str(log)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return process, log


def _check_indices(store: TraceStore, expected_total: int | None = None) -> dict[str, list[CallRecord]]:
    by_rollout = {r.rollout_id: store.calls(r.rollout_id) for r in store.list_rollouts()}
    total = 0
    for rollout_id, calls in by_rollout.items():
        assert [c.index for c in calls] == list(range(len(calls))), rollout_id  # none lost, none duplicated
        assert store.get_rollout(rollout_id).num_calls == len(calls)
        total += len(calls)
    if expected_total is not None:
        assert total == expected_total
    return by_rollout


def test_threads_and_processes_write_the_same_rollouts_at_once(tmp_path):
    path = tmp_path / "shared.sqlite"
    store = TraceStore(path)
    per_writer, processes = 40, []
    errors: list[BaseException] = []

    def thread_writer(name: str) -> None:
        try:
            for i in range(per_writer):
                store.record_call(make_call(f"shared-{i % 3}", i, text=f"{name}:{i}"))
                if i % 10 == 0:
                    store.record_tool(ToolEvent(f"shared-{i % 3}", "calc", {"i": i}, str(i)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    try:
        for k in range(3):
            processes.append(_writer(tmp_path, path, f"proc{k}", per_writer))
        threads = [threading.Thread(target=thread_writer, args=(f"thread{k}",)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE_S)
        for process, _ in processes:
            _, stderr = process.communicate(timeout=DEADLINE_S)
            assert process.returncode == 0, stderr.decode()[-2000:]
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    by_rollout = _check_indices(TraceStore(path), expected_total=7 * per_writer)
    texts = sorted(c.text for calls in by_rollout.values() for c in calls)
    expected = sorted(f"{who}{k}:{i}" for who, n in (("proc", 3), ("thread", 4)) for k in range(n) for i in range(per_writer))
    assert texts == expected
    # what each process logged as committed is in the store under the index it was given
    for process, log in processes:
        for line in log.read_text().splitlines():
            rollout, index, text = line.split()
            assert by_rollout[rollout][int(index)].text == text


def test_writer_killed_mid_way_leaves_a_sound_store_with_every_committed_call(tmp_path):
    path = tmp_path / "killed.sqlite"
    TraceStore(path).close()
    process, log = _writer(tmp_path, path, "victim", 1_000_000)
    try:
        reader = TraceStore(path)
        deadline = time.monotonic() + DEADLINE_S
        while sum(r.num_calls for r in reader.list_rollouts()) < 30:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the writer committed fewer than 30 calls in time"
            time.sleep(0.02)
        reader.close()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=DEADLINE_S)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=DEADLINE_S)
    assert process.returncode == -signal.SIGKILL

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = TraceStore(path)
    by_rollout = _check_indices(store)
    logged = log.read_text().splitlines()
    assert len(logged) >= 30
    for line in logged:  # every call the writer saw committed survived the kill
        rollout, index, text = line.split()
        assert by_rollout[rollout][int(index)].text == text
    # at most the call in flight (committed, not yet logged) is beyond the log
    assert sum(len(c) for c in by_rollout.values()) - len(logged) <= 1
    store.record_call(make_call("shared-0"))  # and it takes new writes
    _check_indices(store)


# ------------------------------------------------------------------------------ CLI: list, show ID, export


def _agent_store(path: Path) -> tuple[TraceStore, str, str]:
    """A store with one two-call tool-using rollout that succeeded and one that failed."""
    store = TraceStore(path)
    tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                               "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]
    asked = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 17 * 23?"}]
    tool_call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "17*23"}'}}
    good = store.start_rollout(task_id="mul-1", group_id="step-0/mul-1", task={"prompt": "What is 17 * 23?", "answer": "391"})
    store.record_call(make_call(good, messages=asked, tools=tools, tool_calls=[tool_call],
                                text='<tool_call>{"name": "calculator", "arguments": {"expression": "17*23"}}</tool_call>',
                                tokenizer="151665:0123456789abcdef"))
    store.record_tool(ToolEvent(good, "calculator", {"expression": "17*23"}, "391", call_index=0))
    second = [*asked, {"role": "assistant", "content": None, "tool_calls": [tool_call]},
              {"role": "tool", "tool_call_id": "call_1", "content": "391"}]
    store.record_call(make_call(good, 1, messages=second, tools=tools, tool_calls=[], finish_reason="stop",
                                text="17 * 23 = 391", completion_ids=[9, 10, 11], logprobs=[-0.25, -1e-9, -0.0],
                                tokenizer="151665:0123456789abcdef"))
    store.finish_rollout(good, "succeeded", reward=1.0)
    bad = store.start_rollout(task_id="mul-2", group_id="step-0/mul-2")
    store.record_call(make_call(bad, text="no idea", tool_calls=[], finish_reason="stop"))
    store.finish_rollout(bad, "failed", reward=0.0, error="wrong answer")
    return store, good, bad


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brainforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def test_traces_list_and_show_rollout(tmp_path):
    from typer.testing import CliRunner

    from brainforge.cli import app

    run = tmp_path / "run"
    store, good, bad = _agent_store(run / "traces.sqlite")
    runner = CliRunner()
    listed = runner.invoke(app, ["traces", "list", "--store", str(run)])  # a run folder is accepted
    assert listed.exit_code == 0, listed.output
    lines = [line for line in listed.output.splitlines() if good in line or bad in line]
    assert len(lines) == 2 and lines[0].index(bad) >= 0  # newest first
    assert "mul-2" in lines[0] and "failed" in lines[0] and "mul-1" in lines[1] and "succeeded" in lines[1]
    assert "2 of 2 rollouts" in listed.output
    only = runner.invoke(app, ["traces", "list", "--store", str(store.path), "--status", "succeeded", "--limit", "5"])
    assert only.exit_code == 0 and good in only.output and bad not in only.output
    grouped = runner.invoke(app, ["traces", "list", "--store", str(store.path), "--group", "step-0/mul-2"])
    assert bad in grouped.output and good not in grouped.output

    shown = runner.invoke(app, ["traces", "show", good, "--store", str(run)])
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert f"rollout {good}  status=succeeded  reward=1  calls=2  task=mul-1  group=step-0/mul-1" in out
    assert "call 0  finish=tool_calls" in out and "call 1  finish=stop" in out
    assert "[user] What is 17 * 23?" in out and "[tool] 391" in out and "tools: calculator" in out
    assert out.count("[user] What is 17 * 23?") == 1 and "(2 earlier messages as in call 0)" in out  # history not repeated
    assert "=> completion: 17 * 23 = 391" in out
    assert '=> tool call calculator({"expression": "17*23"})' in out
    assert 'tool calculator (call 0): {"expression": "17*23"}' in out and "-> 391" in out


def test_traces_show_unknown_id_exits_2_naming_the_store(tmp_path):
    store, good, _ = _agent_store(tmp_path / ".brainforge" / "traces.sqlite")
    store.close()
    result = run_cli("traces", "show", "no-such-rollout", cwd=tmp_path)  # default store: .brainforge/traces.sqlite
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == (f"error: trace store {Path('.brainforge') / 'traces.sqlite'}: no rollout with id "
                                     "'no-such-rollout'; `brainforge traces list --store PATH` shows the ids it has")
    assert run_cli("traces", "show", good, cwd=tmp_path).returncode == 0
    from typer.testing import CliRunner

    from brainforge.cli import app

    typo = CliRunner().invoke(app, ["traces", "show", str(tmp_path / "typo.jsonl"), "--store", str(store.path)])
    assert f"{tmp_path / 'typo.jsonl'}: no such trace file, nor a rollout id" in str(typo.exception)


def test_traces_show_without_file_or_store_and_list_of_bad_store(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from brainforge.cli import app

    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    missing = runner.invoke(app, ["traces", "show", "abc123"])
    assert "no such trace file, and no trace store at .brainforge/traces.sqlite" in str(missing.exception)
    a_file = runner.invoke(app, ["traces", "show", "data/missing.jsonl"])
    assert "no such trace file" in str(a_file.exception)
    absent = runner.invoke(app, ["traces", "list", "--store", "nope.sqlite"])
    assert "trace store nope.sqlite: no such file" in str(absent.exception)
    Path("junk.sqlite").write_text("not a database " * 100)
    junk = runner.invoke(app, ["traces", "list", "--store", "junk.sqlite"])
    assert "junk.sqlite: cannot be opened as an SQLite trace store" in str(junk.exception)


def test_export_loads_in_the_sft_loader_and_the_trace_loader(tmp_path):
    from typer.testing import CliRunner

    from brainforge.cli import app
    from brainforge.config import SourceConfig
    from brainforge.data.sources import load_source
    from brainforge.data.traces import load_traces

    store, good, bad = _agent_store(tmp_path / "traces.sqlite")
    out = tmp_path / "sft.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["traces", "export", "--store", str(store.path), "--format", "jsonl", "--out", str(out),
                                 "--min-reward", "1"])
    assert result.exit_code == 0, result.output
    assert f"wrote 1 rollouts to {out}" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["rollout_id"], row["task_id"], row["reward"], row["prompt"], row["response"]) == (
        good, "mul-1", 1.0, "What is 17 * 23?", "17 * 23 = 391")
    assert (row["token_ids"], row["logprobs"], row["tokenizer"]) == ([9, 10, 11], [-0.25, -1e-9, -0.0], "151665:0123456789abcdef")
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert "calculator" in row["messages"][0]["content"] and row["messages"][0]["content"].startswith("Use tools.")
    assert '<tool_call>{"name": "calculator", "arguments": {"expression": "17*23"}}</tool_call>' == row["messages"][2]["content"]
    assert row["messages"][3]["content"] == "391"
    assert row["messages"][4] == {"role": "assistant", "content": "17 * 23 = 391"}

    # SFT: `type: chat`, no column mapping
    dataset = load_source(SourceConfig(path=str(out), type="chat"), None)
    assert dataset[0]["messages"] == row["messages"]
    # LUFFY / off-policy traces: no column mapping either
    (trace,) = load_traces(out)
    assert (trace.prompt, trace.response, trace.reward, trace.token_ids, trace.logprobs, trace.tokenizer) == (
        "What is 17 * 23?", "17 * 23 = 391", 1.0, [9, 10, 11], [-0.25, -1e-9, -0.0], "151665:0123456789abcdef")
    assert trace.extra["rollout_id"] == good
    shown = runner.invoke(app, ["traces", "show", str(out)])
    assert shown.exit_code == 0 and "response: 17 * 23 = 391" in shown.output

    # an existing --out is refused unless --force; filters; nothing to export is an error, not an empty file
    again = runner.invoke(app, ["traces", "export", "--store", str(store.path), "--out", str(out)])
    assert "already exists; pass --force" in str(again.exception)
    forced = runner.invoke(app, ["traces", "export", "--store", str(store.path), "--out", str(out), "--force"])
    assert forced.exit_code == 0 and len(out.read_text().splitlines()) == 2
    failed = runner.invoke(app, ["traces", "export", "--store", str(store.path), "--out", str(out), "--force",
                                 "--status", "failed"])
    assert failed.exit_code == 0 and [json.loads(line)["rollout_id"] for line in out.read_text().splitlines()] == [bad]
    none = runner.invoke(app, ["traces", "export", "--store", str(store.path), "--out", str(tmp_path / "none.jsonl"),
                               "--group", "nope"])
    assert "no rollout to export (group nope" in str(none.exception) and not (tmp_path / "none.jsonl").exists()
    bad_format = runner.invoke(app, ["traces", "export", "--store", str(store.path), "--out", str(tmp_path / "x"),
                                     "--format", "csv"])
    assert "only jsonl" in str(bad_format.exception)


def test_export_skips_rollouts_that_cannot_be_examples(tmp_path):
    from brainforge.agents.export import export_jsonl

    store = TraceStore(tmp_path / "t.sqlite")
    store.start_rollout("no-calls")
    store.record_call(make_call("empty-reply", text="  "))
    store.record_call(make_call("inf-logprob", logprobs=[-0.1, float("-inf"), -0.2], tool_calls=[]))
    report = export_jsonl(store, tmp_path / "out.jsonl")
    assert report.written == 1 and report.skipped == {"no LLM call": 1, "empty final reply": 1}
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    # a non-finite log-prob cannot go into a trace file: the ids and log-probs are left out, the text stays
    assert row["rollout_id"] == "inf-logprob" and "logprobs" not in row and "token_ids" not in row
