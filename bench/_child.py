"""Shared by the bench scripts: run one tool in a child process and read its result.

A worker prints one line `RESULT {json}`; anything else it prints is ignored. On failure
the error is printed as a JSON line (so a bench run still reports what it measured for the
other tools) and None is returned."""

from __future__ import annotations

import json
import subprocess
import sys

PREFIX = "RESULT "


def emit(result: dict) -> None:
    print(PREFIX + json.dumps(result), flush=True)


def run_worker(script: str, arguments: list[str], worker: str) -> dict | None:
    done = subprocess.run([sys.executable, script, *arguments, "--worker", worker], capture_output=True, text=True)
    line = next((l for l in done.stdout.splitlines() if l.startswith(PREFIX)), None)
    if done.returncode != 0 or line is None:
        print(json.dumps({"tool": worker, "error": done.stderr[-1500:]}), flush=True)
        return None
    return json.loads(line[len(PREFIX):])


def prepare_environment(worker: bool) -> None:
    """Offline, quiet tokenizers; a worker logs warnings only (its stdout carries the result)."""
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if worker:
        logging.basicConfig(level=logging.WARNING)


def cpu_name() -> str:
    """The CPU model, for the record every figure carries (AMX vs AVX2-only decides dtype and speed)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
