"""Loading sources and mixing them into one stream of conversations.

Each source becomes a `datasets.Dataset` with a single `messages` column (plus `source`),
so sources of different types and column layouts can be interleaved. Mixing uses
`datasets.interleave_datasets` with the normalised weights and the config's seed, so the
same config always yields the same mixture.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from brainforge.config import SourceConfig
from brainforge.data.formatters import FORMATTERS, check_columns, check_row, column_map, to_messages
from brainforge.errors import DataError

log = logging.getLogger(__name__)

SAMPLE_PREFIX = "sample:"
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def sample_path(name: str) -> Path:
    kind = name.removeprefix(SAMPLE_PREFIX)
    if kind not in FORMATTERS:
        raise DataError(f"unknown bundled sample set '{name}'; available: {', '.join(SAMPLE_PREFIX + k for k in FORMATTERS)}")
    return Path(str(resources.files("brainforge.data") / "samples" / f"{kind}.jsonl"))


def load_raw(source: SourceConfig, mapping: dict[str, str] | None = None) -> Any:
    """The source's rows as a `datasets.Dataset`, before formatting. With the column
    `mapping`, each JSONL line's field types are checked first (errors give the line)."""
    import datasets

    if source.path is not None or (source.name or "").startswith(SAMPLE_PREFIX):
        path = Path(source.path) if source.path is not None else sample_path(source.name or "")
        return _load_local(path, mapping)
    try:
        return datasets.load_dataset(source.name, source.subset, split=source.split)
    except Exception as exc:  # network, auth, missing split: all reported the same way
        raise DataError(
            f"source {source.name}: could not load this hub dataset ({type(exc).__name__}: {str(exc)[:300]}). "
            "Offline? Use a local file (path:) or a bundled set (name: sample:chat)."
        ) from exc


def _load_local(path: Path, mapping: dict[str, str] | None = None) -> Any:
    import datasets

    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .json, .jsonl, .csv or .parquet")
    if path.suffix.lower() == ".jsonl":
        _check_jsonl(path, mapping)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        raise DataError(f"{path}: could not read this {builder} file ({type(exc).__name__}: {str(exc)[:300]})") from exc


def _check_jsonl(path: Path, mapping: dict[str, str] | None = None) -> None:
    """Report the first bad line by number; `datasets` only says the file failed (or, for
    a field that is a list in every row, reads it as a list that would be trained as its repr)."""
    with path.open(encoding="utf-8", errors="strict") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    value = json.loads(line)
                    if not isinstance(value, dict):
                        raise DataError(f"{path}:{number}: each line must be a JSON object")
                    if mapping is not None:
                        try:
                            check_row(value, mapping)
                        except ValueError as exc:
                            raise DataError(f"{path}:{number}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


def load_source(source: SourceConfig, system_prompt: str | None) -> Any:
    """One source, formatted into a `messages` column and cut to `max_samples`."""
    label = source.label
    mapping = column_map(source.type, source.columns, label)
    raw = load_raw(source, mapping)
    check_columns(source.type, mapping, list(raw.column_names), label)
    if source.max_samples is not None:
        raw = raw.select(range(min(source.max_samples, len(raw))))
    rows: list[dict[str, Any]] = []
    allow_numbers = (source.path or "").lower().endswith(".csv")  # CSV readers type digit columns as numbers
    for index, row in enumerate(raw):
        try:
            messages = to_messages(row, source.type, mapping, system_prompt, allow_numbers)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"source {label}, row {index} ({_row_location(source, index)}): cannot format as "
                            f"'{source.type}': {exc}") from None
        if any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            rows.append({"messages": messages, "source": label})
    if not rows:
        raise DataError(f"source {label}: no usable rows (empty file, max_samples 0, or no row has an assistant answer)")
    import datasets

    return datasets.Dataset.from_list(rows)


def _row_location(source: SourceConfig, index: int) -> str:
    """Where row `index` (0-based, as `datasets` counts) is in the file, for error messages."""
    if source.path is not None and source.path.lower().endswith(".jsonl"):
        return f"line {_jsonl_line(Path(source.path), index)} of {Path(source.path).name}"
    if source.path is not None and source.path.lower().endswith(".csv"):
        return f"data row {index + 1} of {Path(source.path).name}, after the header"
    return f"item {index + 1}"


def _jsonl_line(path: Path, index: int) -> int:
    """The 1-based line of the `index`-th non-blank line (blank lines are not rows)."""
    seen = -1
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return number
    return index + 1


def mix_sources(sources: list[SourceConfig], system_prompt: str | None, seed: int, stopping_strategy: str) -> Any:
    """The weighted, seeded mixture of all sources."""
    import datasets

    loaded = [load_source(source, system_prompt) for source in sources]
    if len(loaded) == 1:
        return loaded[0].shuffle(seed=seed)
    total = sum(source.weight for source in sources)
    probabilities = [source.weight / total for source in sources]
    mixed = datasets.interleave_datasets(
        loaded, probabilities=probabilities, seed=seed, stopping_strategy=stopping_strategy
    )
    counts = {source.label: 0 for source in sources}
    for label in mixed["source"]:
        counts[label] += 1
    log.info("mixture of %d examples: %s", len(mixed), ", ".join(f"{k}={v}" for k, v in counts.items()))
    return mixed
