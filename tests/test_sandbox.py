"""Hostile generated code: bounded, scored, and unable to touch the host."""

import os
import time
from pathlib import Path


from brainforge.rewards.code_execution import build_program, code_execution
from brainforge.rewards.sandbox import SandboxLimits, run_python

FAST = SandboxLimits(wall_seconds=5, cpu_seconds=3, memory_mb=256)


def test_passing_and_failing_programs():
    assert run_python("assert 1 + 1 == 2\nprint('ok')", FAST).passed
    result = run_python("assert 1 + 1 == 3", FAST)
    assert not result.passed and "AssertionError" in result.stderr


def test_infinite_loop_is_killed_in_time():
    started = time.time()
    result = run_python("while True:\n    pass", SandboxLimits(wall_seconds=2, cpu_seconds=60))
    assert not result.passed and time.time() - started < 10


def test_sleeping_forever_hits_the_wall_clock():
    started = time.time()
    result = run_python("import time\ntime.sleep(100)", SandboxLimits(wall_seconds=1.5))
    assert result.timed_out and time.time() - started < 8


def test_memory_bomb_is_bounded():
    result = run_python("x = bytearray(4 * 1024 ** 3)", FAST)
    assert not result.passed and "MemoryError" in result.stderr


def test_fork_bomb_is_refused():
    result = run_python("import os\nwhile True:\n    os.fork()", FAST)
    assert not result.passed


def test_subprocess_is_refused():
    result = run_python("import subprocess\nsubprocess.run(['echo', 'hi'])", FAST)
    assert not result.passed and "not allowed" in result.stderr


def test_no_network():
    program = "import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=2)"
    result = run_python(program, FAST)
    assert not result.passed


def test_network_namespace_is_empty():
    """Beyond the audit hook: the process's own network namespace has only loopback."""
    program = "print(sorted(l.split(':')[0].strip() for l in open('/proc/self/net/dev').readlines()[2:]))"
    result = run_python(program, FAST)
    assert result.passed and result.stdout.strip() == "['lo']"


def test_cannot_write_outside_its_directory(tmp_path):
    target = Path.home() / f"brainforge-sandbox-escape-{os.getpid()}"
    result = run_python(f"open({str(target)!r}, 'w').write('x')", FAST)
    assert not result.passed and not target.exists()
    inside = run_python("open('scratch.txt', 'w').write('fine')\nprint(open('scratch.txt').read())", FAST)
    assert inside.passed and inside.stdout.strip() == "fine"


def test_output_is_capped():
    result = run_python("print('x' * 10_000_000)", SandboxLimits(max_output_bytes=10_000))
    assert len(result.stdout) <= 10_000


def test_code_execution_reward_with_humaneval_layout():
    tests = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
    good = "```python\ndef square(x):\n    return x * x\n```"
    bad = "```python\ndef square(x):\n    return x + x\n```"
    looping = "```python\ndef square(x):\n    while True: pass\n```"
    rewards = code_execution(["p"] * 4, [good, bad, looping, "no tests here"], tests=[tests, tests, tests, None],
                             entry_point=["square"] * 4, wall_seconds=2)
    assert rewards == [1.0, 0.0, 0.0, None]
    continued = build_program("    return x * x\n", tests, "square", prefix="def square(x):\n")
    assert run_python(continued, FAST).passed
