"""The loop that runs INSIDE the candidate's sandbox: load the code, then answer calls.

This code is not trusted once the candidate's code has run: the candidate may rewrite any of
it, write to the protocol pipe itself or exit. That is fine, because nothing it says is
believed: its answers are decoded as plain data by the trusted side (see `wire`), and
pass/fail is decided by the trusted harness. This loop exists only so that an honest
candidate can be called many times from the tests.

Protocol (one JSON object per line; see `wire`):
    in:  {"load": source}                  out: {"names": [callable names]} | {"raise": [type, message]}
    in:  {"call": name, "args": [...], "kwargs": {...}}  (wire-encoded)
    out: {"return": value} | {"raise": [type, message]}

The protocol pipes are moved off fds 0 and 1 before the candidate's code runs: its `print`
goes to stderr (captured, capped, and ignored) and `input()` reads /dev/null.

Runs with `python3 -I -S` from the sandbox bootstrap: standard library only; `main` gets
the wire module as an argument because the sandbox has no brainforge package.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, BinaryIO


def main(wire: ModuleType) -> None:
    requests, replies = _take_protocol_fds()
    namespace: dict[str, Any] = {"__name__": "__candidate__", "__builtins__": __builtins__}
    for line in requests:
        message = wire.loads(line)
        if "load" in message:
            reply = _load(wire, namespace, message["load"])
        else:
            reply = _call(wire, namespace, message)
        try:
            data = wire.dumps(reply)
        except (wire.WireError, ValueError) as exc:
            data = wire.dumps({"raise": ["TypeError", f"the result cannot cross the sandbox boundary: {exc}"]})
        replies.write(data)
        replies.flush()


def _take_protocol_fds() -> tuple[BinaryIO, BinaryIO]:
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return requests, replies


def _load(wire: ModuleType, namespace: dict[str, Any], source: Any) -> dict[str, Any]:
    try:
        exec(compile(str(source), "<candidate>", "exec"), namespace)
    except BaseException as exc:  # SystemExit too: exiting is not a way to pass
        return {"raise": wire.exception_info(exc)}
    names = [name for name, value in list(namespace.items())
             if not name.startswith("__") and callable(value) and not isinstance(value, ModuleType)]
    return {"names": names[:10_000]}


def _call(wire: ModuleType, namespace: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
    try:
        function = namespace[message["call"]]
        args = wire.decode(message["args"])
        kwargs = wire.decode(message["kwargs"])
        result = function(*args, **kwargs)
        return {"return": wire.encode(result)}
    except BaseException as exc:
        return {"raise": wire.exception_info(exc)}

