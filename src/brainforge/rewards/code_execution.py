"""Execution-based coding reward: does the completion's code pass the unit tests?

The program is the completion's code (its fenced ```python blocks, or the whole completion
when it has none), then the dataset's `tests`, then `check(<entry_point>)` when the dataset
names an entry point (HumanEval's layout). It runs in `sandbox.run_python`; reward 1.0 when
it exits cleanly within the limits, else 0.0. Rows without tests score None.
"""

from __future__ import annotations

import re
from typing import Any

from brainforge.rewards.sandbox import SandboxLimits, run_python

CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    blocks = CODE_BLOCK.findall(completion)
    return "\n\n".join(blocks) if blocks else completion


def build_program(completion: str, tests: str, entry_point: str | None, prefix: str | None = None) -> str:
    code = extract_code(completion)
    if prefix and entry_point and f"def {entry_point}" not in code:
        code = prefix + code  # the model continued the given signature instead of restating it
    parts = [code, tests]
    if entry_point:
        parts.append(f"check({entry_point})")
    return "\n\n".join(parts) + "\n"


def code_execution(
    prompts: list[str],
    completions: list[str],
    tests: list[str | None] | None = None,
    entry_point: list[str | None] | None = None,
    code_prefix: list[str | None] | None = None,
    wall_seconds: float = 10.0,
    **kwargs: Any,
) -> list[float | None]:
    limits = SandboxLimits(wall_seconds=wall_seconds)
    n = len(completions)
    tests = tests or [None] * n
    entry_point = entry_point or [None] * n
    code_prefix = code_prefix or [None] * n
    out: list[float | None] = []
    for completion, test, entry, prefix in zip(completions, tests, entry_point, code_prefix):
        if not test:
            out.append(None)
            continue
        out.append(1.0 if run_python(build_program(completion, test, entry, prefix), limits).passed else 0.0)
    return out
