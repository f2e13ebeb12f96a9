"""The trusted test harness: runs the dataset's prefix and tests against PROXIES of the
candidate's functions, and alone decides pass or fail.

It runs in its own sandbox (see `sandbox`), separate from the candidate's: the candidate
cannot signal it, read its memory, write its pipes or see its files, so nothing the
candidate does (exiting, printing "OK", hooking `sys.excepthook`, returning an object
whose `__eq__` is always True) reaches the verdict. The parent relays each proxy call to
the candidate and passes back only validated wire data, decoded here into fresh builtin
values, so every comparison in the tests runs here, on values the candidate never held.
An answer that does not decode makes the candidate gone (below), never a plain exception.

Protocol with the parent (one JSON object per line; see `wire`):
    in:  {"job": {"prefix": str|null, "tests": str, "entry_point": str|null, "names": [...]}}
    out: {"call": name, "args": [...], "kwargs": {...}}   in: {"return": v} | {"raise": [type, message]} | {"gone": reason}
    out: {"verdict": "passed"} | {"verdict": "failed", "reason": str}

A candidate exception comes back as its builtin type when that is a builtin `Exception`
subclass (a test may expect `ValueError`), else as `CandidateError`; so do StopIteration
and StopAsyncIteration, which the tests' own code would read as "no more items" (a
candidate raising them would end `for got in map(candidate, xs)` early or make
`all(map(candidate, xs))` true; PEP 479 turns them into RuntimeError in generators for
the same reason). A candidate that died, timed out or broke the protocol raises
`CandidateGone`, a BaseException so that a test's `except Exception` cannot swallow it,
and the verdict is failed whatever the tests do next.

Runs with `python3 -I -S` from the sandbox bootstrap: standard library only; `main` gets
the wire module as an argument.
"""

from __future__ import annotations

import builtins
import os
from types import ModuleType
from typing import Any, BinaryIO, Callable


class CandidateGone(BaseException):
    """The candidate died, stopped answering or broke the protocol: the run fails."""


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin Exception type."""


class NotData(BaseException):
    """The tests passed an argument that cannot cross the boundary: this task cannot be judged here."""


def main(wire: ModuleType) -> None:
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # the tests' own prints go to stderr, never into the protocol
    channel = _Channel(wire, requests, replies)
    job = wire.loads(requests.readline(wire.MAX_MESSAGE_BYTES + 1))["job"]
    try:
        run_tests(job, channel.proxy)
        verdict: dict[str, Any] = {"verdict": "passed"}
    except BaseException as exc:
        verdict = {"verdict": "failed", "reason": "{}: {}".format(*wire.exception_info(exc))[:500]}
    if channel.gone is not None:
        verdict = {"verdict": "failed", "reason": f"CandidateGone: {channel.gone}"[:500]}
    replies.write(wire.dumps(verdict))
    replies.flush()


def run_tests(job: dict[str, Any], proxy: Callable[[str], Callable[..., Any]]) -> None:
    """Execute prefix and tests with the candidate's names bound to proxies; raises on failure."""
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    if job.get("prefix"):
        try:
            prefix = compile(job["prefix"], "<prefix>", "exec")
        except SyntaxError:  # only a fragment (e.g. a bare signature): nothing the tests could use
            prefix = None
        if prefix is not None:
            exec(prefix, namespace)
    entry_point = job.get("entry_point")
    names = list(job.get("names") or [])
    if entry_point and entry_point not in names:
        raise AssertionError(f"the candidate defines no function {entry_point!r}")
    if entry_point:
        targets = [entry_point]
    else:  # never let the candidate replace a builtin (`all`, `abs`, `isinstance`) or a prefix helper the tests rely on
        targets = [name for name in names if name not in namespace and not hasattr(builtins, name)]
    for name in targets:
        namespace[name] = proxy(name)
    exec(compile(job["tests"], "<tests>", "exec"), namespace)
    if entry_point:
        namespace["check"](namespace[entry_point])


class _Channel:
    """Forwards proxy calls to the parent (which relays them to the candidate)."""

    def __init__(self, wire: ModuleType, requests: BinaryIO, replies: BinaryIO) -> None:
        self.wire, self.requests, self.replies = wire, requests, replies
        self.gone: str | None = None

    def proxy(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call

    def call(self, name: str, args: tuple, kwargs: dict) -> Any:
        if self.gone is not None:
            raise CandidateGone(self.gone)
        wire = self.wire
        try:
            message = {"call": name, "args": wire.encode(list(args)), "kwargs": wire.encode(dict(kwargs))}
            line = wire.dumps(message)
        except wire.WireError as exc:
            raise NotData(f"an argument to {name} cannot cross the sandbox boundary: {exc}") from None
        self.replies.write(line)
        self.replies.flush()
        try:  # a WireError is a ValueError: the tests' `except ValueError` must never see one
            reply = wire.loads(self.requests.readline(wire.MAX_MESSAGE_BYTES + 1))
            if "return" in reply:
                return wire.decode(reply["return"])
            if "raise" in reply:
                error: BaseException = rebuild_exception(*wire.check_exception_info(reply["raise"]))
            else:
                self.gone = str(reply.get("gone", "no answer"))
                error = CandidateGone(self.gone)
        except wire.WireError as exc:
            self.gone = f"malformed answer: {exc}"
            error = CandidateGone(self.gone)
        raise error


_ITERATION_END = (StopIteration, StopAsyncIteration)  # control flow to the tests' loops: never rebuilt


def rebuild_exception(type_name: str, message: str) -> Exception:
    """The candidate's exception as a builtin Exception type, or CandidateError."""
    cls = getattr(builtins, type_name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, _ITERATION_END):
        try:
            return cls(message)
        except Exception:  # e.g. UnicodeDecodeError needs five arguments
            pass
    return CandidateError(f"{type_name}: {message}")
