"""GRPO / Dr. GRPO / DAPO testable properties (ALGORITHMS.md section 7), on hand-sized tensors."""

import math

import pytest
import torch

from brainforge.rl.advantages import group_advantages, zero_std_fraction
from brainforge.rl.losses import GRPOLossConfig, aggregate, grpo_loss, k3_kl, soft_overlong_penalty


def test_sample_std_advantages_worked_example():
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1]), group_size=4, scale="group")
    assert torch.allclose(adv, torch.tensor([1, -1, -1, 1]) * 0.866, atol=1e-3)
    none = group_advantages(torch.tensor([1.0, 0, 0, 1]), group_size=4, scale="none")
    assert torch.allclose(none, torch.tensor([0.5, -0.5, -0.5, 0.5]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_sum_to_zero_per_group(scale):
    rewards = torch.tensor([0.3, 0.9, 0.1, 0.5, 1.0, 1.0, 0.0, 0.2])
    adv = group_advantages(rewards, group_size=4, scale=scale).view(2, 4)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(2), atol=1e-6)


def test_identical_rewards_give_zero_advantage_and_zero_gradient():
    adv = group_advantages(torch.ones(4), group_size=4)
    assert torch.equal(adv, torch.zeros(4))
    assert zero_std_fraction(torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 1]), 4) == 0.5
    logps = torch.randn(4, 5, requires_grad=True)
    loss, _ = grpo_loss(logps, adv, torch.ones(4, 5), GRPOLossConfig(beta=0.0))
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros(4, 5))


def test_nan_reward_gets_zero_advantage():
    adv = group_advantages(torch.tensor([1.0, float("nan"), 0.0, 1.0]), group_size=4, scale="none")
    assert adv[1] == 0 and not torch.isnan(adv).any()


def test_bad_group_sizes():
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.ones(4), group_size=1)
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(torch.ones(5), group_size=2)


def two_completions():
    """Lengths 2 and 4, advantages +1 and -1, r = 1 (on-policy)."""
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    return torch.zeros(2, 4, requires_grad=True), torch.tensor([1.0, -1.0]), mask


@pytest.mark.parametrize("loss_type, value", [("grpo", 0.0), ("dapo", 1 / 3), ("bnpo", 1 / 3), ("dr_grpo", 0.125)])
def test_aggregation_worked_example(loss_type, value):
    logps, adv, mask = two_completions()
    loss, stats = grpo_loss(logps, adv, mask, GRPOLossConfig(loss_type=loss_type, max_completion_length=8))
    assert math.isclose(float(loss), value, abs_tol=1e-6)
    assert stats["clip_fraction"] == 0.0  # r = 1: clipping is inactive


def test_grpo_loss_is_zero_but_gradient_is_not():
    logps, adv, mask = two_completions()
    loss, _ = grpo_loss(logps, adv, mask, GRPOLossConfig(loss_type="grpo"))
    loss.backward()
    assert float(loss) == 0.0 and logps.grad.abs().sum() > 0
    # Gradient is -A * d log pi / normaliser: 1/(2*2) for the short one, 1/(2*4) for the long.
    assert torch.allclose(logps.grad[0, :2], torch.full((2,), -0.25))
    assert torch.allclose(logps.grad[1], torch.full((4,), 0.125))


def test_dr_grpo_token_weight_does_not_depend_on_length():
    logps, adv, mask = two_completions()
    loss, _ = grpo_loss(logps, adv, mask, GRPOLossConfig(loss_type="dr_grpo", max_completion_length=8))
    loss.backward()
    assert torch.allclose(logps.grad[0, :2].abs(), torch.full((2,), 1 / 16))
    assert torch.allclose(logps.grad[1].abs(), torch.full((4,), 1 / 16))


def test_dapo_uses_global_token_count():
    logps, adv, mask = two_completions()
    loss, _ = grpo_loss(logps, adv, mask, GRPOLossConfig(loss_type="dapo"), active_tokens_global=12.0)
    assert math.isclose(float(loss), 2 / 12, abs_tol=1e-6)


def test_k3_kl_properties():
    a, b = torch.randn(1000), torch.randn(1000)
    assert (k3_kl(a, b) >= 0).all()
    x = torch.randn(10, requires_grad=True)
    kl = k3_kl(x, x.detach().clone())
    kl.sum().backward()
    assert torch.equal(kl.detach(), torch.zeros(10)) and torch.allclose(x.grad, torch.zeros(10))


def test_kl_enters_loss_with_beta():
    logps = torch.zeros(1, 3, requires_grad=True)
    ref = torch.full((1, 3), -1.0)
    loss, stats = grpo_loss(logps, torch.zeros(1), torch.ones(1, 3), GRPOLossConfig(beta=0.5, loss_type="bnpo"), ref_logps=ref)
    expected_kl = math.exp(-1) + 1 - 1
    assert math.isclose(stats["kl"], expected_kl, rel_tol=1e-5)
    assert math.isclose(float(loss), 0.5 * expected_kl, rel_tol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logps, torch.zeros(1), torch.ones(1, 3), GRPOLossConfig(beta=0.5))


def ratio_gradient(ratio: float, advantage: float) -> float:
    old = torch.zeros(1, 1)
    logps = torch.full((1, 1), math.log(ratio), requires_grad=True)
    config = GRPOLossConfig(epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo")
    loss, _ = grpo_loss(logps, torch.tensor([advantage]), torch.ones(1, 1), config, old_logps=old)
    loss.backward()
    return float(logps.grad)


def test_clip_higher_is_asymmetric():
    assert ratio_gradient(1.25, +1) != 0      # inside 1 + 0.28
    assert ratio_gradient(1.30, +1) == 0      # beyond 1 + eps_high: no push further up
    assert ratio_gradient(0.75, -1) == 0      # below 1 - eps_low: no push further down
    assert ratio_gradient(0.85, -1) != 0
    assert ratio_gradient(1.30, -1) != 0      # a bad token that grew is still pushed down
    assert ratio_gradient(0.70, +1) != 0      # a good token that shrank is still pushed up


def test_masked_truncated_completion_contributes_nothing():
    logps = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1], [0, 0, 0]])  # second completion truncated and masked
    loss, _ = grpo_loss(logps, torch.tensor([1.0, -1.0]), mask, GRPOLossConfig(loss_type="bnpo"))
    loss.backward()
    assert torch.equal(logps.grad[1], torch.zeros(3))


def test_soft_overlong_penalty():
    values = soft_overlong_penalty(torch.tensor([10, 96, 112, 128, 140]), max_length=128, cache=32)
    assert torch.allclose(values, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), GRPOLossConfig(loss_type="nope"))  # type: ignore[arg-type]
