"""Reward functions by name, or by dotted import path.

Every reward is a plain callable `(prompts, completions, **columns) -> list[float | None]`:
dataset columns (answer, tests, ...) arrive as keyword lists aligned with the completions,
and None means "does not apply to this sample".
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from brainforge.errors import BrainforgeError, ConfigError

RewardFunction = Callable[..., list]


def _builtin() -> dict[str, RewardFunction]:
    from brainforge.agents.tasks import agent_task_reward
    from brainforge.rewards import correctness, search_r1, seed
    from brainforge.rewards.code_execution import code_execution

    return {
        "seed": seed.seed_reward,
        "exact_match": correctness.exact_match,
        "last_number": correctness.last_number_match,
        "math_verify": correctness.math_verify_match,
        "answer_format": correctness.answer_format,
        "code_execution": code_execution,
        "answer_match": search_r1.answer_match,
        "tag_order": search_r1.tag_order,
        "search_bonus": search_r1.search_bonus,
        "search_r1_format": search_r1.search_r1_format,
        "agent_task": agent_task_reward,
    }


def reward_names() -> list[str]:
    return sorted(_builtin())


def resolve_reward(name: str) -> RewardFunction:
    """The callable for a registry name or a dotted path `pkg.module.function`."""
    builtin = _builtin()
    if name in builtin:
        return builtin[name]
    module_name, _, attribute = name.replace(":", ".").rpartition(".")
    if not module_name:
        raise ConfigError(f"reward '{name}' is not a registered reward ({', '.join(reward_names())}) nor a dotted path package.module.function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward '{name}': cannot import module '{module_name}' ({exc})") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"reward '{name}': module '{module_name}' has no callable '{attribute}'")
    return function


def call_reward(name: str, function: RewardFunction, prompts: list[str], completions: list[str], columns: dict[str, list[Any]], kwargs: dict[str, Any]) -> list[float | None]:
    """Call one reward and check what it returned; errors name the function."""
    from brainforge.errors import BrainforgeError

    try:
        values = function(prompts, completions, **columns, **kwargs)
    except Exception as exc:
        raise RewardError(f"reward function '{name}' raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise BrainforgeError(f"reward function '{name}' returned {got} values for {len(completions)} completions; it must return a list of float or None, one per completion")
    out: list[float | None] = []
    for value in values:
        if value is not None and not isinstance(value, (int, float)):
            raise BrainforgeError(f"reward function '{name}' returned {type(value).__name__}; expected float or None")
        out.append(None if value is None else float(value))
    return out


class RewardError(BrainforgeError):
    """A reward function raised; the trainer decides whether that stops training."""
