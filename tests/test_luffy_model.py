"""LUFFY / ExGRPO on a tiny model (ALGORITHMS.md sections 3, 4 and 7): the pieces of a mixed
step, run in-process on a GRPOModule without a Trainer.

The headline property: a group whose fresh samples all fail and whose trace succeeds still
moves the LoRA adapter, through f(pi_theta) (reimplementations that build the off-policy
ratio from floats or detached log-probs get exactly zero gradient here). Around it: per-prompt
sample counts in the generation engine, trace tokens aligned with what the chat template
renders, the entropy ExGRPO selects replays by, and the skipped non-finite update.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from brainforge.config import ExperienceSettings, GRPOSettings, OffPolicySettings, TrainingConfig
from brainforge.data.prompts import PromptExample
from brainforge.data.templates import chat_format
from brainforge.data.traces import Trace, trace_token_ids
from brainforge.generation.engine import GenerationEngine, SamplingParams
from brainforge.rl.advantages import group_advantages
from brainforge.rl.experience import Experience, question_uid, select_lowest_entropy
from brainforge.rl.losses import StepTotals, loss_pass
from brainforge.training.mixed_groups import OffPolicySample, assemble_groups

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"}]
RESPONSE = "Ones: 2 + 0 = 2. Tens: 1 + 3 = 4.\nThe answer is 42."


def lora_policy(tiny_model_dir, dropout: float = 0.0):
    """The tiny Llama with a LoRA adapter whose B is not zero (at B = 0 lora_A gets no gradient)."""
    from transformers import AutoModelForCausalLM

    from brainforge.config import LoraSettings
    from brainforge.models.loader import attach_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = attach_lora(base, LoraSettings(r=4, lora_alpha=8, lora_dropout=dropout))
    torch.manual_seed(1)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    return policy


def grpo_module(policy, tokenizer, K: int = 4, max_new_tokens: int = 8, temperature: float = 1.0, **off_policy):
    from brainforge.training.grpo import GRPOModule

    settings = GRPOSettings(num_generations=K, prompts_per_step=1, max_new_tokens=max_new_tokens, temperature=temperature, beta=0.0,
                            reward_functions=[{"name": "last_number"}])
    return GRPOModule(policy, tokenizer, chat_format("chatml", tokenizer).template, settings, TrainingConfig(max_steps=1), 1,
                      off_policy=OffPolicySettings(**{"entropy_coef": 0.0, **off_policy}))


def lora_grads(policy) -> dict[str, torch.Tensor | None]:
    return {name: param.grad for name, param in policy.named_parameters() if "lora_" in name}


# --------------------------------------------------------------------------- generation with per-prompt counts


@pytest.fixture(scope="module")
def plain_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_generate_with_per_prompt_counts_groups_rows_by_prompt(plain_model, tokenizer):
    prompts = [[5, 17, 300, 41], [9, 8], [100, 200, 300, 400, 500, 600]]
    engine = GenerationEngine(plain_model, tokenizer, stop_token_ids=[])
    engine.stop_token_ids = torch.tensor([-1])                                      # never stop early: full rows
    greedy = SamplingParams(max_new_tokens=5, temperature=0)
    alone = [engine.generate([p], 1, greedy).completion_ids[0].tolist() for p in prompts]
    rollout = engine.generate(prompts, [3, 0, 2], greedy)
    assert rollout.completion_ids.shape == (5, 5)
    assert rollout.prompt_ids == [prompts[0]] * 3 + [prompts[2]] * 2
    assert [row.tolist() for row in rollout.completion_ids] == [alone[0]] * 3 + [alone[2]] * 2
    assert len(rollout.texts) == 5 and rollout.truncated.all() and rollout.completion_mask.all()
    # Sampled rows keep the same layout, each row its own sample.
    sampled = engine.generate(prompts, [1, 3, 0], SamplingParams(max_new_tokens=5, temperature=1.0, return_logprobs=True),
                              torch.Generator().manual_seed(0))
    assert sampled.prompt_ids == [prompts[0]] + [prompts[1]] * 3 and sampled.logprobs.shape == (4, 5)
    assert engine.generate(prompts, [0, 0, 0], greedy).completion_ids.shape[0] == 0
    with pytest.raises(ValueError, match="one count >= 0 per prompt"):
        engine.generate(prompts, [1, 2], greedy)
    with pytest.raises(ValueError, match="one count >= 0 per prompt"):
        engine.generate(prompts, [1, -1, 2], greedy)


# --------------------------------------------------------------------------- gradient from a trace-only group


def trace_only_group(module, tokenizer, K: int = 4):
    """A group of K: the trace (reward 1) and K - 1 fresh samples (reward 0), the fresh rows
    masked out so that only trace tokens take part in the loss."""
    template = module.chat_template
    prompt = PromptExample(MESSAGES)
    prompt_ids = module.encode_prompt(prompt)
    trace = OffPolicySample(trace_token_ids(tokenizer, template, MESSAGES, RESPONSE), RESPONSE, "trace")
    fresh = module.engine.generate([prompt_ids], [K - 1], module.sampling, torch.Generator().manual_seed(0))
    rollout = assemble_groups([prompt_ids], [[trace]], fresh, K, module.engine.pad_id)
    advantages = group_advantages(torch.tensor([1.0] + [0.0] * (K - 1)), K, "none")
    mask = rollout.completion_mask.float()
    mask[1:] = 0
    return rollout, advantages, mask, len(trace.token_ids)


def test_trace_only_group_gives_the_adapter_a_gradient_through_f(tiny_model_dir, tokenizer):
    policy = lora_policy(tiny_model_dir)
    module = grpo_module(policy, tokenizer)
    rollout, advantages, mask, n_trace = trace_only_group(module, tokenizer)
    assert math.isclose(float(advantages[0]), 0.75)

    def run(detach_trace: bool):
        policy.zero_grad(set_to_none=True)

        def logps_fn(rows):
            logps, entropy = module.completion_logps(rollout, rows=rows, grad=True)
            if detach_trace:  # the pitfall: an off-policy weight built from detached log-probs
                logps = torch.where(rollout.prefix_mask[rows].to(logps.device), logps.detach(), logps)
            return logps, entropy

        _, stats = loss_pass(logps_fn, advantages, mask, module.loss_config, StepTotals.of(mask), 2,
                             prefix_mask=rollout.prefix_mask, behaviour_logps=rollout.behaviour_logps)
        return stats, lora_grads(policy)

    stats, grads = run(detach_trace=False)
    assert stats["off_tokens"] == n_trace and stats["on_tokens"] == 0
    assert 0 < stats["off_policy_prob"] < 1 and stats["off_policy_loss"] < 0
    for kind in ("lora_A", "lora_B"):
        named = {name: g for name, g in grads.items() if kind in name}
        assert named, kind
        for name, grad in named.items():
            assert grad is not None and torch.isfinite(grad).all(), name
            assert grad.abs().sum() > 0, name
    _, detached = run(detach_trace=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in detached.values())


# --------------------------------------------------------------------------- prefix_mask and the template


def test_prefix_mask_covers_exactly_the_rendered_trace(tiny_model_dir, tokenizer):
    from brainforge.training.luffy import prepare_trace_slots

    policy = lora_policy(tiny_model_dir)
    module = grpo_module(policy, tokenizer, max_new_tokens=64)
    template = module.chat_template
    prompt = PromptExample(MESSAGES)
    prompts = [prompt, PromptExample([{"role": "user", "content": "What is 7 + 1?"}])]
    long_response = RESPONSE + " Checking: 42 - 30 = 12." * 10
    traces = [Trace(RESPONSE, prompt=prompt.text), Trace(long_response, prompt=prompts[1].text)]

    def score(ps, texts):
        return [1.0] * len(texts)

    settings = OffPolicySettings(too_long="cut", wrong_traces="keep")
    slots = prepare_trace_slots(settings, prompts, traces, tokenizer, template, 64, score, 1.0)
    full_sample = slots.samples_for(prompts[0])[0]
    cut_sample = slots.samples_for(prompts[1])[0]
    assert cut_sample.truncated and len(cut_sample.token_ids) == 64

    prompt_ids = [module.encode_prompt(p) for p in prompts]
    fresh = module.engine.generate(prompt_ids, [3, 3], SamplingParams(max_new_tokens=4), torch.Generator().manual_seed(0))
    rollout = assemble_groups(prompt_ids, [[full_sample], [cut_sample]], fresh, 4, module.engine.pad_id)

    end = chat_format("chatml", tokenizer).end_of_turn
    rendered = tokenizer.apply_chat_template(MESSAGES + [{"role": "assistant", "content": RESPONSE}], chat_template=template,
                                             tokenize=False)
    prompt_text = tokenizer.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=True)
    expected = rendered[: rendered.index(end, len(prompt_text)) + len(end)]
    masked = rollout.completion_ids[0][rollout.prefix_mask[0]].tolist()
    assert tokenizer.decode(rollout.prompt_ids[0] + masked, skip_special_tokens=False) == expected
    assert masked[-1] == tokenizer.convert_tokens_to_ids(end)
    # The mask is one unbroken run from the first completion token to the trace's last.
    n = len(full_sample.token_ids)
    assert rollout.prefix_mask[0, :n].all() and not rollout.prefix_mask[0, n:].any()
    assert torch.equal(rollout.prefix_mask[0], rollout.completion_mask[0].bool())
    # The cut trace: masked up to the completion budget, no end-of-turn token, marked truncated.
    assert int(rollout.prefix_mask[4].sum()) == 64 and rollout.truncated[4]
    long_rendered = tokenizer.apply_chat_template(prompts[1].messages + [{"role": "assistant", "content": long_response}],
                                                  chat_template=template, tokenize=False)
    cut_text = tokenizer.decode(rollout.prompt_ids[4] + rollout.completion_ids[4][rollout.prefix_mask[4]].tolist())
    assert long_rendered.startswith(cut_text) and len(cut_text) < len(long_rendered)
    assert not rollout.prefix_mask[[1, 2, 3, 5, 6, 7]].any()
    # The trainer scores exactly these tokens: its log-probs equal a forward pass on the rendered text.
    logps, _ = module.completion_logps(rollout, rows=slice(0, 1), grad=False)
    ids = tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert ids == rollout.prompt_ids[0] + masked
    with torch.no_grad():
        logits = policy(torch.tensor([ids])).logits[0].float() / module.settings.temperature
    start = len(rollout.prompt_ids[0])
    direct = torch.log_softmax(logits[start - 1 : -1], -1).gather(1, torch.tensor(masked)[:, None]).squeeze(1)
    assert torch.allclose(logps[0, :n], direct, atol=1e-4)


# --------------------------------------------------------------------------- ExGRPO: entropy under the current policy


def direct_mean_entropy(policy, prompt_ids: list[int], completion: list[int], temperature: float) -> float:
    with torch.no_grad():
        logits = policy(torch.tensor([prompt_ids + completion])).logits[0].float() / temperature
    logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def test_mean_entropies_recomputed_under_the_current_policy_pick_the_replay(tiny_model_dir, tokenizer):
    from brainforge.training.exgrpo import ExperienceReplay

    policy = lora_policy(tiny_model_dir, dropout=0.3).train()
    with torch.no_grad():  # a random tiny model is near uniform (entropy ~ log V): make it opinionated
        policy.get_output_embeddings().weight.mul_(16.0)
    module = grpo_module(policy, tokenizer, temperature=0.7)
    prompt = PromptExample(MESSAGES)
    prompt_ids = module.encode_prompt(prompt)
    greedy = module.engine.generate([prompt_ids], 1, SamplingParams(max_new_tokens=6, temperature=0)).completion_ids[0].tolist()
    noise = torch.randint(0, len(tokenizer) - 1, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    trajectories = [Experience(noise, [-1.0] * 9, "noise"), Experience(greedy, [-1.0] * len(greedy), "greedy")]

    values = module.mean_entropies(prompt, trajectories)
    assert policy.training                                                           # eval mode only inside
    policy.eval()
    expected = [direct_mean_entropy(policy, prompt_ids, t.token_ids, 0.7) for t in trajectories]
    policy.train()
    assert values == pytest.approx(expected, abs=1e-4)
    assert values[1] < values[0] - 1.0              # the model's own greedy reply is what it is most certain about
    # Not a stale value: after an update of the adapter the entropies follow the new policy.
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.mul_(3.0)
    updated = module.mean_entropies(prompt, trajectories)
    policy.eval()
    assert updated == pytest.approx([direct_mean_entropy(policy, prompt_ids, t.token_ids, 0.7) for t in trajectories], abs=1e-4)
    policy.train()
    assert updated != pytest.approx(values, abs=1e-3)

    # The replay planner hands the group the trajectory with the lowest of these entropies.
    replay = ExperienceReplay(ExperienceSettings(experience_ratio=0.5), 4, {})
    replay.buffer.observe_solve_rate(1.0)
    replay.buffer.record_group(question_uid(prompt.messages), prompt, 2, trajectories)
    other = PromptExample([{"role": "user", "content": "What is 7 + 1?"}])
    planned, off_policy = replay.plan([other, other], module.mean_entropies)
    best = trajectories[select_lowest_entropy(trajectories, updated)]
    assert planned == [other, prompt]
    assert off_policy[0] == [] and [s.token_ids for s in off_policy[1]] == [best.token_ids]
    assert off_policy[1][0].source == "replay" and off_policy[1][0].behaviour_logps == best.logprobs


# --------------------------------------------------------------------------- skipped updates


def test_clip_and_check_skips_an_update_with_a_non_finite_gradient(tiny_model_dir, tokenizer):
    policy = lora_policy(tiny_model_dir)
    module = grpo_module(policy, tokenizer, skip_update_grad_norm=500.0)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = SimpleNamespace(optimizer=torch.optim.AdamW(params, lr=0.1, weight_decay=0.1))

    def fill_grads(value: float) -> None:
        for p in params:
            p.grad = torch.full_like(p, value)

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    fill_grads(0.01)                                      # an ordinary update first: AdamW now has momentum
    assert math.isfinite(module.clip_and_check(optimizer)) and module.skipped_updates == 0
    optimizer.optimizer.step()
    before = snapshot()

    fill_grads(0.01)
    params[0].grad.view(-1)[0] = math.nan                 # one NaN in one LoRA gradient
    assert math.isnan(module.clip_and_check(optimizer))
    assert module.skipped_updates == 1
    optimizer.optimizer.step()                            # momentum would move every weight if only zeroed
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))

    fill_grads(100.0)                                     # finite but above the bound: skipped too
    assert module.clip_and_check(optimizer) > 500 and module.skipped_updates == 2
    optimizer.optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))

    fill_grads(0.01)                                      # and an ordinary one goes through
    module.clip_and_check(optimizer)
    optimizer.optimizer.step()
    assert module.skipped_updates == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot()))
