"""The data-only wire between the trusted side and a sandboxed candidate.

Why: the candidate's code must not decide its own reward. If its return value crossed as a
live object, an `__eq__` that always answers True would pass every test. So values cross
as DATA: a strict, tagged JSON form of the builtin value types, decoded on the trusted side
into fresh builtin objects that the candidate never touched. Decoding arbitrary bytes is
safe: `json.loads` plus explicit checks (no pickle, no eval), bounded in size, depth and
integer length, and every malformed input raises `WireError`.

Encoding (one JSON value per Python value):
    None, True, False        -> null, true, false
    int                      -> JSON integer (at most MAX_INT_DIGITS digits)
    str                      -> JSON string
    float                    -> ["f", repr]   (also "inf", "-inf", "nan")
    complex                  -> ["c", real repr, imag repr]
    bytes                    -> ["b", base64]
    list / tuple             -> ["l", item, ...] / ["t", item, ...]
    set / frozenset          -> ["s", item, ...] / ["fs", item, ...]
    dict                     -> ["d", key, value, key, value, ...]
Only exact builtin types are accepted (`type(x) is int`): subclasses, custom objects,
functions, generators cannot cross.

`validate` checks this form without building it. The trainer's process uses it on what a
candidate sends and leaves `decode` to the sandboxed harness: building a set or dict hashes
the candidate's values, and ints chosen to share one hash (multiples of 2**61 - 1) make that
quadratic, over a minute of CPU for one 1 MB answer, where no wall clock applies.

Messages are one JSON object per line (ASCII only, so a newline always ends a message).

This module runs inside the sandboxes too (with `python3 -I -S`): standard library only,
no imports from brainforge, no import-time side effects.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

MAX_DEPTH = 64
MAX_INT_DIGITS = 4000
MAX_MESSAGE_BYTES = 1 << 20
_MAX_INT_BITS = int(MAX_INT_DIGITS * 3.32)  # log2(10) bits per digit, rounded down
_FLOAT = re.compile(r"-?(inf|nan|\d+(\.\d+)?(e[+-]?\d+)?)\Z")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}\Z")
_SEQUENCES = {list: "l", tuple: "t", set: "s", frozenset: "fs"}
_BUILDERS = {"l": list, "t": tuple, "s": set, "fs": frozenset}


class WireError(ValueError):
    """A value that cannot cross the boundary, or bytes that are not a valid message."""


def encode(value: Any, depth: int = 0) -> Any:
    """The JSON-able form of `value`; WireError for anything that is not plain data."""
    if depth > MAX_DEPTH:
        raise WireError(f"value nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        if value.bit_length() > _MAX_INT_BITS:
            raise WireError(f"integer with more than {MAX_INT_DIGITS} digits")
        return value
    if kind is float:
        return ["f", repr(value)]
    if kind is complex:
        return ["c", repr(value.real), repr(value.imag)]
    if kind is bytes:
        return ["b", base64.b64encode(value).decode("ascii")]
    if kind in _SEQUENCES:
        return [_SEQUENCES[kind]] + [encode(item, depth + 1) for item in value]
    if kind is dict:
        out: list[Any] = ["d"]
        for key, item in value.items():
            out.append(encode(key, depth + 1))
            out.append(encode(item, depth + 1))
        return out
    raise WireError(f"a value of type {kind.__name__} cannot cross the sandbox boundary (only builtin data types)")


def decode(data: Any, depth: int = 0) -> Any:
    """Fresh builtin objects from the JSON form; WireError for anything malformed."""
    if depth > MAX_DEPTH:
        raise WireError(f"value nested deeper than {MAX_DEPTH} levels")
    kind = type(data)
    if data is None or kind is bool or kind is str or kind is int:
        return data
    if kind is not list or not data or type(data[0]) is not str:
        raise WireError(f"malformed value of JSON type {kind.__name__}")
    tag, items = data[0], data[1:]
    try:
        if tag == "f" and len(items) == 1:
            return _float(items[0])
        if tag == "c" and len(items) == 2:
            return complex(_float(items[0]), _float(items[1]))
        if tag == "b" and len(items) == 1 and type(items[0]) is str:
            return base64.b64decode(items[0].encode("ascii"), validate=True)
        if tag in _BUILDERS:
            return _BUILDERS[tag](decode(item, depth + 1) for item in items)
        if tag == "d" and len(items) % 2 == 0:
            return {decode(items[i], depth + 1): decode(items[i + 1], depth + 1) for i in range(0, len(items), 2)}
    except (TypeError, UnicodeError, binascii.Error) as exc:  # unhashable key or set member, bad base64
        raise WireError(f"malformed {tag!r} value: {exc}") from None
    raise WireError(f"unknown or malformed tag {tag[:20]!r}")


def validate(data: Any, depth: int = 0, hashable: bool = False) -> Any:
    """`data` itself when `decode` accepts it (and its ints are within `encode`'s bound), else
    WireError; linear time, and it hashes nothing. `hashable`: `data` is a set member or a
    dict key, so no list, set or dict may be inside it."""
    if depth > MAX_DEPTH:
        raise WireError(f"value nested deeper than {MAX_DEPTH} levels")
    kind = type(data)
    if data is None or kind is bool or kind is str:
        return data
    if kind is int:
        if data.bit_length() > _MAX_INT_BITS:
            raise WireError(f"integer with more than {MAX_INT_DIGITS} digits")
        return data
    if kind is not list or not data or type(data[0]) is not str:
        raise WireError(f"malformed value of JSON type {kind.__name__}")
    tag, items = data[0], data[1:]
    if tag == "f" and len(items) == 1:
        _float(items[0])
    elif tag == "c" and len(items) == 2:
        _float(items[0])
        _float(items[1])
    elif tag == "b" and len(items) == 1 and type(items[0]) is str:
        decode(data)
    elif tag in _BUILDERS or (tag == "d" and len(items) % 2 == 0):
        if hashable and tag in ("l", "s", "d"):
            raise WireError(f"malformed {tag!r} value: unhashable as a set member or dict key")
        for index, item in enumerate(items):
            validate(item, depth + 1, tag in ("s", "fs") or (hashable and tag == "t") or (tag == "d" and index % 2 == 0))
    else:
        raise WireError(f"unknown or malformed tag {tag[:20]!r}")
    return data


def _float(text: Any) -> float:
    if type(text) is not str or not _FLOAT.match(text):
        raise WireError("malformed float")
    return float(text)


def _no_constant(name: str) -> Any:
    raise WireError(f"bare JSON constant {name} (floats are tagged)")


def _no_float(text: str) -> Any:
    raise WireError("bare JSON float (floats are tagged)")


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS + 1:
        raise WireError(f"integer with more than {MAX_INT_DIGITS} digits")
    return int(text)


def dumps(message: dict[str, Any], limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """One message as a line of ASCII JSON; WireError when it is over `limit` bytes."""
    line = json.dumps(message, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"
    if len(line) > limit:
        raise WireError(f"message of {len(line)} bytes is over the {limit}-byte limit")
    return line


def loads(line: bytes, limit: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Parse one message line from an untrusted peer: a JSON object, or WireError."""
    if len(line) > limit:
        raise WireError(f"message of {len(line)} bytes is over the {limit}-byte limit")
    try:
        message = json.loads(line.decode("ascii"), parse_constant=_no_constant, parse_float=_no_float, parse_int=_bounded_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise WireError(f"malformed message: {str(exc)[:200]}") from None
    if type(message) is not dict:
        raise WireError("malformed message: not a JSON object")
    return message


def exception_info(exc: BaseException) -> list[str]:
    """(type name, message) of an exception, for the wire; the message is truncated."""
    try:
        text = str(exc)
    except Exception:  # a hostile __str__ only hurts its own report
        text = "<unprintable>"
    return [type(exc).__name__[:100], text[:2000]]


def check_exception_info(data: Any) -> tuple[str, str]:
    """Validate a (type name, message) pair from the wire."""
    if type(data) is not list or len(data) != 2 or type(data[0]) is not str or type(data[1]) is not str:
        raise WireError("malformed exception report")
    if not _IDENTIFIER.match(data[0]):
        raise WireError("malformed exception type name")
    return data[0], data[1][:2000]


def check_names(data: Any) -> list[str]:
    """Validate the list of top-level callable names a candidate reports."""
    if type(data) is not list or len(data) > 10_000 or not all(type(n) is str and _IDENTIFIER.match(n) for n in data):
        raise WireError("malformed list of names")
    return list(data)

