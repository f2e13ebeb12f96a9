"""Reward functions importable by dotted path from `brainforge eval` test runs (PYTHONPATH=tests)."""

import json
import os


def prompt_says_even(prompts, completions, **kwargs):
    """1.0 for every completion of a prompt that contains the word 'even': the score does
    not depend on the model, so accuracy and pass@k have hand-computable values.

    With EVAL_REWARD_RECORD set, each call appends its completions to that file as a JSON
    line, so a test can see what each model answered."""
    record = os.environ.get("EVAL_REWARD_RECORD")
    if record:
        with open(record, "a") as handle:
            handle.write(json.dumps({"prompts": list(prompts), "completions": list(completions)}) + "\n")
    return [1.0 if " even" in p else 0.0 for p in prompts]
