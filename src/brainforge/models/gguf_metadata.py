"""The scalar metadata and tensor names of a GGUF file, read without loading anything.

The memory estimate needs a model's shape before any weights load. For a GGUF file that
shape is in its key/value header, but `gguf.GGUFReader` and transformers parse every field
(the 49k-entry tokenizer arrays included) and take 10-15 s on a busy CPU. This reader
keeps scalars, skips arrays by their length (recording how many items each had), and reads
the tensor names; it touches a few hundred kB of the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from brainforge.errors import ModelError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 32
"""Any count above this means a damaged header (it would take forever to skip)."""


@dataclass
class GGUFMetadata:
    values: dict[str, Any] = field(default_factory=dict)
    """Scalar and string keys, e.g. `llama.block_count`."""
    array_lengths: dict[str, int] = field(default_factory=dict)
    """Item count of each array key, e.g. `tokenizer.ggml.tokens` (the vocabulary size)."""
    tensor_names: list[str] = field(default_factory=list)


def read_gguf_metadata(path: Path) -> GGUFMetadata:
    """The header of a GGUF file; a `ModelError` naming the file when it is not one."""
    try:
        with path.open("rb") as handle:
            return _read(handle)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: the GGUF header is damaged ({exc}); the file is corrupt or truncated") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read this GGUF file ({exc.strerror or exc})") from None


def _read(handle: BinaryIO) -> GGUFMetadata:
    if handle.read(4) != b"GGUF":
        raise ValueError("no GGUF magic bytes")
    (version,) = struct.unpack("<I", handle.read(4))
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported (2 or later)")
    n_tensors, n_kv = struct.unpack("<QQ", handle.read(16))
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise ValueError("implausible tensor or key count")
    meta = GGUFMetadata()
    for _ in range(n_kv):
        key = _string(handle)
        (kind,) = struct.unpack("<I", handle.read(4))
        if kind == _ARRAY:
            item_kind, count = struct.unpack("<IQ", handle.read(12))
            if count > _MAX_COUNT:
                raise ValueError(f"implausible array length for {key}")
            meta.array_lengths[key] = count
            _skip_array(handle, item_kind, count)
        else:
            meta.values[key] = _value(handle, kind)
    for _ in range(n_tensors):
        meta.tensor_names.append(_string(handle))
        (n_dims,) = struct.unpack("<I", handle.read(4))
        handle.seek(8 * n_dims + 4 + 8, 1)  # dims, type, offset
    return meta


def _string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", handle.read(8))
    if length > 1 << 24:
        raise ValueError("implausible string length")
    return handle.read(length).decode("utf-8")


def _value(handle: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _string(handle)
    fmt = _SCALARS.get(kind)
    if fmt is None:
        raise ValueError(f"unknown value type {kind}")
    return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]


def _skip_array(handle: BinaryIO, kind: int, count: int) -> None:
    if kind == _STRING:
        for _ in range(count):
            (length,) = struct.unpack("<Q", handle.read(8))
            handle.seek(length, 1)
    elif kind == _ARRAY:
        for _ in range(count):
            inner_kind, inner_count = struct.unpack("<IQ", handle.read(12))
            _skip_array(handle, inner_kind, inner_count)
    elif kind in _SCALARS:
        handle.seek(count * struct.calcsize(_SCALARS[kind]), 1)
    else:
        raise ValueError(f"unknown array item type {kind}")
