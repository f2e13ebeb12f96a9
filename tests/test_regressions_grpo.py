"""GRPO regressions that a run test cannot see (issue 8, section 7).

`test_grpo.py` only checks that some lora_B moved, so a run whose advantages were negated,
whose reward columns belonged to another prompt, or whose batch scaling became per-group
still passed. Here one real optimizer step runs on a tiny model inside a Lightning Trainer,
and the test looks at what the step did:

* the advantage-weighted log-likelihood of the sampled completions goes *up* (with negated
  advantages it goes down);
* the reward function receives (prompt, completion, columns) triples that belong together;
* `scale_rewards: batch` divides by the batch's std, not each group's.
"""

from __future__ import annotations

import math
import re

import lightning as L
import pytest
import torch

from brainforge.data.prompts import PromptExample
from brainforge.rewards.seed import chat_score
from brainforge.rl.advantages import group_advantages

K = 4  # completions per prompt
B = 2  # prompts per step

CALLS: list[dict] = []  # what the recording reward saw, call by call


def recording_reward(prompts, completions, **columns):
    """Graded (share of vowels among letters), so groups almost never tie; records its inputs."""
    values = []
    for completion in completions:
        letters = [c for c in completion.lower() if c.isalpha()]
        values.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    CALLS.append({"prompts": list(prompts), "completions": list(completions),
                  "columns": {k: list(v) for k, v in columns.items()}, "values": values})
    return values


def _one_grpo_step(tiny_model_dir, tokenizer, **grpo):
    """Run one GRPO optimizer step; return the rollout, log-probs before/after, rewards, advantages."""
    from transformers import AutoModelForCausalLM

    import brainforge.training.grpo as grpo_module
    from brainforge.config import GRPOSettings, LoraSettings, TrainingConfig
    from brainforge.data.templates import chat_format
    from brainforge.models.loader import attach_lora
    from brainforge.training.grpo import GRPOModule
    from brainforge.training.grpo_run import PromptDataModule

    CALLS.clear()
    L.seed_everything(0, verbose=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    policy = attach_lora(base, LoraSettings(r=4, lora_dropout=0.0))
    settings = GRPOSettings(**{
        "num_generations": K, "prompts_per_step": B, "max_new_tokens": 8, "temperature": 1.0, "beta": 0.0,
        "reward_functions": [{"name": f"{__name__}.recording_reward"}], "log_completions_every_n_steps": 1000, **grpo})
    training = TrainingConfig(max_steps=1, learning_rate=1e-3, max_grad_norm=None, test_prompts=[])
    module = GRPOModule(policy, tokenizer, chat_format("chatml", tokenizer).template, settings, training, total_steps=1)

    seen: dict = {}
    generate = module.engine.generate

    def recording_generate(prompt_ids, num_samples, params, **kwargs):
        rollout = generate(prompt_ids, num_samples, params, **kwargs)
        seen["rollout"] = rollout
        seen["before"] = module.completion_logps(rollout, grad=False)[0].detach().clone()
        return rollout

    module.engine.generate = recording_generate
    advantages = grpo_module.group_advantages

    def recording_advantages(*args, **kwargs):
        seen["advantages"] = advantages(*args, **kwargs)
        return seen["advantages"]

    prompts = [PromptExample([{"role": "user", "content": f"What is {i} + {i}?"}], {"answer": str(2 * i), "index": i}) for i in range(6)]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="32-true")
    grpo_module.group_advantages = recording_advantages
    try:
        trainer.fit(module, datamodule=PromptDataModule(prompts, B))
    finally:
        grpo_module.group_advantages = advantages
    assert trainer.global_step == 1
    rollout = seen["rollout"]
    after = module.completion_logps(rollout, grad=False)[0].detach()
    (call,) = CALLS
    return {"rollout": rollout, "before": seen["before"], "after": after, "call": call,
            "rewards": torch.tensor(call["values"]), "advantages": seen["advantages"], "module": module}


@pytest.fixture(scope="module")
def group_step(tiny_model_dir, tokenizer):
    return _one_grpo_step(tiny_model_dir, tokenizer, scale_rewards="group")


def test_a_step_raises_the_likelihood_of_better_completions(group_step):
    """Advantage-weighted log-likelihood of the sampled completions rises after one step.

    To first order an optimizer step on the GRPO loss changes sum_i A_i * sum_t log pi(y_it)
    by +lr * (positive amount); with negated advantages (in the trainer or the loss) the
    same quantity falls."""
    rollout, before, after = group_step["rollout"], group_step["before"], group_step["after"]
    mask = rollout.completion_mask.float()
    rewards = group_step["rewards"].view(B, K)
    centred = (rewards - rewards.mean(dim=1, keepdim=True)).reshape(-1)   # the sign of each advantage
    assert centred.abs().sum() > 0, "every group tied: the step had no signal; change the reward"
    moved = ((after - before) * mask).sum(dim=1)                            # [N] change of each sequence log-prob
    assert moved.abs().sum() > 0, "the policy did not change"
    gain = float((centred * moved).sum())
    assert gain > 0, f"the step lowered the likelihood of the better completions (gain {gain:.3g})"
    # Per group: the best completion gained log-prob relative to the worst.
    for group in range(B):
        rows = slice(group * K, (group + 1) * K)
        best, worst = int(rewards[group].argmax()), int(rewards[group].argmin())
        if rewards[group, best] > rewards[group, worst]:
            assert moved[rows][best] > moved[rows][worst]


def test_reward_columns_belong_to_their_prompt_and_completion(group_step, tokenizer):
    """Row j of every list given to the reward is completion j, its prompt, and that prompt's columns."""
    rollout, call, module = group_step["rollout"], group_step["call"], group_step["module"]
    n = B * K
    assert len(call["prompts"]) == len(call["completions"]) == n
    assert set(call["columns"]) == {"answer", "index"} and all(len(v) == n for v in call["columns"].values())
    assert call["completions"] == rollout.texts
    for row in range(n):
        prompt = call["prompts"][row]
        i = int(re.fullmatch(r"What is (\d+) \+ \1\?", prompt).group(1))
        assert call["columns"]["index"][row] == i and call["columns"]["answer"][row] == str(2 * i), (row, prompt, call["columns"])
        # The completion in this row was sampled from this prompt.
        assert rollout.prompt_ids[row] == module.encode_prompt(PromptExample([{"role": "user", "content": prompt}]))
        assert call["prompts"][row] == call["prompts"][(row // K) * K]  # a group shares its prompt
    assert call["prompts"][0] != call["prompts"][K]  # two different prompts in the step


def test_batch_scaling_divides_by_the_batch_std_worked_example():
    rewards = torch.tensor([0.0, 1.0, 0.0, 3.0])                # two groups of 2
    # centred: [-0.5, 0.5, -1.5, 1.5]; batch sample std of [0, 1, 0, 3] = sqrt(6 / 3) = sqrt(2)
    expected = torch.tensor([-0.5, 0.5, -1.5, 1.5]) / math.sqrt(2)
    assert torch.allclose(group_advantages(rewards, 2, "batch"), expected, rtol=1e-3)
    # per group it would be +-1/sqrt(2) in both groups
    assert torch.allclose(group_advantages(rewards, 2, "group"), torch.tensor([-1.0, 1, -1, 1]) / math.sqrt(2), rtol=1e-3)


def test_trainer_scales_advantages_by_the_batch_std_when_asked(tiny_model_dir, tokenizer):
    step = _one_grpo_step(tiny_model_dir, tokenizer, scale_rewards="batch")
    rewards = step["rewards"]
    grouped = rewards.view(B, K)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    by_batch = centred / (rewards.std() + 1e-4)
    by_group = (centred.view(B, K) / (grouped.std(dim=1, keepdim=True) + 1e-4)).reshape(-1)
    assert not torch.allclose(by_batch, by_group, rtol=1e-2), "rewards too regular to tell the scalings apart"
    assert torch.allclose(step["advantages"], by_batch, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("completion, expected", [
    ("a" * 9, -0.3),    # under 10 characters: -0.5, unique words +0.2
    ("a" * 10, 0.2),    # 10 characters: no length term
    ("Paris is lovely.", 0.2),   # 16 characters: no length term, unique words +0.2, no keyword of "hi"
    ("a" * 50, 0.2),    # exactly 50: no bonus yet
    ("a" * 51, 0.3),    # over 50: +0.1
], ids=["9 chars", "10 chars", "16 chars", "50 chars", "51 chars"])
def test_seed_chat_length_cutoffs(completion, expected):
    """The diagram's chat thresholds: < 10 characters -0.5, > 50 characters +0.1."""
    assert chat_score("hi", completion) == pytest.approx(expected)
