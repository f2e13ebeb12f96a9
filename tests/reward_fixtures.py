"""Reward functions importable by dotted path from GRPO test runs (PYTHONPATH=tests)."""


def length_reward(prompts, completions, **kwargs):
    """Graded, so groups almost never tie: longer completions score higher."""
    return [min(len(c), 200) / 200 for c in completions]


def broken_reward(prompts, completions, **kwargs):
    raise RuntimeError("this reward is broken on purpose")


def even_length_reward(prompts, completions, **kwargs):
    """0/1 and right about half the time for a random model: ExGRPO's buffer fills and replays."""
    return [float(len(c.split()) % 2 == 0) for c in completions]
