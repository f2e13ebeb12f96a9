"""Reward functions for the sampled-teacher tests, importable by dotted path (tests/ is on
sys.path under pytest). Each call is recorded in CALLS so a test can see every completion
the reward judged, accepted or not."""

CALLS: list[dict] = []


def even_length(prompts, completions, **kwargs):
    """1.0 for a completion with an even number of characters, else 0.0: on a random model
    about half the samples pass, decided by the text alone, so a test can recompute it."""
    scores = [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]
    CALLS.append({"prompts": list(prompts), "completions": list(completions), "scores": scores})
    return scores


def accept_all(prompts, completions, **kwargs):
    return [1.0 for _ in completions]


def not_applicable(prompts, completions, **kwargs):
    """None for every sample: "does not apply", so the total is NaN and nothing is correct."""
    return [None for _ in completions]


def broken(prompts, completions, **kwargs):
    raise ValueError("this reward is broken")
