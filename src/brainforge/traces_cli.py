"""`brainforge traces show|stats|generate|families`: look at off-policy trace files and make them.

A trace file is JSONL (see `brainforge.data.traces`). `show` and `stats` validate the file as
the trainer will (every problem names file:line) and accept the same column mapping as a
config, so a public layout can be checked before training on it: `--columns prompt=problem
--columns response=solution`. OpenR1-Math rows are recognised without a mapping.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path
from typing import List, Optional

import typer

from brainforge.errors import BrainforgeError

traces_app = typer.Typer(no_args_is_help=True, help="Show, count, generate and list off-policy reasoning traces (JSONL).")

TraceFileArg = typer.Argument(..., help="A trace file (.jsonl or .jsonl.gz).", show_default=False)
ColumnsOpt = typer.Option(None, "--columns", help="Map a trace field to your file's column, e.g. --columns prompt=problem "
                          "(repeatable, or comma-separated). Fields: prompt, prompt_id, response, reward, source, "
                          "logprobs, token_ids, tokenizer.")

BAR_WIDTH = 40


def parse_columns(items: Optional[List[str]]) -> dict[str, str] | None:
    """`["prompt=problem", "response=solution"]` -> {"prompt": "problem", "response": "solution"}."""
    if not items:
        return None
    mapping: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            field, sep, column = pair.partition("=")
            if not sep or not field.strip() or not column.strip():
                raise BrainforgeError(f"--columns {pair!r}: write FIELD=COLUMN, e.g. --columns prompt=problem")
            mapping[field.strip()] = column.strip()
    return mapping


@traces_app.command("show")
def show(
    path: Path = TraceFileArg,
    n: int = typer.Option(5, "--n", "-n", min=1, help="How many traces to show, from the top of the file."),
    columns: Optional[List[str]] = ColumnsOpt,
    max_chars: int = typer.Option(800, "--max-chars", min=20, help="Cut each prompt and response to this many characters."),
) -> None:
    """Print the first traces of a file, readably (the file is validated up to the last one shown)."""
    from brainforge.data.traces import iter_traces

    shown = 0
    for trace in iter_traces(path, parse_columns(columns)):
        if shown == n:
            break
        shown += 1
        facts = [f"source={trace.source}", "reward=" + ("-" if trace.reward is None else f"{trace.reward:g}")]
        if trace.prompt_id is not None:
            facts.append(f"prompt_id={trace.prompt_id}")
        if trace.logprobs is not None:
            facts.append(f"logprobs={len(trace.logprobs)} tokens" + (f" ({trace.tokenizer})" if trace.tokenizer else ""))
        typer.echo(f"[{shown}] {trace.where}  {'  '.join(facts)}")
        if trace.prompt is not None:
            typer.echo("  prompt:   " + _indent(_cut(trace.prompt, max_chars)))
        typer.echo("  response: " + _indent(_cut(trace.response, max_chars)))
        typer.echo("")
    if shown == 0:
        raise BrainforgeError(f"{path}: contains no traces (the file is empty or has only blank lines)")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]} ... [{len(text) - limit} more characters]"


def _indent(text: str) -> str:
    return text.replace("\n", "\n            ")


@traces_app.command("stats")
def stats(
    path: Path = TraceFileArg,
    model: str = typer.Option("default", "--model", "-m", help="Model whose tokenizer measures response lengths."),
    columns: Optional[List[str]] = ColumnsOpt,
) -> None:
    """Counts, response lengths in tokens and the reward histogram of a trace file."""
    from brainforge.data.traces import load_traces, prompt_key
    from brainforge.models.loader import load_tokenizer, resolve_model_path

    traces = load_traces(path, parse_columns(columns))
    prompts = {("text", prompt_key(t.prompt)) if t.prompt is not None else ("id", t.prompt_id) for t in traces}
    with_logprobs = sum(t.logprobs is not None for t in traces)
    typer.echo(f"file: {path}")
    typer.echo(f"traces: {len(traces)}  distinct prompts: {len(prompts)}  with logprobs: {with_logprobs}")
    sources = Counter(t.source for t in traces)
    typer.echo("sources: " + ", ".join(f"{name} {count}" for name, count in sources.most_common()))

    tokenizer = load_tokenizer(resolve_model_path(model))
    lengths: list[int] = []
    for start in range(0, len(traces), 256):
        batch = [t.response for t in traces[start:start + 256]]
        lengths.extend(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    ordered = sorted(lengths)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
    typer.echo(f"response tokens ({model}): min {ordered[0]}  median {statistics.median(ordered):g}  p90 {p90}  "
               f"max {ordered[-1]}")
    typer.echo("reward:")
    for label, count in reward_histogram([t.reward for t in traces]):
        bar = "#" * (round(BAR_WIDTH * count / len(traces)) if count else 0)
        typer.echo(f"  {label:>17} {count:>7}  {bar}".rstrip())


def reward_histogram(rewards: list[float | None], bins: int = 10) -> list[tuple[str, int]]:
    """(label, count) rows: one per value when there are few distinct rewards (0/1 verifiers),
    else `bins` equal-width ranges; a last "no reward" row counts traces without one."""
    present = [r for r in rewards if r is not None]
    rows: list[tuple[str, int]] = []
    distinct = sorted(set(present))
    if len(distinct) <= bins:
        counts = Counter(present)
        rows = [(f"{value:g}", counts[value]) for value in distinct]
    else:
        low, high = distinct[0], distinct[-1]
        width = (high - low) / bins
        counts = Counter(min(int((r - low) / width), bins - 1) for r in present)
        rows = [(f"[{low + i * width:.3g}, {low + (i + 1) * width:.3g}{']' if i == bins - 1 else ')'}", counts[i])
                for i in range(bins)]
    rows.append(("no reward", len(rewards) - len(present)))
    return rows


@traces_app.command("generate")
def generate(
    config: Path = typer.Argument(..., help="The training config: its prompts, reward and chat template.", show_default=False),
    teacher: str = typer.Option(..., "--teacher", help="Teacher: a local model folder, GGUF file, trained run, 'default', or worked:FAMILY (built-in solutions, no model)."),
    k: int = typer.Option(4, "--k", min=1, help="Samples drawn per prompt; only those the config's reward marks correct are kept."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Trace file to write (default: ./<config stem>.traces.jsonl)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N prompts."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key, e.g. --set "
                                                  "datasets.sources.0.options.size=50 (repeatable)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default: the config's)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="Completion length limit (default: the config's)."),
) -> None:
    """Rejection-sample traces from a teacher model: keep correct completions, with their log-probs."""
    from brainforge.teachers.sampled import generate_traces

    report = generate_traces(config, overrides or [], teacher, k, out, limit, temperature, max_new_tokens)
    typer.echo(report.summary())


@traces_app.command("families")
def families() -> None:
    """List the built-in programmatic teachers (task families with worked solutions)."""
    from brainforge.teachers.worked import FAMILIES

    width = max((len(name) for name in FAMILIES), default=0)
    for name, description in FAMILIES.items():
        typer.echo(f"{name:<{width}}  {description}")
