"""Reinforcement-learning maths shared by GRPO and the reasoning trainers built on it."""
