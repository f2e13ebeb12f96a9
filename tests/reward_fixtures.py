"""Reward functions importable by dotted path from GRPO test runs (PYTHONPATH=tests)."""


def length_reward(prompts, completions, **kwargs):
    """Graded, so groups almost never tie: longer completions score higher."""
    return [min(len(c), 200) / 200 for c in completions]


def broken_reward(prompts, completions, **kwargs):
    raise RuntimeError("this reward is broken on purpose")
