"""Execution-based coding reward: do the completion's functions pass the unit tests?

Two sandboxes per completion (see `sandbox` for the isolation and the threat model):
* the CANDIDATE sandbox runs the completion's code (its fenced ```python blocks, or the
  whole completion; after the dataset's `code_prefix` when the completion only continues
  the given signature) in `candidate_server`, which answers calls to its functions;
* the HARNESS sandbox runs the dataset's `code_prefix` (imports and helpers such as
  HumanEval's `poly`) and `tests` in `harness`, with the entry point (or, without one,
  every top-level callable the candidate defines) bound to proxies, then
  `check(entry_point)` when the dataset names an entry point (HumanEval's layout).
This process relays each proxy call to the candidate and each answer back, checking first
that the candidate's bytes are strict data (`wire.validate`) without building its values
(hashing chosen values can take minutes here; the harness decodes them, under its limits).
Reward 1.0 when the harness's verdict is passed and the candidate answered every call;
else 0.0. Rows without tests score None.

The candidate's exit status, printed text and objects decide nothing, and the tests
never enter its sandbox.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from brainforge.rewards import wire
from brainforge.rewards.sandbox import Sandbox, SandboxFailure, SandboxLimits, program_source, require_isolation

log = logging.getLogger(__name__)

# One run of blanks before the newline: with two (`[ \t]*(?:python|py)?[ \t]*`) a fence followed by
# 100k spaces and no newline backtracks quadratically (about 10 s here, in the trainer, unbounded).
CODE_BLOCK = re.compile(r"```[ \t]*(?:py(?:thon)?[ \t]*)?\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def extract_code(completion: str) -> str:
    blocks = CODE_BLOCK.findall(completion)
    return "\n\n".join(blocks) if blocks else completion


def candidate_source(completion: str, entry_point: str | None, prefix: str | None = None) -> str:
    """The code the candidate sandbox loads: the completion's code after the prefix. When the
    model continued the given signature, the two are one function; when it restated the
    function, the prefix still supplies the prompt's imports and helpers (a restated
    `def f(x: List[int])` needs the prompt's `from typing import List`)."""
    code = extract_code(completion)
    if not prefix or not entry_point:
        return code
    if f"def {entry_point}" not in code:
        return prefix + code
    try:
        compile(prefix, "<prefix>", "exec")
    except SyntaxError:  # a prefix that is only a fragment: the restated code stands alone
        return code
    return prefix + "\n\n" + code


def judge(code: str, tests: str, entry_point: str | None = None, prefix: str | None = None,
          limits: SandboxLimits = SandboxLimits()) -> Verdict:
    """Run `tests` (trusted, in the harness sandbox) against `code` (untrusted, in the candidate sandbox)."""
    started = time.monotonic()
    deadline = started + limits.wall_seconds
    call_seconds = limits.call_seconds or limits.wall_seconds
    with Sandbox(program_source("candidate_server"), limits, deadline) as candidate, \
            Sandbox(program_source("harness"), limits, deadline) as harness:
        try:
            loaded = candidate.request({"load": code}, min(deadline, time.monotonic() + call_seconds))
            if "names" not in loaded:
                kind, message = wire.check_exception_info(loaded.get("raise"))
                return Verdict(False, f"loading the candidate raised {kind}: {message[:200]}")
            names = wire.check_names(loaded["names"])
        except (SandboxFailure, wire.WireError) as exc:
            return Verdict(False, f"candidate while loading: {exc}")
        gone: str | None = None
        try:
            harness.send({"job": {"prefix": prefix, "tests": tests, "entry_point": entry_point, "names": names}}, deadline)
            while True:
                message = harness.recv(deadline)
                if "call" not in message and "verdict" not in message:
                    return Verdict(False, f"harness: unexpected message with keys {sorted(message)[:5]}")
                if "verdict" in message:
                    passed = message["verdict"] == "passed" and gone is None
                    return Verdict(passed, "passed" if passed else str(message.get("reason") or gone))
                if gone is None:
                    answer, gone = _relay(candidate, message, min(deadline, time.monotonic() + call_seconds))
                else:
                    answer = {"gone": gone}
                harness.send(answer, deadline)
        except (SandboxFailure, wire.WireError) as exc:
            return Verdict(False, f"harness: {exc}" if gone is None else f"candidate: {gone}")


def _relay(candidate: Sandbox, call: dict, deadline: float) -> tuple[dict, str | None]:
    """Forward one call; return (answer for the harness, reason the candidate is gone or None)."""
    request = {"call": call.get("call"), "args": call.get("args"), "kwargs": call.get("kwargs")}
    try:
        reply = candidate.request(request, deadline)
        if "return" in reply:
            return {"return": wire.validate(reply["return"])}, None  # checked as data; decoded by the harness only
        if "raise" in reply:
            return {"raise": list(wire.check_exception_info(reply["raise"]))}, None
        raise wire.WireError(f"unexpected message with keys {sorted(reply)[:5]}")
    except (SandboxFailure, wire.WireError) as exc:
        candidate.close()  # a candidate that broke the protocol or the clock answers no more calls
        return {"gone": str(exc)}, str(exc)


def code_execution(
    prompts: list[str],
    completions: list[str],
    tests: list[str | None] | None = None,
    entry_point: list[str | None] | None = None,
    code_prefix: list[str | None] | None = None,
    wall_seconds: float = 10.0,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 when the completion's code passes its row's tests, 0.0 when not, None without tests.
    `wall_seconds` bounds each completion's whole run; optional kwargs `call_seconds`,
    `memory_mb`, `cpu_seconds` tune the sandbox."""
    limit_keys = {"call_seconds", "memory_mb", "cpu_seconds", "max_processes"}
    limits = SandboxLimits(wall_seconds=wall_seconds, **{k: v for k, v in kwargs.items() if k in limit_keys})
    n = len(completions)
    tests = tests or [None] * n
    entry_point = entry_point or [None] * n
    code_prefix = code_prefix or [None] * n
    if any(tests):
        require_isolation()
    out: list[float | None] = []
    for completion, test, entry, prefix in zip(completions, tests, entry_point, code_prefix):
        if not test:
            out.append(None)
            continue
        verdict = judge(candidate_source(completion, entry, prefix), test, entry, prefix, limits)
        log.debug("code_execution verdict: %s", verdict)
        out.append(1.0 if verdict.passed else 0.0)
    return out
