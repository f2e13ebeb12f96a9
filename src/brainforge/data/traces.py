"""Off-policy reasoning traces: worked solutions to training prompts, from a teacher.

A trace file is JSONL, one trace per line:

    {"prompt": "Calculate 347 + 589.", "response": "Ones: 7 + 9 = 16 ...", "reward": 1.0,
     "source": "worked:arithmetic", "logprobs": [-0.1, ...], "token_ids": [...], "tokenizer": "..."}

`prompt` (the user's question, matched to a training prompt's text) or `prompt_id` (matched
to a prompt's `id` column) names the question; `response` is the assistant's reply as the
student should see it. `reward`, `source`, and the behaviour policy's per-token `logprobs`
(with the `token_ids` they belong to and the `tokenizer` that made them) are optional.

Public layouts load through a column mapping (`columns={"prompt": "problem", "response":
"solution"}`); OpenR1-Math rows (`problem`, `solution`, `answer`, `generations`,
`correctness_math_verify`) are recognised as they are: one trace per R1 generation, rewarded
1/0 by the row's math-verify verdicts, or the reference solution when there are no generations.

Everything here is shared by the trainer, the teachers and `brainforge traces`: loading with
validation (every problem names `file:line`), atomic writing, matching traces to training
prompts, the `min_off_policy_reward` filter, and the token ids of a trace as the chat
template renders it (what LUFFY's `prefix_mask` covers).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainforge.data.prompts import PromptExample
from brainforge.errors import DataError


@dataclass
class Trace:
    response: str
    """The assistant reply the student should learn from (no chat-template markup)."""
    prompt: str | None = None
    """The question text; matched to `PromptExample.text` after whitespace normalisation."""
    prompt_id: str | None = None
    """Alternatively, the value of the training prompt's `id` column."""
    reward: float | None = None
    """The reward the trace earned when it was made (filtered by min_off_policy_reward)."""
    source: str = "unknown"
    """Who wrote it: `worked:<family>` for programmatic teachers, a model path for sampled ones."""
    logprobs: list[float] | None = None
    """Per-token log-probs of `token_ids` under the behaviour policy (teacher) that sampled it."""
    token_ids: list[int] | None = None
    """The response's tokens under `tokenizer`; logprobs align with them."""
    tokenizer: str | None = None
    """Identifies the tokenizer of `token_ids` (see `tokenizer_fingerprint`)."""
    where: str = ""
    """`file:line` the trace came from, for messages."""
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ loading

FIELDS = ("prompt", "prompt_id", "response", "reward", "source", "logprobs", "token_ids", "tokenizer")
"""The trace fields a file's columns can be mapped to (`columns={"prompt": "problem"}`)."""

MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest line read: a trace file with one runaway line (a 5 GB blob) is named, not loaded into memory.
OpenR1-Math rows with several R1 generations are well under 1 MB."""

OPENR1_SOURCE = "openr1"
THINK_TAG = "<think>"
_MISSING = object()


def load_traces(path: str | Path, columns: dict[str, str] | None = None, *, max_line_bytes: int = MAX_LINE_BYTES) -> list[Trace]:
    """Every trace of a JSONL file (or .jsonl.gz), validated; any problem is a `DataError` naming `file:line`.

    `columns` maps our field names to the file's (`{"prompt": "problem", "response": "solution"}`).
    Rows in the OpenR1-Math layout (`problem`, `generations`, ...) are recognised without a mapping.
    """
    traces = list(iter_traces(path, columns, max_line_bytes=max_line_bytes))
    if not traces:
        raise DataError(f"{path}: contains no traces (the file is empty or has only blank lines); "
                        "write one JSON object per line with at least 'prompt' (or 'prompt_id') and 'response'")
    return traces


def iter_traces(path: str | Path, columns: dict[str, str] | None = None, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Trace]:
    """The traces of a file one at a time, so `traces show` need not read a whole OpenR1 dump."""
    file = Path(path)
    mapping = _check_columns(columns)
    if not file.exists():
        raise DataError(f"{file}: no such trace file; check the path")
    if not file.is_file():
        raise DataError(f"{file}: is a directory or special file, not a trace file; give the path of a .jsonl file")
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as handle:
            for number, row in _rows(handle, file, max_line_bytes):
                yield from _parse_row(row, f"{file}:{number}", mapping)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{file}: cannot be read ({type(exc).__name__}: {exc}); check the file") from exc


def _check_columns(columns: dict[str, str] | None) -> dict[str, str]:
    mapping = dict(columns or {})
    for field_name, column in mapping.items():
        if field_name not in FIELDS:
            raise DataError(f"trace columns: unknown field '{field_name}' (in {field_name}={column}); "
                            f"map one of {', '.join(FIELDS)} to your file's column, e.g. prompt=problem")
        if not isinstance(column, str) or not column:
            raise DataError(f"trace columns: {field_name} must be mapped to a column name, got {column!r}")
    return mapping


def _rows(handle: Any, file: Path, max_line_bytes: int) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line, reading at most `max_line_bytes` per line."""
    number = 0
    while True:
        raw = handle.readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            raise DataError(f"{file}:{number}: line is longer than {max_line_bytes // (1024 * 1024)} MiB; "
                            "a trace is one JSON object per line: check that the file is JSONL (not one big JSON array) "
                            "and not damaged")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{file}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8") from exc
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            "each line must be one JSON object") from exc


def _parse_row(row: Any, where: str, mapping: dict[str, str]) -> Iterator[Trace]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt' and 'response', got a {type(row).__name__}")
    if "response" not in mapping and "response" not in row and "problem" in row and ("generations" in row or "solution" in row):
        yield from _openr1_traces(row, where)
        return

    def column(field_name: str) -> str:
        name = mapping.get(field_name, field_name)
        return f"'{name}'" + (f" (mapped to {field_name})" if name != field_name else "")

    values = {f: row.get(mapping.get(f, f), _MISSING) for f in FIELDS}
    used = {mapping.get(f, f) for f in FIELDS}
    extra = {k: v for k, v in row.items() if k not in used and k != "extra"}
    if "extra" in row:
        if not isinstance(row["extra"], dict):
            raise DataError(f"{where}: 'extra' must be a JSON object, got {type(row['extra']).__name__}")
        extra.update(row["extra"])

    response = values["response"]
    if response is _MISSING or response is None:
        raise DataError(f"{where}: {column('response')} is missing; every trace needs the assistant's reply "
                        "(map another column with --columns response=COLUMN)")
    if not isinstance(response, str) or not response.strip():
        raise DataError(f"{where}: {column('response')} must be a non-empty string, got {_short(response)}")
    prompt = _optional(values["prompt"])
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise DataError(f"{where}: {column('prompt')} must be a non-empty string (the question), got {_short(prompt)}")
    prompt_id = _optional(values["prompt_id"])
    if prompt_id is not None:
        if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)) or not str(prompt_id).strip():
            raise DataError(f"{where}: {column('prompt_id')} must be a string or whole number, got {_short(prompt_id)}")
        prompt_id = str(prompt_id)
    if prompt is None and prompt_id is None:
        raise DataError(f"{where}: neither {column('prompt')} nor {column('prompt_id')}; say which question the trace "
                        "answers (its text, or the value of the prompt's 'id' column)")
    reward = _optional(values["reward"])
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise DataError(f"{where}: {column('reward')} must be a finite number or null, got {_short(reward)}")
        reward = float(reward)
    source = _optional(values["source"])
    if source is not None and not isinstance(source, str):
        raise DataError(f"{where}: {column('source')} must be a string, got {_short(source)}")
    tokenizer = _optional(values["tokenizer"])
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise DataError(f"{where}: {column('tokenizer')} must be a string (see tokenizer_fingerprint), got {_short(tokenizer)}")
    logprobs = _logprobs(_optional(values["logprobs"]), where, column("logprobs"))
    token_ids = _token_ids(_optional(values["token_ids"]), where, column("token_ids"))
    if logprobs is not None:
        if token_ids is None:
            raise DataError(f"{where}: {column('logprobs')} without {column('token_ids')}; log-probs only mean something "
                            "with the tokens they belong to: store both, or neither")
        if len(logprobs) != len(token_ids):
            raise DataError(f"{where}: {column('logprobs')} has {len(logprobs)} values but {column('token_ids')} has "
                            f"{len(token_ids)}; there must be one log-prob per token")
    yield Trace(response=response, prompt=prompt, prompt_id=prompt_id, reward=reward, source=source or "unknown",
                logprobs=logprobs, token_ids=token_ids, tokenizer=tokenizer, where=where, extra=extra)


def _optional(value: Any) -> Any:
    return None if value is _MISSING else value


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _logprobs(value: Any, where: str, name: str) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise DataError(f"{where}: {name} must be a list of numbers (one log-prob per token), got {_short(value)}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise DataError(f"{where}: {name}[{i}] must be a finite number, got {_short(item)}")
        if item > 1e-3:
            raise DataError(f"{where}: {name}[{i}] is {item}, above 0; log-probs are log(p) <= 0: store log-probabilities, "
                            "not probabilities")
    return [float(v) for v in value]


def _token_ids(value: Any, where: str, name: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise DataError(f"{where}: {name} must be a list of token ids (whole numbers >= 0), got {_short(value)}")
    return list(value)


def _openr1_traces(row: dict[str, Any], where: str) -> Iterator[Trace]:
    """OpenR1-Math rows: one trace per R1 generation (reward from `correctness_math_verify`), else the solution."""
    problem = row["problem"]
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: 'problem' must be a non-empty string (OpenR1-Math layout), got {_short(problem)}")
    extra = {"answer": row["answer"]} if row.get("answer") is not None else {}
    generations = row.get("generations") or []
    if not isinstance(generations, list):
        raise DataError(f"{where}: 'generations' must be a list of strings (OpenR1-Math layout), got {_short(generations)}")
    correct = row.get("correctness_math_verify")
    if generations and correct is not None:
        if not isinstance(correct, list) or len(correct) != len(generations):
            raise DataError(f"{where}: 'correctness_math_verify' must be a list of {len(generations)} booleans, one per "
                            f"generation, got {_short(correct)}")
    for i, generation in enumerate(generations):
        if not isinstance(generation, str) or not generation.strip():
            raise DataError(f"{where}: generations[{i}] must be a non-empty string, got {_short(generation)}")
        reward = None
        if correct is not None:
            if correct[i] is not None and not isinstance(correct[i], bool):
                raise DataError(f"{where}: correctness_math_verify[{i}] must be true, false or null, got {_short(correct[i])}")
            reward = None if correct[i] is None else float(correct[i])
        yield Trace(response=generation, prompt=problem, reward=reward, source=OPENR1_SOURCE, where=where, extra=dict(extra))
    if not generations:
        solution = row.get("solution")
        if not isinstance(solution, str) or not solution.strip():
            raise DataError(f"{where}: no generations and 'solution' is not a non-empty string (OpenR1-Math layout), "
                            f"got {_short(solution)}")
        yield Trace(response=solution, prompt=problem, source=OPENR1_SOURCE, where=where, extra=dict(extra))


# ------------------------------------------------------------------------------ writing


def trace_record(trace: Trace) -> dict[str, Any]:
    """The JSON object of one trace: only the fields that are set (no `where`, no empty `extra`)."""
    record: dict[str, Any] = {}
    for name in ("prompt", "prompt_id", "response", "reward", "source", "logprobs", "token_ids", "tokenizer"):
        value = getattr(trace, name)
        if value is not None:
            record[name] = value
    if trace.extra:
        record["extra"] = trace.extra
    return record


def write_traces(path: str | Path, traces: Iterable[Trace]) -> int:
    """Write traces as JSONL atomically (temp file, fsync, rename): a crash leaves the old file or the new one."""
    target = Path(path)
    if target.is_dir():
        raise DataError(f"{target}: is a directory; give a file name for the traces, e.g. {target / 'traces.jsonl'}")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.",
                                         suffix=".tmp", delete=False)
    count = 0
    try:
        with handle:
            for trace in traces:
                handle.write(json.dumps(trace_record(trace), ensure_ascii=False, allow_nan=False) + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return count


# ------------------------------------------------------------------------------ matching


def prompt_key(text: str) -> str:
    """The text traces and prompts are matched on: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


@dataclass
class TraceMatch:
    """Which training prompts have traces, which do not, and which traces fit no prompt."""

    by_prompt: dict[int, list[Trace]]
    """Prompt index -> its traces, in file order."""
    prompts_without: list[int]
    """Indices of prompts no trace answers."""
    orphans: list[Trace]
    """Traces whose prompt (or prompt_id) is not among the training prompts."""
    prompt_texts: list[str] = field(default_factory=list, repr=False)
    """The prompts' texts, for the report's examples."""

    def report(self) -> str:
        """A line of counts, then up to 3 examples of prompts without a trace and of orphan traces."""
        matched = sum(len(t) for t in self.by_prompt.values())
        lines = [f"traces: {matched} matched to {len(self.by_prompt)} of {len(self.prompt_texts)} prompts; "
                 f"{len(self.prompts_without)} prompts without a trace; {len(self.orphans)} traces match no prompt"]
        for index in self.prompts_without[:3]:
            lines.append(f"  no trace for prompt #{index}: {_clip(self.prompt_texts[index])}")
        for trace in self.orphans[:3]:
            what = _clip(trace.prompt) if trace.prompt is not None else f"prompt_id {trace.prompt_id}"
            lines.append(f"  no prompt for trace at {trace.where or '?'}: {what}")
        return "\n".join(lines)


def _clip(text: str, width: int = 70) -> str:
    flat = prompt_key(text)
    return repr(flat if len(flat) <= width else flat[: width - 3] + "...")


def match_traces(prompts: list[PromptExample], traces: list[Trace]) -> TraceMatch:
    """Pair traces with prompts by normalised text (`prompt_key`) or by the prompt's `id` column."""
    by_key: dict[str, list[int]] = {}
    by_id: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_key.setdefault(prompt_key(prompt.text), []).append(index)
        if prompt.columns.get("id") is not None:
            by_id.setdefault(str(prompt.columns["id"]), []).append(index)
    by_prompt: dict[int, list[Trace]] = {}
    orphans: list[Trace] = []
    for trace in traces:
        targets: set[int] = set()
        if trace.prompt is not None:
            targets.update(by_key.get(prompt_key(trace.prompt), ()))
        if trace.prompt_id is not None:
            targets.update(by_id.get(trace.prompt_id, ()))
        if not targets:
            orphans.append(trace)
        for index in sorted(targets):
            by_prompt.setdefault(index, []).append(trace)
    without = [i for i in range(len(prompts)) if i not in by_prompt]
    return TraceMatch(dict(sorted(by_prompt.items())), without, orphans, [p.text for p in prompts])


def filter_min_reward(traces: Iterable[Trace], min_reward: float | None) -> tuple[list[Trace], int]:
    """(kept, number dropped): traces whose reward is below `min_reward` go; traces without a reward stay."""
    traces = list(traces)
    if min_reward is None:
        return traces, 0
    kept = [t for t in traces if t.reward is None or t.reward >= min_reward]
    return kept, len(traces) - len(kept)


# ------------------------------------------------------------------------------ tokens


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short stable id of a tokenizer's vocabulary (`<size>:<sha256 prefix>`).

    Only the token <-> id table matters for whether stored token_ids/logprobs belong to the
    student, so the class name is left out: the same vocabulary loaded by another
    transformers version (another tokenizer class) gets the same fingerprint.
    """
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda item: (item[1], item[0])):
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    return f"{len(vocab)}:{digest.hexdigest()[:16]}"


def trace_token_ids(tokenizer: Any, chat_template: str, messages: list[dict], response: str, *, where: str = "") -> list[int]:
    """The response's tokens exactly as the chat template puts them after the generation prompt.

    These are the tokens the trainer appends to `encode_prompt(prompt)` and marks with
    `prefix_mask`: everything the template renders after the generation prompt, up to and
    including the first end-of-turn token (ChatML `<|im_end|>` or EOS); what the template
    writes after it (ChatML's "\\n") is not part of the completion. When the generation prompt
    already ends with `<think>` and the response starts with it, the response's copy is
    dropped so the tag is not doubled. `where` prefixes error messages (a trace's file:line).
    """
    from brainforge.generation.engine import chat_stop_ids

    prefix = f"{where}: " if where else ""

    def render(conversation: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    stops = chat_stop_ids(tokenizer)
    markers = [m for m in (tokenizer.convert_ids_to_tokens(i) for i in stops) if m]
    for marker in markers:
        if marker in response:
            raise DataError(f"{prefix}the trace's response contains the end-of-turn marker {marker!r}; it would end the "
                            "turn early: remove it from the response (the template adds its own)")
    prompt_text = render(messages, True)
    candidates = [response]
    if prompt_text.rstrip("\n").endswith(THINK_TAG) and response.lstrip().startswith(THINK_TAG):
        stripped = response.lstrip()[len(THINK_TAG):]
        candidates.insert(0, stripped.removeprefix("\n") if prompt_text.endswith(THINK_TAG + "\n") else stripped)
    for candidate in candidates:
        full_text = render([*messages, {"role": "assistant", "content": candidate}], False)
        if full_text.startswith(prompt_text):
            break
    else:
        raise DataError(f"{prefix}the chat template renders an assistant turn that does not start with its own generation "
                        f"prompt (the prompt ends with {prompt_text[-30:]!r}, the rendered turn continues "
                        f"{full_text[len(prompt_text) - 30:len(prompt_text) + 10]!r}); traces cannot be aligned with what the "
                        "model generates: use a template whose rendered assistant turn begins with its generation prompt")
    prompt_ids, full_ids = ids(prompt_text), ids(full_text)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        rest = full_ids[len(prompt_ids):]
    else:
        # The tokenizer merged across the boundary (e.g. "\n" + "\n"); the model generates after
        # prompt_ids, so tokenize the remainder alone and accept it only if it decodes to the same text.
        rest = ids(full_text[len(prompt_text):])
        if tokenizer.decode(prompt_ids + rest) != tokenizer.decode(full_ids):
            raise DataError(f"{prefix}the generation prompt and the rendered trace tokenize differently at their boundary "
                            f"(prompt ends with {prompt_text[-20:]!r}, response starts with {candidate[:20]!r}); "
                            "strip leading whitespace from the response")
    end = next((i for i, token in enumerate(rest) if token in stops), None)
    if end is None:
        raise DataError(f"{prefix}the chat template does not end the assistant turn with an end-of-turn token "
                        f"({', '.join(markers) or 'EOS'}); the trainer could not tell where the trace ends: use a template "
                        "that closes assistant turns with EOS or <|im_end|>")
    return rest[: end + 1]
