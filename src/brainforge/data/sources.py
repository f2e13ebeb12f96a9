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
from brainforge.data.formatters import FORMATTERS, check_columns, column_map, to_messages
from brainforge.errors import DataError

log = logging.getLogger(__name__)

SAMPLE_PREFIX = "sample:"
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def sample_path(name: str) -> Path:
    kind = name.removeprefix(SAMPLE_PREFIX)
    if kind not in FORMATTERS:
        raise DataError(f"unknown bundled sample set '{name}'; available: {', '.join(SAMPLE_PREFIX + k for k in FORMATTERS)}")
    return Path(str(resources.files("brainforge.data") / "samples" / f"{kind}.jsonl"))


def load_raw(source: SourceConfig) -> Any:
    """The source's rows as a `datasets.Dataset`, before formatting."""
    import datasets

    if source.path is not None or (source.name or "").startswith(SAMPLE_PREFIX):
        path = Path(source.path) if source.path is not None else sample_path(source.name or "")
        return _load_local(path)
    try:
        return datasets.load_dataset(source.name, source.subset, split=source.split)
    except Exception as exc:  # network, auth, missing split: all reported the same way
        raise DataError(
            f"source {source.name}: could not load this hub dataset ({type(exc).__name__}: {str(exc)[:300]}). "
            "Offline? Use a local file (path:) or a bundled set (name: sample:chat)."
        ) from exc


def _load_local(path: Path) -> Any:
    import datasets

    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .json, .jsonl, .csv or .parquet")
    if path.suffix.lower() == ".jsonl":
        _check_jsonl(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        raise DataError(f"{path}: could not read this {builder} file ({type(exc).__name__}: {str(exc)[:300]})") from exc


def _check_jsonl(path: Path) -> None:
    """Report the first bad line by number; `datasets` only says the file failed."""
    with path.open(encoding="utf-8", errors="strict") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    value = json.loads(line)
                    if not isinstance(value, dict):
                        raise DataError(f"{path}:{number}: each line must be a JSON object")
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


def load_source(source: SourceConfig, system_prompt: str | None) -> Any:
    """One source, formatted into a `messages` column and cut to `max_samples`."""
    raw = load_raw(source)
    label = source.label
    mapping = column_map(source.type, source.columns, label)
    check_columns(source.type, mapping, list(raw.column_names), label)
    if source.max_samples is not None:
        raw = raw.select(range(min(source.max_samples, len(raw))))
    rows: list[dict[str, Any]] = []
    for index, row in enumerate(raw):
        try:
            messages = to_messages(row, source.type, mapping, system_prompt)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"source {label}, row {index}: cannot format as '{source.type}': {exc}") from exc
        if any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            rows.append({"messages": messages, "source": label})
    if not rows:
        raise DataError(f"source {label}: no usable rows (empty file, max_samples 0, or no row has an assistant answer)")
    import datasets

    return datasets.Dataset.from_list(rows)


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
