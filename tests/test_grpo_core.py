"""The GRPO core's review findings (issue 8, section 5), one regression test per finding:
decoding leaves the frozen base bit-identical, None rewards are excluded, logged statistics
and gradients do not depend on micro-batching or on how DDP splits the batch, dropout
modes per pass, top_p log-probs, and what a GRPO "step" is."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from brainforge.rl.advantages import group_advantages, zero_std_fraction
from brainforge.rl.losses import GRPOLossConfig, StepTotals, grpo_loss, loss_pass

TESTS = Path(__file__).resolve().parent
LOSS_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo"]


def lora_policy(tiny_model_dir, dtype, dropout=0.0):
    from transformers import AutoModelForCausalLM

    from brainforge.config import LoraSettings
    from brainforge.models.loader import attach_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    policy = attach_lora(base, LoraSettings(r=4, lora_alpha=8, lora_dropout=dropout))
    torch.manual_seed(1)
    for name, param in policy.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter, so merging changes the weights
            torch.nn.init.normal_(param, std=0.3)
    return policy


def base_weights(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}


# --------------------------------------------------------------------------- 1. decoding leaves the base intact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decoding_leaves_frozen_base_bit_identical(tiny_model_dir, tokenizer, dtype):
    from brainforge.generation.engine import GenerationEngine, SamplingParams

    policy = lora_policy(tiny_model_dir, dtype)
    before = base_weights(policy)
    objects = {n: p for n, p in policy.named_parameters() if "lora_" not in n}
    engine = GenerationEngine(policy, tokenizer)
    params = SamplingParams(max_new_tokens=2, temperature=1.0)
    with policy.disable_adapter():
        reference = policy(torch.tensor([[5, 6, 7, 8, 9]])).logits.float()
    for i in range(40):  # merge / decode / unmerge cycles
        engine.generate([[5, 6, 7]], 2, params, torch.Generator().manual_seed(i))
    after = {n: p for n, p in policy.named_parameters() if "lora_" not in n}
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"{len(changed)} base tensors changed, e.g. {changed[:3]}"
    assert all(after[n] is objects[n] for n in objects)  # the original tensors are back in place
    assert not any(getattr(m, "merged", False) for m in policy.modules())
    with policy.disable_adapter():
        assert torch.equal(policy(torch.tensor([[5, 6, 7, 8, 9]])).logits.float(), reference)


def test_decoding_uses_the_adapter(tiny_model_dir, tokenizer):
    """The merged copies are what decodes: greedy log-probs equal the unmerged adapter's."""
    from brainforge.generation.engine import GenerationEngine, SamplingParams

    policy = lora_policy(tiny_model_dir, torch.float32).eval()
    engine = GenerationEngine(policy, tokenizer, stop_token_ids=[])
    rollout = engine.generate([[5, 6, 7]], 1, SamplingParams(max_new_tokens=4, temperature=0, return_logprobs=True))
    ids = torch.tensor([[5, 6, 7] + rollout.completion_ids[0].tolist()])
    with torch.no_grad():
        logits = policy(ids).logits[0, 2:-1]
        with policy.disable_adapter():
            base_logits = policy(ids).logits[0, 2:-1]
    expected = torch.log_softmax(logits, -1).gather(1, rollout.completion_ids[0][:, None]).squeeze(1)
    assert torch.allclose(rollout.logprobs[0], expected, atol=1e-4)
    assert not torch.allclose(logits, base_logits, atol=1e-2)  # the adapter does change the output


# --------------------------------------------------------------------------- 2. None rewards


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_none_reward_is_excluded_from_group_statistics(scale):
    nan = math.nan
    assert torch.equal(group_advantages(torch.tensor([0.5, 0.5, 0.5, nan]), 4, scale), torch.zeros(4))
    assert torch.equal(group_advantages(torch.full((4,), nan), 4, scale), torch.zeros(4))  # all None: nothing
    adv = group_advantages(torch.tensor([1.0, 0.0, nan, 1.0, 0.2, nan, nan, nan]), 4, scale)
    scored = torch.tensor([1.0, 0.0, 1.0])
    centred = scored - scored.mean()
    divisor = {"group": scored.std() + 1e-4, "batch": torch.tensor([1.0, 0.0, 1.0, 0.2]).std() + 1e-4, "none": 1.0}[scale]
    assert torch.allclose(adv[[0, 1, 3]], centred / divisor, atol=1e-5)
    assert torch.equal(adv[[2, 4, 5, 6, 7]], torch.zeros(5))  # None, and a group with one scored member


def test_none_reward_is_ignored_by_logged_statistics():
    from types import SimpleNamespace

    from brainforge.generation.engine import Rollout
    from brainforge.training.grpo import GRPOModule

    nan = math.nan
    assert zero_std_fraction(torch.tensor([0.5, 0.5, 0.5, nan, 1.0, 0.0, nan, nan]), 4) == 0.5
    rewards = torch.tensor([0.5, 0.5, 0.5, nan, 1.0, 0.0, 1.0, nan])
    advantages = group_advantages(rewards, 4)
    rollout = Rollout(prompt_ids=[[1]] * 8, completion_ids=torch.ones(8, 2, dtype=torch.long), completion_mask=torch.ones(8, 2),
                      truncated=torch.zeros(8, dtype=torch.bool), texts=["a b"] * 8, stats={"completion_tokens": 16.0})
    state = SimpleNamespace(settings=SimpleNamespace(num_generations=4))
    metrics = GRPOModule.step_metrics(state, rollout, rewards, {"r": rewards}, advantages, torch.ones(8, 2), {"generation": 1.0})
    assert math.isclose(metrics["reward/mean"], 3.5 / 6, rel_tol=1e-6)  # None counted as 0 would give 3.5 / 8
    assert math.isclose(metrics["reward/r/mean"], 3.5 / 6, rel_tol=1e-6)
    assert metrics["frac_reward_zero_std"] == 0.5 and metrics["reward/none_frac"] == 0.25
    assert math.isclose(metrics["advantage/abs_mean"], float(advantages[[4, 5, 6]].abs().sum()) / 6, rel_tol=1e-6)


# --------------------------------------------------------------------------- 3. micro-batching


def fixed_batch(rows=8, width=6, seed=0):
    """A step batch: uneven lengths, ratios away from 1 (some clipped), a reference."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    theta = torch.randn(rows, width, generator=g) * 0.3 - 1.0
    old = theta + torch.randn(rows, width, generator=g) * 0.3
    ref = theta + torch.randn(rows, width, generator=g) * 0.3
    advantages = torch.randn(rows, generator=g)
    return theta, old, ref, advantages, mask


def run_pass(loss_type, micro, theta, old, ref, advantages, mask, totals=None):
    param = theta.clone().requires_grad_(True)
    config = GRPOLossConfig(loss_type=loss_type, beta=0.1, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=8)
    loss, stats = loss_pass(lambda rows: param[rows] * 1.0, advantages, mask, config, totals or StepTotals.of(mask), micro,
                            old_logps=old, ref_logps=ref)
    return loss, stats, param.grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batching_changes_neither_gradient_nor_logged_statistics(loss_type):
    batch = fixed_batch()
    loss, stats, grad = run_pass(loss_type, None, *batch)
    # The unsplit step is the plain formula on the whole batch.
    config = GRPOLossConfig(loss_type=loss_type, beta=0.1, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=8)
    whole_loss, whole_stats = grpo_loss(batch[0].clone().requires_grad_(True), batch[3], batch[4], config, old_logps=batch[1], ref_logps=batch[2])
    assert math.isclose(loss, float(whole_loss.detach()), rel_tol=1e-6)
    assert 0 < stats["clip_fraction"] < 1 and stats["kl"] > 0
    for key in ("clip_fraction", "kl", "ratio_mean"):
        assert math.isclose(stats[key], whole_stats[key], rel_tol=1e-6)
    for micro in (1, 2, 4):
        split_loss, split_stats, split_grad = run_pass(loss_type, micro, *batch)
        assert math.isclose(split_loss, loss, rel_tol=1e-5), micro
        assert torch.allclose(split_grad, grad, atol=1e-7, rtol=1e-5), micro
        for key in ("clip_fraction", "kl", "ratio_mean"):
            assert math.isclose(split_stats[key], stats[key], rel_tol=1e-5), (micro, key)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_completions_without_reward_contribute_nothing(loss_type):
    """Rows masked for a None reward: zero gradient, and the other rows' gradient is the
    one they get in a batch without them (no token or row count of theirs in a denominator)."""
    theta, old, ref, advantages, mask = fixed_batch(rows=8)
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.7] + [math.nan] * 4)  # second group: every reward None
    advantages = group_advantages(rewards, 4)
    scored = ~torch.isnan(rewards)
    masked = mask * scored.float()[:, None]
    _, _, grad = run_pass(loss_type, 2, theta, old, ref, advantages, masked, StepTotals.of(masked, rows=int(scored.sum())))
    assert torch.equal(grad[4:], torch.zeros_like(grad[4:]))
    _, _, alone = run_pass(loss_type, 2, theta[:4], old[:4], ref[:4], advantages[:4], mask[:4])
    assert torch.allclose(grad[:4], alone, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- 5. DDP: global denominators

DDP_WORKER = r'''
import sys
import torch
import torch.distributed as dist
from brainforge.rl.losses import GRPOLossConfig, StepTotals, loss_pass

rank, init, data_path, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
data = torch.load(data_path)
half = slice(rank * 4, rank * 4 + 4)
local = {k: v[half] for k, v in data.items()}


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((local["x"].shape[1],), 0.1))

    def forward(self, x, base):
        return base + x * self.w


results = {}
for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
    model = torch.nn.parallel.DistributedDataParallel(Toy())
    config = GRPOLossConfig(loss_type=loss_type, beta=0.1, max_completion_length=8)
    totals = StepTotals.of(local["mask"], rows=int(local["scored"].sum()))
    loss_pass(lambda rows: model(local["x"][rows], local["base"][rows]), local["adv"], local["mask"], config, totals, 2,
              old_logps=local["old"], ref_logps=local["ref"])
    results[loss_type] = model.module.w.grad.clone()
torch.save(results, out_path)
dist.destroy_process_group()
'''


def toy_grad(loss_type, data, rows):
    w = torch.full((data["x"].shape[1],), 0.1, requires_grad=True)
    local = {k: v[rows] for k, v in data.items()}
    config = GRPOLossConfig(loss_type=loss_type, beta=0.1, max_completion_length=8)
    totals = StepTotals.of(local["mask"], rows=int(local["scored"].sum()))
    loss_pass(lambda r: local["base"][r] + local["x"][r] * w, local["adv"], local["mask"], config, totals, 2,
              old_logps=local["old"], ref_logps=local["ref"])
    return w.grad


@pytest.mark.slow  # two interpreters importing torch: ~30 s on a busy 2-core machine
def test_ddp_denominators_are_global(tmp_path):
    """Two gloo processes, each with half of the batch (different token counts, a group
    without rewards on one of them), against one process on the union batch."""
    theta, old, ref, _, mask = fixed_batch(rows=8, seed=3)
    mask[:4] = mask[:4] * 0 + (torch.arange(6) < 5).float()  # rank 0: long completions, rank 1: mixed
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.7, 0.3, 0.8, math.nan, math.nan])
    scored = ~torch.isnan(rewards)
    data = {"x": torch.randn(8, 6, generator=torch.Generator().manual_seed(4)), "base": theta, "old": old, "ref": ref,
            "adv": group_advantages(rewards, 2), "mask": mask * scored.float()[:, None], "scored": scored}
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(rank), init, str(tmp_path / "data.pt"),
                                 str(tmp_path / f"grad{rank}.pt")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
               for rank in range(2)]
    try:
        errors = [w.communicate(timeout=240)[1] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert all(w.returncode == 0 for w in workers), b"\n".join(errors).decode()[-3000:]
    got = [torch.load(tmp_path / f"grad{rank}.pt") for rank in range(2)]
    for loss_type in LOSS_TYPES:
        assert torch.allclose(got[0][loss_type], got[1][loss_type])  # DDP synchronised them
        if loss_type == "bnpo":  # normalised per process, by design: the mean of each half's own bnpo
            expected = (toy_grad("bnpo", data, slice(0, 4)) + toy_grad("bnpo", data, slice(4, 8))) / 2
        else:
            expected = toy_grad(loss_type, data, slice(0, 8))
        assert torch.allclose(got[0][loss_type], expected, atol=1e-7, rtol=1e-5), loss_type


# --------------------------------------------------------------------------- runs: logged stats, steps, dropout modes


def none_for_long(prompts, completions, **kwargs):
    """A reward with no verdict on some completions (graded elsewhere, so groups differ)."""
    return [None if len(c) % 3 == 0 else min(len(c), 60) / 60 for c in completions]


def train_grpo(tmp_path, tiny_model_dir, monkeypatch, training=None, lora=None, **grpo):
    """A GRPO run in this process on the tiny model; returns the run folder and the
    metrics recorded at each step, as (global_step, metrics)."""
    from brainforge.config import load_config
    from brainforge.training import run
    from brainforge.training.grpo import GRPOModule

    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(8)))
    config = {
        # fp32 whatever `dtype: auto` picks on this CPU (bf16 where AMX is): exact-equality checks
        # (the first update's ratio is exactly 1) hold in fp32 only
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
        "peft": {"lora": {"r": 4, "lora_alpha": 8, **(lora or {})}},
        "data": {"source": {"path": str(prompts), "type": "prompt"}},
        "algorithm": {"name": "grpo", "grpo": {
            "num_generations": 4, "prompts_per_step": 2, "max_new_tokens": 6, "temperature": 1.0, "beta": 0.04,
            "reward_functions": [{"name": "test_grpo_core.none_for_long"}], "reward_errors": "none", **grpo}},
        "training": {"output_dir": str(tmp_path / "outputs"), "max_steps": 1, "learning_rate": 5e-2, "save_every_n_steps": 100,
                     "test_prompts": ["Hi"], "sample_max_new_tokens": 2, "lr_scheduler": "constant", "num_threads": 1,
                     **(training or {})},
        "logging": {"level": "WARNING"},
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    recorded: list[tuple[int, dict[str, float]]] = []
    original = GRPOModule.record

    def record(self, metrics, *args):
        recorded.append((self.global_step, dict(metrics)))
        return original(self, metrics, *args)

    monkeypatch.setattr(GRPOModule, "record", record)
    monkeypatch.syspath_prepend(str(TESTS))
    return run.train(load_config(path), path), recorded


@pytest.mark.slow  # two tiny GRPO runs: ~30 s on a busy 2-core machine
def test_logged_statistics_do_not_depend_on_micro_batch_size(tmp_path, tiny_model_dir, monkeypatch):
    """dapo with micro_batch_size 2 (4 micro-batches) logs the kl and clip fraction of the
    unsplit step, not 4x them. Two updates on one rollout batch, so both are non-zero."""
    from brainforge.rl import losses
    from brainforge.training.grpo import GRPOModule

    rewards, masks = [], []
    score, loss = GRPOModule.score, losses.grpo_loss
    monkeypatch.setattr(GRPOModule, "score", lambda self, *a: rewards.append(score(self, *a)) or rewards[-1])
    monkeypatch.setattr(losses, "grpo_loss", lambda logps, adv, mask, *a, **k: masks.append(mask) or loss(logps, adv, mask, *a, **k))
    runs = {}
    for micro in (None, 2):
        _, recorded = train_grpo(tmp_path / f"micro{micro}", tiny_model_dir, monkeypatch, micro_batch_size=micro,
                                 loss_type="dapo", num_iterations=2, epsilon=0.01)
        runs[micro] = recorded[0][1]
    assert runs[None]["kl"] > 0 and runs[None]["clip_fraction"] > 0
    # Completions whose reward is None take no part in the loss (the unsplit run: one call per update).
    none = torch.isnan(rewards[0][0])
    assert 0 < int(none.sum()) < 8 and masks[0].shape[0] == 8
    assert masks[0][none].sum() == 0 and masks[0][~none].sum() > 0
    for key in ("kl", "clip_fraction", "loss", "entropy", "reward/mean"):
        assert math.isclose(runs[2][key], runs[None][key], rel_tol=1e-4, abs_tol=1e-7), (key, runs[2][key], runs[None][key])


@pytest.mark.slow  # a 3-step tiny GRPO run: ~20 s on a busy 2-core machine
def test_a_step_is_one_rollout_batch_and_old_logps_are_micro_batched(tmp_path, tiny_model_dir, monkeypatch):
    """num_iterations: 2 makes two optimizer updates per rollout batch, but global_step,
    checkpoints, max_steps and the LR schedule count rollout batches; the old-log-prob pass
    runs in micro_batch_size pieces, and (top_p < 1 included) its log-probs equal the
    first update's exactly: ratio 1, nothing clipped."""
    from brainforge.rl import losses
    from brainforge.training.grpo import GRPOModule

    no_grad_rows, first_update = [], []
    logps = GRPOModule.completion_logps

    def spy_logps(self, rollout, rows=None, grad=True, **options):
        if not grad:
            no_grad_rows.append(len(range(rollout.completion_ids.shape[0])[rows or slice(None)]))
        return logps(self, rollout, rows, grad, **options)

    loss = losses.grpo_loss

    def spy_loss(*args, **kwargs):
        value, stats = loss(*args, **kwargs)
        if kwargs.get("old_logps") is not None and len(first_update) < len(no_grad_rows) // 4:  # old + reference passes: 4 + 4 calls
            first_update.append(stats)
        return value, stats

    monkeypatch.setattr(GRPOModule, "completion_logps", spy_logps)
    monkeypatch.setattr(losses, "grpo_loss", spy_loss)
    run_dir, recorded = train_grpo(tmp_path, tiny_model_dir, monkeypatch, training={"max_steps": 3, "save_every_n_steps": 2},
                                   num_iterations=2, micro_batch_size=2, top_p=0.5)
    assert [step for step, _ in recorded] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 3
    state = torch.load(run_dir / "checkpoints" / "step-000003" / "trainer_state.ckpt", weights_only=False)
    assert {int(s["step"]) for s in state["optimizer_states"][0]["state"].values()} == {6}  # 3 batches x 2 updates
    assert state["lr_schedulers"][0]["last_epoch"] == 3
    assert no_grad_rows and max(no_grad_rows) == 2  # old log-probs and reference, 2 completions at a time
    assert first_update and all(s["ratio_mean"] == 1.0 and s["clip_fraction"] == 0.0 for s in first_update)


def test_reference_adapter_keeps_policy_dropout_live_and_its_own_off(tmp_path, tiny_model_dir, monkeypatch):
    """PEFT's load_adapter calls eval() on the whole model: the policy's LoRA dropout must
    still be active in the loss pass, and the reference adapter's off in its pass."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from brainforge.training.grpo import GRPOModule

    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.5))
    reference.save_pretrained(tmp_path / "ref")
    seen: dict[str, set[tuple[bool, bool]]] = {"default": set(), "reference": set()}
    in_step = []
    step = GRPOModule.training_step

    def record(module, inputs, output, name):
        if in_step:  # (not the sample answers written after training)
            seen[name].add((module.training, torch.is_grad_enabled()))

    def hooked_step(self, *args):
        if not any(seen.values()):
            for module in self.model.modules():
                for name, dropout in getattr(module, "lora_dropout", {}).items():
                    dropout.register_forward_hook(lambda m, i, o, name=name: record(m, i, o, name))
        else:  # step 2: even after a blanket model.train(), the reference pass runs without dropout
            self.model.train()
        in_step.append(True)
        try:
            return step(self, *args)
        finally:
            in_step.clear()

    monkeypatch.setattr(GRPOModule, "training_step", hooked_step)
    train_grpo(tmp_path, tiny_model_dir, monkeypatch, training={"max_steps": 2}, lora={"lora_dropout": 0.5},
               reference_adapter=str(tmp_path / "ref"))
    assert seen["default"] == {(True, True)}     # policy: only the loss pass runs its adapter, dropout live
    assert seen["reference"] == {(False, False)}  # reference: no-grad pass, dropout off


@pytest.mark.parametrize("key, value, fix", [("gradient_accumulation_steps", 4, "algorithm.grpo.prompts_per_step"),
                                             ("per_device_batch_size", 2, "algorithm.grpo.micro_batch_size")])
def test_grpo_rejects_sft_batch_options(tmp_path, key, value, fix):
    """GRPO sizes its batches with prompts_per_step and micro_batch_size: the SFT options
    would be silently ignored, so validation refuses them and names the GRPO option."""
    from brainforge.config import load_config
    from brainforge.errors import ConfigError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1 + 1?", "answer": "2"}) + "\n")
    config = {"model": {"name_or_path": "x"}, "data": {"source": {"path": str(prompts), "type": "prompt"}},
              "algorithm": {"name": "grpo"}, "training": {"max_steps": 1}}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    load_config(path)  # the defaults are fine
    config["training"][key] = value
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"training\.{key}: not used by algorithm grpo.*{fix}"):
        load_config(path)
    config["algorithm"]["name"] = "sft"
    config["data"]["source"] = {"name": "sample:chat"}
    path.write_text(yaml.safe_dump(config))
    assert getattr(load_config(path).training, key) == value  # SFT uses them


def test_top_p_log_probs_are_the_full_softmax_in_sampler_and_trainer(tiny_model_dir, tokenizer):
    """top_p < 1: sampling uses the nucleus, every log-prob the full softmax at the
    temperature (documented at GRPOSettings.top_p), so the sampler's recorded log-probs
    equal the trainer's at the same weights (the nucleus-renormalised ones would be
    larger by -log(nucleus mass), here about 1 nat)."""
    import dataclasses

    from brainforge.config import GRPOSettings, TrainingConfig
    from brainforge.data.templates import chat_format
    from brainforge.training.grpo import GRPOModule

    policy = lora_policy(tiny_model_dir, torch.float32)
    settings = GRPOSettings(num_generations=4, prompts_per_step=1, max_new_tokens=5, temperature=0.9, top_p=0.3, micro_batch_size=2,
                            reward_functions=[{"name": "last_number"}])
    module = GRPOModule(policy, tokenizer, chat_format("chatml", tokenizer).template, settings, TrainingConfig(max_steps=1), 1)
    params = dataclasses.replace(module.sampling, return_logprobs=True)
    rollout = module.engine.generate([[5, 6, 7]], 4, params, torch.Generator().manual_seed(0))
    mask = rollout.completion_mask.bool()
    assert torch.allclose(rollout.logprobs[mask], module.frozen_logps(rollout)[mask], atol=1e-4)
