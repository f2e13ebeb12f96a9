"""`brainforge traces`: off-policy trace files and the agent trace store.

A trace file is JSONL (see `brainforge.data.traces`). `show FILE` and `stats` validate the
file as the trainer will (every problem names file:line) and accept the same column mapping
as a config, so a public layout can be checked before training on it: `--columns
prompt=problem --columns response=solution`. OpenR1-Math rows are recognised without a mapping.

The trace store (`brainforge.agents.store`, SQLite) holds the rollouts the policy server
recorded: `list` shows them, `show ROLLOUT_ID` prints one with every LLM call and tool run,
and `export` writes rollouts as JSONL that the SFT loader and the trace loader both read.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from brainforge.errors import BrainforgeError

if TYPE_CHECKING:
    from brainforge.agents.store import TraceStore

traces_app = typer.Typer(no_args_is_help=True, help="Off-policy trace files (show, stats, generate, families) and the agent "
                         "trace store of recorded rollouts (list, show ROLLOUT_ID, export).")

TraceFileArg = typer.Argument(..., help="A trace file (.jsonl or .jsonl.gz).", show_default=False)
StoreOpt = typer.Option(None, "--store", help="The trace store: an SQLite file, or a run folder holding traces.sqlite "
                        "(default: .brainforge/traces.sqlite, where `brainforge serve` records).", show_default=False)
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
    target: str = typer.Argument(..., help="A trace file (.jsonl or .jsonl.gz), or a rollout id in the trace store (--store).",
                                 show_default=False),
    n: int = typer.Option(5, "--n", "-n", min=1, help="Trace file: how many traces to show, from the top of the file."),
    columns: Optional[List[str]] = ColumnsOpt,
    max_chars: int = typer.Option(800, "--max-chars", min=20, help="Cut each prompt, response and message to this many characters."),
    store: Optional[Path] = StoreOpt,
) -> None:
    """Print the first traces of a file, or one recorded rollout of the trace store.

    A file is validated up to the last trace shown. A rollout is printed with each LLM call's
    messages, completion and tool calls, the tools it ran and the rewards."""
    from brainforge.agents.store import resolve_store_path

    if Path(target).is_file():
        _show_file(Path(target), n, columns, max_chars)
        return
    if store is None and not resolve_store_path(None).exists():
        if _looks_like_a_file(target):
            _show_file(Path(target), n, columns, max_chars)  # says: no such trace file
        raise BrainforgeError(f"{target}: no such trace file, and no trace store at {resolve_store_path(None)} to look it "
                              "up in as a rollout id; give the file's path, or the store with --store PATH")
    from brainforge.agents.store import UnknownRolloutError

    try:
        _show_rollout(target, store, max_chars)
    except UnknownRolloutError as exc:
        if _looks_like_a_file(target):
            raise BrainforgeError(f"{target}: no such trace file, nor a rollout id ({exc})") from None
        raise


def _looks_like_a_file(target: str) -> bool:
    """A missing path (with a folder or a trace-file suffix) is reported as a missing file, not an unknown id."""
    return "/" in target or target.endswith((".jsonl", ".jsonl.gz", ".json", ".gz"))


def _show_file(path: Path, n: int, columns: Optional[List[str]], max_chars: int) -> None:
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


def _open_store(store: Optional[Path]) -> "TraceStore":
    from brainforge.agents.store import TraceStore, resolve_store_path

    return TraceStore(resolve_store_path(store), create=False)


def _show_rollout(rollout_id: str, store: Optional[Path], max_chars: int) -> None:
    with _open_store(store) as opened:
        rollout = opened.get_rollout(rollout_id)
    facts = [f"status={rollout.status}", f"reward={_num(rollout.reward)}", f"calls={len(rollout.calls)}",
             f"task={rollout.task_id or '-'}", f"group={rollout.group_id or '-'}", f"started={_when(rollout.created)}"]
    if rollout.finished is not None:
        facts.append(f"took={rollout.finished - rollout.created:.1f}s")
    typer.echo(f"rollout {rollout.rollout_id}  {'  '.join(facts)}")
    if rollout.error:
        typer.echo("  error: " + _indent(_cut(rollout.error, max_chars)))
    if rollout.task is not None:
        typer.echo("  task: " + _indent(_cut(json.dumps(rollout.task, ensure_ascii=False), max_chars)))
    if rollout.metadata:
        typer.echo("  metadata: " + _cut(json.dumps(rollout.metadata, ensure_ascii=False), max_chars))
    events: dict[int | None, list] = {}
    for event in rollout.tool_events:
        events.setdefault(event.call_index, []).append(event)
    previous: list[dict] = []
    previous_index: int | None = None
    for call in rollout.calls:
        typer.echo("")
        typer.echo(f"call {call.index}  finish={call.finish_reason}  reward={_num(call.reward)}  "
                   f"prompt={len(call.prompt_ids)} tokens  completion={len(call.completion_ids)} tokens  "
                   f"policy={call.policy_version or '-'}  params={json.dumps(call.params, ensure_ascii=False)}")
        if call.tools:
            names = [t.get("function", {}).get("name", "?") for t in call.tools if isinstance(t, dict)]
            typer.echo(f"  tools: {', '.join(str(n) for n in names)}")
        shared = _shared_prefix(previous, call.messages)
        if shared:
            typer.echo(f"  ({shared} earlier messages as in call {previous_index})")
        for message in call.messages[shared:]:
            typer.echo(f"  [{message.get('role', '?')}] " + _indent(_cut(_message_text(message), max_chars)))
        previous, previous_index = call.messages, call.index
        typer.echo("  => completion: " + _indent(_cut(call.text, max_chars)))
        for tool_call in call.tool_calls:
            function = tool_call.get("function", {})
            typer.echo(f"  => tool call {function.get('name')}({_cut(str(function.get('arguments')), max_chars)})")
        for event in events.pop(call.index, []):
            _echo_event(event, max_chars)
    for leftover in events.values():  # tool runs not tied to a recorded call
        for event in leftover:
            _echo_event(event, max_chars)


def _shared_prefix(earlier: list[dict], messages: list[dict]) -> int:
    """How many leading messages a call repeats from the one before (agents resend the history)."""
    count = 0
    for a, b in zip(earlier, messages):
        if a != b:
            break
        count += 1
    return count


def _echo_event(event, max_chars: int) -> None:
    arguments = event.arguments if isinstance(event.arguments, str) else json.dumps(event.arguments, ensure_ascii=False)
    where = "" if event.call_index is None else f" (call {event.call_index})"
    typer.echo(f"  tool {event.name}{where}: {_cut(arguments, max_chars)}")
    typer.echo("    -> " + _indent(_cut(event.output, max_chars)))
    if event.error:
        typer.echo("    error: " + _indent(_cut(event.error, max_chars)))


def _message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    text = "" if content is None else str(content)
    for call in message.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        text += f"\n<tool call {function.get('name')}({function.get('arguments')})>"
    return text.strip()


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _age(timestamp: float, now: float) -> str:
    seconds = max(0.0, now - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


@traces_app.command("list")
def list_rollouts(
    store: Optional[Path] = StoreOpt,
    status: Optional[str] = typer.Option(None, "--status", help="Only rollouts with this status: running, succeeded, failed, timeout."),
    group: Optional[str] = typer.Option(None, "--group", help="Only rollouts of this group (one task at one training step)."),
    limit: int = typer.Option(50, "--limit", min=1, help="Show at most this many, newest first."),
) -> None:
    """The rollouts in a trace store, newest first (see one with `brainforge traces show ID`)."""
    from rich.console import Console
    from rich.table import Table

    with _open_store(store) as opened:
        rollouts = opened.list_rollouts(status=status, group_id=group, limit=limit, newest_first=True)
        total = opened.count_rollouts()
    if not rollouts:
        typer.echo(f"no rollouts in {opened.path}" + (" match" if status or group else ""))
        return
    now = time.time()
    typer.echo(f"{opened.path}: {len(rollouts)} of {total} rollouts, newest first")
    table = Table()
    for name, justify in (("id", "left"), ("task", "left"), ("group", "left"), ("status", "left"), ("reward", "right"),
                          ("calls", "right"), ("age", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    for rollout in rollouts:
        table.add_row(rollout.rollout_id, rollout.task_id or "-", rollout.group_id or "-", rollout.status,
                      _num(rollout.reward), str(rollout.num_calls), _age(rollout.created, now))
    Console(width=max(100, Console().width)).print(table)


@traces_app.command("export")
def export(
    store: Optional[Path] = StoreOpt,
    format: str = typer.Option("jsonl", "--format", help="Output format (jsonl)."),
    out: Path = typer.Option(..., "--out", "-o", help="The file to write.", show_default=False),
    min_reward: Optional[float] = typer.Option(None, "--min-reward", help="Only rollouts whose reward is at least this "
                                               "(rollouts without a reward are left out)."),
    status: Optional[str] = typer.Option(None, "--status", help="Only rollouts with this status, e.g. succeeded."),
    group: Optional[str] = typer.Option(None, "--group", help="Only rollouts of this group."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Write rollouts of the trace store as JSONL for SFT and for LUFFY, one line per rollout.

    Each line has `messages` (the whole trajectory as a chat, tool calls and results included:
    a `type: chat` source), `prompt`, `response`, `reward` and the final call's `token_ids`,
    `logprobs` and `tokenizer` (an off-policy trace file), plus `rollout_id` and `task_id`."""
    from brainforge.agents.export import export_jsonl

    if format != "jsonl":
        raise BrainforgeError(f"--format {format}: only jsonl is supported")
    with _open_store(store) as opened:
        report = export_jsonl(opened, out, status=status, group_id=group, min_reward=min_reward, force=force)
    typer.echo(report.summary())


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
