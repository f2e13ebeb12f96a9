"""Rollouts from the trace store as training data: one JSONL line per rollout that both the
SFT loader (`type: chat`, a `messages` column) and the off-policy trace loader (LUFFY:
`prompt`, `response`, `token_ids`, `logprobs`, `tokenizer`) read without a column mapping.

`messages` is the whole trajectory as the model saw it: the last call's request messages
lowered by the policy server's own `lower_messages` (tool list in the system message,
assistant tool calls as `<tool_call>` blocks, tool results as `tool` turns, as the default
ChatML template shows them), then the final completion as the last assistant turn. SFT on it therefore
trains exactly the text form the server shows the model and parses back (rejection-sampling
fine-tuning, issue 12 item 6).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from brainforge.agents.store import STATUSES, RolloutRecord, TraceStore
from brainforge.errors import BrainforgeError

log = logging.getLogger(__name__)

EXPORT_SOURCE = "agent"
"""The `source` of exported traces (what `brainforge traces stats` counts them under)."""


@dataclass
class ExportReport:
    path: Path
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> how many matching rollouts were left out for it."""

    def summary(self) -> str:
        text = f"wrote {self.written} rollouts to {self.path}"
        if self.skipped:
            text += " (skipped: " + ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items())) + ")"
        return text


def trajectory_row(rollout: RolloutRecord) -> dict[str, Any]:
    """The export line of one rollout (with its calls); raises `ValueError` saying why a
    rollout cannot become a training example (no call, empty final reply, no user turn)."""
    from brainforge.agents.chat_format import lower_messages, text_content, validate_tools

    if not rollout.calls:
        raise ValueError("no LLM call")
    last = rollout.calls[-1]
    if not last.text.strip():
        raise ValueError("empty final reply")
    tool_choice = (last.params or {}).get("tool_choice")
    specs = validate_tools(last.tools) if tool_choice != "none" else []
    messages = lower_messages(last.messages, specs, tool_choice) + [{"role": "assistant", "content": last.text}]
    prompt = next((text_content(m.get("content"), "content", allow_none=True) for m in last.messages
                   if isinstance(m, dict) and m.get("role") == "user"), "")
    if not prompt.strip():
        raise ValueError("no user message")
    row: dict[str, Any] = {"messages": messages, "prompt": prompt, "response": last.text, "reward": rollout.reward,
                           "source": EXPORT_SOURCE}
    logprobs = [float(v) for v in last.logprobs]
    if last.completion_ids and len(logprobs) == len(last.completion_ids) and all(math.isfinite(v) and v <= 0 for v in logprobs):
        row["token_ids"] = list(last.completion_ids)
        row["logprobs"] = logprobs
        tokenizer = last.tokenizer or rollout.metadata.get("tokenizer")
        if isinstance(tokenizer, str) and tokenizer:
            row["tokenizer"] = tokenizer
    row["rollout_id"] = rollout.rollout_id
    row["task_id"] = rollout.task_id
    return row


def iter_export(store: TraceStore, *, status: str | None = None, group_id: str | None = None,
                min_reward: float | None = None, skipped: dict[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """Export lines of the matching rollouts, oldest first. `min_reward` also drops rollouts
    without a reward; reasons for leaving a rollout out are counted in `skipped`."""
    skipped = skipped if skipped is not None else {}
    for listed in store.list_rollouts(status=status, group_id=group_id):
        if min_reward is not None and (listed.reward is None or listed.reward < min_reward):
            continue
        try:
            yield trajectory_row(store.get_rollout(listed.rollout_id))
        except (ValueError, BrainforgeError) as exc:  # a stored request the lowering refuses is a BrainforgeError
            reason = str(exc) if isinstance(exc, ValueError) else "unreadable messages"
            skipped[reason] = skipped.get(reason, 0) + 1
            log.debug("rollout %s not exported: %s", listed.rollout_id, exc)


def export_jsonl(store: TraceStore, out: str | Path, *, status: str | None = None, group_id: str | None = None,
                 min_reward: float | None = None, force: bool = False) -> ExportReport:
    """Write the export atomically (temp file, fsync, rename); an existing `out` is refused
    unless `force`, and nothing is written when no rollout matches."""
    target = Path(out)
    if status is not None and status not in STATUSES:
        raise BrainforgeError(f"--status {status!r}: use one of {', '.join(STATUSES)}")
    if target.is_dir():
        raise BrainforgeError(f"--out {target}: is a directory; give a file name, e.g. {target / 'agent_sft.jsonl'}")
    if target.exists() and not force:
        raise BrainforgeError(f"--out {target}: already exists; pass --force to overwrite it, or choose another file")
    report = ExportReport(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            for row in iter_export(store, status=status, group_id=group_id, min_reward=min_reward, skipped=report.skipped):
                handle.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
                report.written += 1
            handle.flush()
            os.fsync(handle.fileno())
        if report.written == 0:
            filters = ", ".join(f"{k} {v}" for k, v in (("status", status), ("group", group_id), ("min reward", min_reward))
                                if v is not None) or "no filter"
            raise BrainforgeError(f"trace store {store.path}: no rollout to export ({filters}"
                                  + (f"; skipped {report.summary().split('(skipped: ')[1]}" if report.skipped else ")")
                                  + "; check `brainforge traces list`")
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return report


__all__ = ["ExportReport", "export_jsonl", "iter_export", "trajectory_row"]
