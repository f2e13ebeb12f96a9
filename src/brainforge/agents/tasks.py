"""The bundled tool-use task set (`data.source: {name: "agent:tools", type: prompt, split: ...}`)
and its reward.

Every task needs a tool to be solved: multiplying or dividing 3-4 digit numbers exactly
(calculator), reading a value out of one of the bundled `task_data/configs/service_N.ini`
files (read_file), or a digit sum / prime count (python). A 135M model without tools
essentially never gets these right, so success measures tool use, not recall.

Determinism and disjoint splits: calculator and python questions come from one seeded stream
per kind, deduplicated, and are dealt out test first, then validation, then train, so no
question is in two splits and growing the train split never changes the held-out ones. The
read_file questions are split by file (files 0-39 train, 40-47 validation, 48-59 test), so no
held-out file is ever read during training. The bundled files are the output of
`service_file(i)`; a test checks they still are.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from brainforge.errors import DataError

TASK_DATA = Path(__file__).resolve().parent / "task_data"
SOURCE_TASKS = ("tools",)
SPLITS = ("train", "validation", "test")
KINDS = ("calculator", "read_file", "python")
SERVICE_FILES = 60
FILE_SPLITS = {"train": range(0, 40), "validation": range(40, 48), "test": range(48, 60)}
FILE_KEYS = ("port", "timeout_s", "release")
# (train, validation, test) counts of the generated kinds; read_file counts follow FILE_SPLITS.
COUNTS = {"calculator": {"train": 90, "validation": 16, "test": 44}, "python": {"train": 30, "validation": 8, "test": 16}}
MAX_NUMBERS_IN_REPLY = 3
_NAMES = ("billing", "search", "auth", "ledger", "media", "queue", "report", "mailer", "gateway", "catalog",
          "pricing", "profile")
_CODE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


# -- the bundled files --------------------------------------------------------------------------
def service_file(index: int) -> str:
    """The text of `configs/service_{index}.ini` (seeded by the index alone)."""
    rng = random.Random(f"service-{index}")
    name = f"{rng.choice(_NAMES)}-{index}"
    code = "".join(rng.choice(_CODE_LETTERS) for _ in range(4)) + "-" + "".join(rng.choice(_CODE_LETTERS) for _ in range(4))
    return (
        f"# Settings of the {name} service\n"
        "[service]\n"
        f"name = {name}\n"
        f"host = 10.{rng.randint(0, 9)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}\n"
        f"port = {rng.randint(2000, 9999)}\n"
        f"workers = {rng.randint(2, 32)}\n"
        f"timeout_s = {rng.randint(15, 900)}\n"
        f"release = {code}\n"
    )


def service_values(index: int) -> dict[str, str]:
    """key -> value of one service file (parsed from its text, as a reader would)."""
    values = {}
    for line in service_file(index).splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            values[key] = value
    return values


def write_task_data(folder: Path = TASK_DATA) -> None:
    """(Re)write the bundled files; used once to create them, and by the test that checks them."""
    configs = folder / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    for index in range(SERVICE_FILES):
        (configs / f"service_{index}.ini").write_text(service_file(index), encoding="utf-8")


# -- questions ----------------------------------------------------------------------------------
def _read_file_tasks(split: str) -> list[dict[str, Any]]:
    tasks = []
    for index in FILE_SPLITS[split]:
        values = service_values(index)
        path = f"configs/service_{index}.ini"
        for key in FILE_KEYS:
            what = "release code" if key == "release" else "number"
            tasks.append({"question": f"What is the {key} in {path}? Use the read_file tool. Reply with just the {what}.",
                          "answer": values[key], "kind": "read_file", "tools": ["read_file"]})
    return tasks


def _calculator_question(rng: random.Random) -> tuple[str, str]:
    form = rng.randrange(3)
    a, b = rng.randint(100, 9999), rng.randint(100, 9999)
    if form == 0:
        return f"What is {a} * {b}?", str(a * b)
    if form == 1:
        return f"What is {a * b} / {b}?", str(a)
    c = rng.randint(100, 9999)
    return f"What is {a} * {b} - {c}?", str(a * b - c)


def _python_question(rng: random.Random) -> tuple[str, str]:
    if rng.randrange(2) == 0:
        base, exponent = rng.randint(2, 9), rng.randint(40, 150)
        return f"What is the sum of the digits of {base}**{exponent}?", str(sum(map(int, str(base ** exponent))))
    limit = rng.randint(1000, 30000)
    return f"How many prime numbers are there below {limit}?", str(_count_primes(limit))


def _count_primes(limit: int) -> int:
    sieve = bytearray([1]) * limit
    sieve[:2] = b"\x00\x00"[:limit]
    for n in range(2, int(limit ** 0.5) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytes(len(range(n * n, limit, n)))
    return sum(sieve)


_GENERATORS = {"calculator": (_calculator_question, "calculator"), "python": (_python_question, "python")}


def _generated_tasks(kind: str, split: str) -> list[dict[str, Any]]:
    """Deal one seeded stream of unique questions: test first, then validation, then train."""
    generate, tool = _GENERATORS[kind]
    rng = random.Random(f"agent-tools-{kind}")
    counts = COUNTS[kind]
    wanted = counts["test"] + counts["validation"] + counts["train"]
    seen: set[str] = set()
    stream: list[tuple[str, str]] = []
    while len(stream) < wanted:
        question, answer = generate(rng)
        if question not in seen:
            seen.add(question)
            stream.append((question, answer))
    start = {"test": 0, "validation": counts["test"], "train": counts["test"] + counts["validation"]}[split]
    suffix = f" Use the {tool} tool{' and print the result' if tool == 'python' else ''}. Reply with just the number."
    return [{"question": q + suffix, "answer": a, "kind": kind, "tools": [tool]} for q, a in stream[start : start + counts[split]]]


def tool_tasks(split: str, kinds: list[str] | tuple[str, ...] = KINDS) -> list[dict[str, Any]]:
    """The tasks of one split as dicts (question, answer, kind, tools, root, task_id), in a
    seeded mixed order so that the first N are a mix of kinds."""
    if split not in SPLITS:
        raise DataError(f"agent:tools: split {split!r} does not exist; use one of {', '.join(SPLITS)}")
    tasks = []
    for kind in kinds:
        tasks.extend(_read_file_tasks(split) if kind == "read_file" else _generated_tasks(kind, split))
    random.Random(f"agent-tools-order-{split}").shuffle(tasks)
    for number, task in enumerate(tasks):
        task["root"] = str(TASK_DATA)
        task["task_id"] = f"tools-{split}-{task['kind']}-{number}"
    return tasks


def agent_prompts(task: str, options: dict[str, Any], split: str) -> list[Any]:
    """`agent:<task>` prompt source: PromptExamples whose columns carry what the agent and
    the reward need (answer, tools, root, kind, task_id). Option `kinds` keeps some kinds."""
    from brainforge.data.prompts import PromptExample

    where = f"agent:{task}"
    if task not in SOURCE_TASKS:
        raise DataError(f"{where}: no such task set; the bundled one is agent:tools")
    options = dict(options)
    kinds = options.pop("kinds", list(KINDS))
    if options:
        raise DataError(f"{where}: unknown option(s) {sorted(options)}; the only option is kinds (a list of {', '.join(KINDS)})")
    if isinstance(kinds, str):
        kinds = [kinds]
    if not isinstance(kinds, list) or not kinds or any(kind not in KINDS for kind in kinds):
        raise DataError(f"{where}: options.kinds must be a non-empty list of {', '.join(KINDS)}, got {kinds!r}")
    examples = []
    for item in tool_tasks(split, kinds):
        question = item.pop("question")
        examples.append(PromptExample([{"role": "user", "content": question}], item))
    return examples


# -- the reward ---------------------------------------------------------------------------------
# A number as a whole token: not part of a word, a path (service_7) or a longer number.
NUMBER = re.compile(r"(?<![\w.,\-])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w]|[.,]\d)")


def _decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def task_reward(final_text: str | None, task: dict[str, Any]) -> float:
    """1.0 when the final reply states the task's answer, else 0.0.

    Numeric answers are compared as numbers (1,817,517 and 1817517.0 count as 1817517) among
    the reply's whole-number tokens, and the reply may hold at most MAX_NUMBERS_IN_REPLY
    distinct numbers: otherwise listing every candidate (1 2 3 ... 32) would earn the reward
    under RL. Other answers (release codes) must appear as a whole token, any case."""
    answer = str(task.get("answer", "")).strip()
    text = final_text or ""
    if not answer:
        return 0.0
    expected = _decimal(answer) if re.fullmatch(r"-?\d+(?:\.\d+)?", answer) else None
    if expected is not None:
        numbers = {value for value in map(_decimal, NUMBER.findall(text)) if value is not None}
        return 1.0 if expected in numbers and len(numbers) <= MAX_NUMBERS_IN_REPLY else 0.0
    pattern = rf"(?<![\w-]){re.escape(answer)}(?![\w-])"
    return 1.0 if re.search(pattern, text, re.IGNORECASE) else 0.0


def agent_task_reward(prompts: list[str], completions: list[str], answer: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """`task_reward` as a registry reward (`agent_task`): the `answer` column per completion;
    None where a sample has no answer."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if a is None else task_reward(c, {"answer": a}) for c, a in zip(completions, answers)]
