"""Correctness rewards, the reward registry, and GRPO config validation."""

import pytest

from brainforge.config import validate_config
from brainforge.errors import BrainforgeError, ConfigError
from brainforge.rewards.correctness import answer_format, exact_match, last_number_match, math_verify_match, normalize_text
from brainforge.rewards.registry import RewardError, call_reward, resolve_reward


def test_normalisation_and_exact_match():
    assert normalize_text("The Beijing!") == "beijing"
    assert exact_match([""] * 3, ["The Beijing!", "Beijing city", "<answer>beijing</answer> done"], answer=["beijing"] * 3) == [1.0, 0.0, 1.0]
    assert exact_match([""], ["x"], answer=[None]) == [None]


def test_last_number_match():
    completions = ["3 + 4 = 7", "The answer is 1,024.", "I think 12, no wait 13", "no number", "<answer>-5</answer> (not 3)"]
    assert last_number_match([""] * 5, completions, answer=["7", "1024", "12", "3", "-5"]) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_math_verify_match():
    assert math_verify_match(["", ""], ["So it is $\\frac{1}{2}$", "it is 0.3"], answer=["0.5", "1/2"]) == [1.0, 0.0]


def test_answer_format_partial_credit():
    assert answer_format(["", "", ""], ["<answer>7</answer>", "<answer>" + "x" * 60 + "</answer>", "7"]) == [1.0, 0.5, 0.0]


def test_registry_by_name_and_dotted_path():
    assert resolve_reward("last_number") is last_number_match
    assert resolve_reward("brainforge.rewards.correctness.exact_match") is exact_match
    with pytest.raises(ConfigError, match="not a registered reward"):
        resolve_reward("nonsense")
    with pytest.raises(ConfigError, match="cannot import module"):
        resolve_reward("no_such_pkg.module.fn")
    with pytest.raises(ConfigError, match="has no callable"):
        resolve_reward("brainforge.rewards.correctness.nothing_here")


def test_bad_reward_functions_are_named():
    with pytest.raises(BrainforgeError, match="'short' returned 1 values for 2 completions"):
        call_reward("short", lambda p, c, **k: [1.0], ["a", "b"], ["x", "y"], {}, {})
    with pytest.raises(BrainforgeError, match="returned str"):
        call_reward("texty", lambda p, c, **k: ["1"], ["a"], ["x"], {}, {})
    with pytest.raises(RewardError, match="'boom' raised ZeroDivisionError"):
        call_reward("boom", lambda p, c, **k: [1 / 0], ["a"], ["x"], {}, {})
    assert call_reward("cols", lambda p, c, answer, **k: [float(a) for a in answer], ["a"], ["x"], {"answer": ["2"]}, {}) == [2.0]


BASE = {"data": {"source": {"name": "sample:chat"}}, "training": {"max_steps": 1}}


@pytest.mark.parametrize("grpo, fragment", [
    ({"num_generations": 1}, "num_generations: must be >= 2"),
    ({"prompts_per_step": 3, "num_generations": 4, "micro_batch_size": 5}, "must divide prompts_per_step x num_generations = 12"),
    ({"max_new_tokens": 0}, "max_new_tokens: must be > 0"),
    ({"reward_functions": [{"name": "not.a.real.module.fn"}]}, "cannot import module"),
    ({"reward_functions": [{"name": "sed"}]}, "not a registered reward"),
])
def test_grpo_config_errors(grpo, fragment):
    with pytest.raises(ConfigError) as err:
        validate_config({**BASE, "algorithm": {"name": "grpo", "grpo": grpo}})
    assert fragment in str(err.value)
