"""Sampling completions for RL: one batched engine for every algorithm."""
