"""Reward functions: plain callables `(prompts, completions, **kwargs) -> list[float | None]`."""
