"""LUFFY / ExGRPO loss properties on tensors (ALGORITHMS.md sections 3, 4 and 7).

Each test pins one property of the mixed-policy loss that a reimplementation typically gets
wrong: group composition, the worked advantages, the shaping gradient pi*gamma/(pi+gamma)^2
(which only exists if the gradient flows *through* f), no clipping and no old log-probs on
off-policy tokens, equality with GRPO when there is no off-policy sample, the meaning of
on_weight / off_weight, ExGRPO's importance weight, the entropy bonus, and the independence
of the gradient from micro-batching and from the batch size.
"""

from __future__ import annotations

import math

import pytest
import torch

from brainforge.generation.engine import Rollout
from brainforge.rl.advantages import group_advantages
from brainforge.rl.losses import GRPOLossConfig, StepTotals, grpo_loss, loss_pass
from brainforge.rl.off_policy import OffPolicyLoss, off_policy_token_loss, off_policy_weight, shaping
from brainforge.training.mixed_groups import OffPolicySample, assemble_groups

LOSS_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo"]
GAMMA = 0.1
LUFFY = OffPolicyLoss.from_weights(GAMMA, 0.5, 0.5)


def shaped_weight(pi: float, gamma: float = GAMMA) -> float:
    """d f(pi) / d log pi for f(x) = x / (x + gamma): pi * gamma / (pi + gamma)^2."""
    return pi * gamma / (pi + gamma) ** 2


def mixed_batch(rows: int = 8, width: int = 6, seed: int = 0, group: int = 4):
    """A step batch of groups of `group` rows whose first row is off-policy (a trace): uneven
    lengths, on-policy ratios away from 1 (some clipped), a reference, behaviour log-probs
    known on half of the trace tokens (NaN = unknown on the rest)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    theta = torch.rand(rows, width, generator=g).clamp(min=0.02).log()        # log pi in (log 0.02, 0)
    old = theta + torch.randn(rows, width, generator=g) * 0.4
    ref = theta + torch.randn(rows, width, generator=g) * 0.3
    advantages = torch.randn(rows, generator=g)
    prefix = torch.zeros(rows, width, dtype=torch.bool)
    prefix[::group] = mask[::group].bool()
    behaviour = torch.full((rows, width), math.nan)
    known = prefix & (torch.rand(rows, width, generator=g) < 0.5)
    behaviour[known] = theta[known] + torch.randn(int(known.sum()), generator=g) * 0.5
    return theta, old, ref, advantages, mask, prefix, behaviour


def loss_and_grad(config: GRPOLossConfig, theta, advantages, mask, old=None, ref=None, prefix=None, behaviour=None, **kwargs):
    param = theta.clone().requires_grad_(True)
    loss, stats = grpo_loss(param, advantages, mask, config, old_logps=old, ref_logps=ref, prefix_mask=prefix,
                            behaviour_logps=behaviour, **kwargs)
    loss.backward()
    return loss.detach(), stats, param.grad


# --------------------------------------------------------------------------- group composition


def fresh_rollout(lengths: list[int], width: int, first_id: int = 100) -> Rollout:
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.arange(first_id + 10 * row, first_id + 10 * row + n)
        mask[row, :n] = 1
    return Rollout(prompt_ids=[], completion_ids=ids, completion_mask=mask, truncated=torch.tensor([n == width for n in lengths]),
                   texts=[f"fresh {row}" for row in range(len(lengths))], logprobs=-mask.float() * 0.5, stats={"completion_tokens": 1.0})


def test_assemble_groups_keeps_k_rows_traces_first_with_exact_prefix_mask():
    K, pad = 4, 0
    trace = OffPolicySample([11, 12, 13, 14, 15, 16], "trace a", "trace")                              # longer than any fresh row
    replay = OffPolicySample([21, 22], "replay b", "replay", behaviour_logps=[-0.5, -0.7])
    bad = OffPolicySample([31, 32, 33], "trace c", "trace", behaviour_logps=[-1.0])                     # wrong length: unknown
    prompts = [[1, 2], [3], [4, 5, 6]]
    off = [[trace], [replay, bad], []]
    fresh = fresh_rollout([3, 1, 4, 2, 4, 4, 1, 2, 3], width=4)                                          # 3 + 2 + 4 fresh rows
    out = assemble_groups(prompts, off, fresh, K, pad)

    assert out.completion_ids.shape == (12, 6)                                                         # B*K rows, widest row
    assert out.prompt_ids == [p for p in prompts for _ in range(K)]
    assert out.sources == ["trace", "policy", "policy", "policy", "replay", "trace", "policy", "policy"] + ["policy"] * 4
    assert out.texts[:5] == ["trace a", "fresh 0", "fresh 1", "fresh 2", "replay b"]
    lengths = [6, 3, 1, 4, 2, 3, 2, 4, 4, 1, 2, 3]
    assert out.completion_mask.sum(1).tolist() == lengths
    expected_prefix = torch.zeros(12, 6, dtype=torch.bool)
    expected_prefix[0, :6] = expected_prefix[4, :2] = expected_prefix[5, :3] = True
    assert torch.equal(out.prefix_mask, expected_prefix)                                               # off on fresh rows and padding
    assert out.completion_ids[0].tolist() == trace.token_ids
    assert out.completion_ids[1].tolist() == [100, 101, 102, pad, pad, pad]                            # fresh rows in order
    assert out.completion_ids[4, :2].tolist() == [21, 22] and out.completion_ids[4, 2:].eq(pad).all()
    assert out.completion_ids[6, :2].tolist() == [130, 131]                                            # fresh row 3 -> prompt 1
    assert torch.allclose(out.behaviour_logps[4, :2], torch.tensor([-0.5, -0.7]))
    known = torch.zeros(12, 6, dtype=torch.bool)
    known[4, :2] = True
    assert torch.isnan(out.behaviour_logps[~known]).all()                                              # NaN unless given (and aligned)
    assert out.truncated.tolist() == [False, False, False, True, False, False, False, True, True, False, False, False]
    assert out.logprobs[0].eq(0).all() and out.logprobs[1, :3].eq(-0.5).all()


def test_assemble_groups_rejects_counts_that_do_not_fill_the_groups():
    trace = OffPolicySample([11], "t", "trace")
    with pytest.raises(ValueError, match="group slots"):
        assemble_groups([[1]], [[trace] * 3], fresh_rollout([], 1), 2, 0)
    with pytest.raises(ValueError, match="groups need 3"):
        assemble_groups([[1]], [[trace]], fresh_rollout([1, 1], 2), 4, 0)


# --------------------------------------------------------------------------- worked examples


def test_section3_worked_example_trace_right_all_samples_wrong():
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    none = group_advantages(rewards, 8, "none")
    assert torch.allclose(none, torch.tensor([0.875] + [-0.125] * 7))
    assert math.isclose(float(rewards.std()), 0.354, abs_tol=5e-4)                                    # sample std
    std = group_advantages(rewards, 8, "group")
    assert math.isclose(float(std[0]), 2.47, abs_tol=5e-3)
    assert torch.allclose(std[1:], torch.full((7,), -0.35), atol=5e-3)
    # Plain GRPO on the 7 on-policy samples alone has no signal at all.
    assert torch.equal(group_advantages(rewards[1:], 7, "none"), torch.zeros(7))


def test_section4_worked_example_replayed_group():
    rewards = torch.tensor([1.0, 1, 0, 1, 0, 0, 0, 0])                    # replayed success + 7 fresh [1,0,1,0,0,0,0]
    adv = group_advantages(rewards, 8, "none")
    assert torch.allclose(adv, torch.where(rewards > 0, 0.625, -0.375))


# --------------------------------------------------------------------------- shaping gradient


@pytest.mark.parametrize("pi", [0.01, 0.05, 0.1, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("advantage", [1.0, -0.7])
def test_shaping_gradient_weight_matches_autograd_and_finite_differences(pi, advantage):
    A = torch.tensor([[advantage]], dtype=torch.float64)
    logp = torch.tensor([[math.log(pi)]], dtype=torch.float64, requires_grad=True)
    loss = off_policy_token_loss(logp, A, None, GAMMA).sum()
    (grad,) = torch.autograd.grad(loss, logp)
    expected = -advantage * shaped_weight(pi)
    assert math.isclose(float(grad), expected, rel_tol=1e-9)
    h = 1e-6
    numeric = (float(off_policy_token_loss(logp.detach() + h, A, None, GAMMA).sum())
               - float(off_policy_token_loss(logp.detach() - h, A, None, GAMMA).sum())) / (2 * h)
    assert math.isclose(numeric, expected, rel_tol=1e-6)
    # The same through the full loss (one token, dapo: denominator 1): no detach on the way.
    config = GRPOLossConfig(loss_type="dapo", off_policy=LUFFY, clip=True)
    loss_value, _, full_grad = loss_and_grad(config, logp.detach(), A[0], torch.ones(1, 1, dtype=torch.float64),
                                             prefix=torch.ones(1, 1, dtype=torch.bool))
    assert math.isclose(float(loss_value), -advantage * pi / (pi + GAMMA), rel_tol=1e-9)
    assert math.isclose(float(full_grad), expected, rel_tol=1e-9)


def test_shaping_weight_table_and_its_maximum_at_gamma():
    table = {0.01: 0.083, 0.10: 0.250, 0.50: 0.139, 0.90: 0.090}
    for pi, weight in table.items():
        logp = torch.tensor(math.log(pi), dtype=torch.float64, requires_grad=True)
        shaping(torch.exp(logp), GAMMA).backward()
        assert round(float(logp.grad), 3) == weight, pi
    grid = torch.linspace(math.log(1e-4), 0.0, 20001, dtype=torch.float64, requires_grad=True)
    shaping(torch.exp(grid), GAMMA).sum().backward()
    best = int(grid.grad.argmax())
    assert math.isclose(math.exp(float(grid[best].detach())), GAMMA, rel_tol=1e-3)
    assert math.isclose(float(grid.grad[best]), 0.25, rel_tol=1e-6)


# --------------------------------------------------------------------------- clipping and old log-probs


def test_no_clipping_on_off_policy_tokens_while_on_policy_tokens_are_clipped():
    theta, old, _, advantages, mask, prefix, behaviour = mixed_batch()
    off_rows = prefix.any(1)
    grads = {}
    for clip, eps in [(True, 0.2), (True, 0.01), (True, 0.9), (False, 0.2)]:
        config = GRPOLossConfig(loss_type="dapo", clip=clip, epsilon_low=eps, epsilon_high=eps, off_policy=LUFFY)
        _, stats, grads[clip, eps] = loss_and_grad(config, theta, advantages, mask, old=old, prefix=prefix, behaviour=behaviour)
        if clip and eps == 0.01:
            assert stats["clip_fraction"] > 0.25
    reference = grads[False, 0.2]
    assert reference[prefix].abs().min() > 0                                         # every trace token gets a gradient
    for key, grad in grads.items():
        assert torch.equal(grad[off_rows], reference[off_rows]), key                  # epsilon never touches them
    # Contrast: on-policy tokens outside [1 - eps, 1 + eps] lose their gradient when clipping is on.
    on = mask.bool() & ~prefix
    ratio = torch.exp(theta - old)
    adv = advantages[:, None].expand_as(theta)
    outside = on & (((ratio > 1.01) & (adv > 0)) | ((ratio < 0.99) & (adv < 0)))
    assert outside.sum() > 3
    assert torch.equal(grads[True, 0.01][outside], torch.zeros(int(outside.sum())))
    assert reference[outside].abs().min() > 0


@pytest.mark.parametrize("clip", [True, False])
def test_old_logps_are_not_used_for_off_policy_tokens(clip):
    theta, old, ref, advantages, mask, prefix, behaviour = mixed_batch()
    config = GRPOLossConfig(loss_type="dr_grpo", clip=clip, beta=0.05, off_policy=LUFFY, max_completion_length=8)
    loss, _, grad = loss_and_grad(config, theta, advantages, mask, old=old, ref=ref, prefix=prefix, behaviour=behaviour)
    perturbed = old.clone()
    perturbed[prefix] += torch.linspace(-3.0, 3.0, int(prefix.sum()))
    loss2, _, grad2 = loss_and_grad(config, theta, advantages, mask, old=perturbed, ref=ref, prefix=prefix, behaviour=behaviour)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    # Contrast: the same perturbation on on-policy tokens does change the loss.
    perturbed = old.clone()
    perturbed[~prefix] += 0.5
    loss3, _, _ = loss_and_grad(config, theta, advantages, mask, old=perturbed, ref=ref, prefix=prefix, behaviour=behaviour)
    assert not torch.isclose(loss, loss3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("clip", [True, False])
def test_without_off_policy_samples_the_loss_is_grpo(loss_type, clip):
    theta, old, ref, advantages, mask, _, _ = mixed_batch()
    common = dict(loss_type=loss_type, clip=clip, beta=0.1, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=8)
    grpo_value, grpo_stats, grpo_grad = loss_and_grad(GRPOLossConfig(**common), theta, advantages, mask, old=old, ref=ref)
    none = torch.zeros_like(mask, dtype=torch.bool)
    nan = torch.full_like(theta, math.nan)
    for weights in [(0.5, 0.5), (1.0, 1.0)]:
        config = GRPOLossConfig(**common, off_policy=OffPolicyLoss.from_weights(GAMMA, *weights))
        value, stats, grad = loss_and_grad(config, theta, advantages, mask, old=old, ref=ref, prefix=none, behaviour=nan)
        assert torch.equal(value, grpo_value) and torch.equal(grad, grpo_grad), weights
        assert stats["off_tokens"] == 0 and stats["off_policy_loss"] == 0
        assert stats["clip_fraction"] == grpo_stats["clip_fraction"]


# --------------------------------------------------------------------------- on_weight / off_weight


def test_on_off_weights_scale_the_two_terms_and_the_logged_parts_add_up():
    assert (LUFFY.on_scale, LUFFY.off_scale) == (1.0, 1.0)
    skewed = OffPolicyLoss.from_weights(GAMMA, 0.25, 0.75)
    assert (skewed.on_scale, skewed.off_scale) == (0.5, 1.5)
    assert OffPolicyLoss.from_weights(GAMMA, 1.0, 3.0) == skewed                      # only the ratio matters
    theta, old, _, advantages, mask, prefix, behaviour = mixed_batch()
    results = {}
    for name, shaping_config in [("even", LUFFY), ("skewed", skewed)]:
        config = GRPOLossConfig(loss_type="dapo", clip=True, beta=0.0, entropy_coef=0.0, off_policy=shaping_config)
        loss, stats, grad = loss_and_grad(config, theta, advantages, mask, old=old, prefix=prefix, behaviour=behaviour)
        assert math.isclose(stats["on_policy_loss"] + stats["off_policy_loss"], float(loss), rel_tol=1e-6, abs_tol=1e-7)
        assert stats["off_policy_loss"] != 0 and stats["on_policy_loss"] != 0
        results[name] = (stats, grad)
    (even_stats, even_grad), (skew_stats, skew_grad) = results["even"], results["skewed"]
    on = ~prefix
    assert torch.allclose(skew_grad[on], 0.5 * even_grad[on], rtol=1e-6, atol=1e-9)
    assert torch.allclose(skew_grad[prefix], 1.5 * even_grad[prefix], rtol=1e-6, atol=1e-9)
    assert math.isclose(skew_stats["on_policy_loss"], 0.5 * even_stats["on_policy_loss"], rel_tol=1e-6)
    assert math.isclose(skew_stats["off_policy_loss"], 1.5 * even_stats["off_policy_loss"], rel_tol=1e-6)
    # The off-policy share of the gradient moves from a to 3a / (3a + (1 - a)).
    share = lambda grad: float(grad[prefix].abs().sum() / grad.abs().sum())       # noqa: E731
    a = share(even_grad)
    assert math.isclose(share(skew_grad), 3 * a / (3 * a + (1 - a)), rel_tol=1e-5)


# --------------------------------------------------------------------------- ExGRPO importance weight


def test_exgrpo_weight_worked_example_equal_logps_and_unknown_behaviour():
    current = torch.tensor([-0.9, -0.9, -0.9, -0.9])
    recorded = torch.tensor([-1.2, -0.9, math.nan, -0.4])
    w = off_policy_weight(current, recorded)
    assert math.isclose(float(w[0]), 1.35, abs_tol=5e-3) and math.isclose(float(w[0]), math.exp(0.3), rel_tol=1e-6)
    f = shaping(w, GAMMA)
    assert math.isclose(float(f[0]), 0.931, abs_tol=5e-4)
    assert math.isclose(float(f[1]), 1 / 1.1, rel_tol=1e-6) and round(float(f[1]), 3) == 0.909
    assert math.isclose(float(w[2]), math.exp(-0.9), rel_tol=1e-6)                 # NaN: behaviour prob 1 (LUFFY)
    assert torch.equal(off_policy_weight(current, None), torch.exp(current))
    # Through the loss, the gradient is d f(w) / d log pi = w * gamma / (w + gamma)^2 per token.
    config = GRPOLossConfig(loss_type="dapo", off_policy=LUFFY)
    mask = torch.ones(1, 4)
    value, _, grad = loss_and_grad(config, current[None], torch.tensor([1.0]), mask, prefix=mask.bool(), behaviour=recorded[None])
    weights = [math.exp(0.3), 1.0, math.exp(-0.9), math.exp(-0.5)]
    assert math.isclose(float(value), -sum(x / (x + GAMMA) for x in weights) / 4, rel_tol=1e-6)
    assert torch.allclose(grad[0], torch.tensor([-shaped_weight(x) / 4 for x in weights]), rtol=1e-5)


# --------------------------------------------------------------------------- entropy bonus


def test_entropy_bonus_adds_minus_c_times_the_entropy_gradient():
    theta, old, _, advantages, mask, prefix, behaviour = mixed_batch()
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(theta.shape, generator=g) + 0.5

    def run(coef):
        param = theta.clone().requires_grad_(True)
        entropy = (param * scale).exp() * 2.0 + param**2                          # any differentiable function of the params
        config = GRPOLossConfig(loss_type="dapo", entropy_coef=coef, off_policy=LUFFY)
        loss, stats = grpo_loss(param, advantages, mask, config, old_logps=old, prefix_mask=prefix, behaviour_logps=behaviour,
                                entropy=entropy)
        loss.backward()
        return loss.detach(), stats, param.grad

    c = 0.3
    loss0, _, grad0 = run(0.0)
    loss_c, stats, grad_c = run(c)
    param = theta.clone().requires_grad_(True)
    mean_entropy = (((param * scale).exp() * 2.0 + param**2) * mask).sum() / mask.sum()
    mean_entropy.backward()
    assert math.isclose(float(loss_c - loss0), -c * float(mean_entropy.detach()), rel_tol=1e-5)
    assert torch.allclose(grad_c - grad0, -c * param.grad, atol=1e-7)
    assert param.grad.abs().sum() > 0
    assert math.isclose(stats["entropy"], float(mean_entropy.detach()), rel_tol=1e-6)
    with pytest.raises(ValueError, match="entropies"):
        grpo_loss(theta, advantages, mask, GRPOLossConfig(entropy_coef=c, off_policy=LUFFY), prefix_mask=prefix)


# --------------------------------------------------------------------------- micro-batches and batch size


def run_mixed_pass(loss_type, micro, theta, old, ref, advantages, mask, prefix, behaviour, config=None):
    param = theta.clone().requires_grad_(True)
    config = config or GRPOLossConfig(loss_type=loss_type, beta=0.1, clip=True, epsilon_low=0.2, epsilon_high=0.28,
                                      max_completion_length=8, entropy_coef=0.01, off_policy=OffPolicyLoss.from_weights(GAMMA, 0.3, 0.7))

    def logps_fn(rows):
        logps = param[rows] * 1.0
        return logps, (logps.exp() * -logps)                                       # a differentiable "entropy"

    loss, stats = loss_pass(logps_fn, advantages, mask, config, StepTotals.of(mask), micro, old_logps=old, ref_logps=ref,
                            prefix_mask=prefix, behaviour_logps=behaviour)
    return loss, stats, param.grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batching_leaves_the_mixed_loss_gradient_and_statistics_unchanged(loss_type):
    batch = mixed_batch()
    loss, stats, grad = run_mixed_pass(loss_type, None, *batch)
    assert stats["off_tokens"] > 0 and stats["on_tokens"] > 0
    # The clip fraction and mean ratio are over on-policy tokens: trace tokens have no ratio.
    theta, old, _, advantages, mask, prefix, _ = batch
    on = mask.bool() & ~prefix
    ratio, adv = torch.exp(theta - old)[on], advantages[:, None].expand_as(theta)[on]
    clipped = ((ratio < 0.8) & (adv < 0)) | ((ratio > 1.28) & (adv > 0))
    assert 0 < stats["clip_fraction"] < 1
    assert math.isclose(stats["clip_fraction"], float(clipped.float().mean()), rel_tol=1e-6)
    assert math.isclose(stats["ratio_mean"], float(ratio.mean()), rel_tol=1e-6)
    for micro in (1, 2, 3, 5):
        split_loss, split_stats, split_grad = run_mixed_pass(loss_type, micro, *batch)
        assert math.isclose(split_loss, loss, rel_tol=1e-5, abs_tol=1e-7), micro
        assert torch.allclose(split_grad, grad, atol=1e-7, rtol=1e-5), micro
        for key in ("on_policy_loss", "off_policy_loss", "off_policy_prob", "clip_fraction", "kl", "entropy", "off_tokens"):
            assert math.isclose(split_stats[key], stats[key], rel_tol=1e-5, abs_tol=1e-7), (micro, key)


def test_dr_grpo_token_weight_does_not_depend_on_the_batch_size():
    """Dr. GRPO divides by N * L_max: a token's gradient weight is -A * f'(.) / (N * L_max)
    whatever the batch holds, so the loss and the gradient of a shared weight keep their scale
    when the batch grows. (LUFFY's released code divides by the padded length only: there,
    duplicating the batch doubles both.)"""
    theta, old, ref, advantages, mask, prefix, behaviour = mixed_batch()
    config = GRPOLossConfig(loss_type="dr_grpo", clip=False, max_completion_length=8, off_policy=LUFFY)
    _, _, grad = loss_and_grad(config, theta, advantages, mask, prefix=prefix, behaviour=behaviour)
    loss = grpo_loss(theta, advantages, mask, config, prefix_mask=prefix, behaviour_logps=behaviour)[0]
    # The batch twice over: every token appears twice and the shared parameter's gradient
    # (the sum over both copies) and the loss stay what they were.
    shared = theta.clone().requires_grad_(True)
    double = [torch.cat([x, x]) for x in (advantages, mask, prefix, behaviour)]
    loss2, _ = grpo_loss(torch.cat([shared, shared]), double[0], double[1], config, prefix_mask=double[2], behaviour_logps=double[3])
    loss2.backward()
    assert torch.allclose(shared.grad, grad, rtol=1e-6, atol=1e-9)
    assert math.isclose(float(loss2.detach()), float(loss), rel_tol=1e-6)
    # And the absolute weight of one trace token (behaviour unknown: w = pi) is the formula's.
    row, col = (prefix & torch.isnan(behaviour)).nonzero()[0].tolist()
    pi = math.exp(float(theta[row, col]))
    expected = -float(advantages[row]) * shaped_weight(pi) / (theta.shape[0] * 8)
    assert math.isclose(float(grad[row, col]), expected, rel_tol=1e-5)
    # On-policy tokens (ratio 1): -A / (N * L_max), independent of their row's own length.
    on = mask.bool() & ~prefix
    expected_on = (-advantages[:, None] / (theta.shape[0] * 8)).expand_as(theta)
    assert torch.allclose(grad[on], expected_on[on], rtol=1e-5)
