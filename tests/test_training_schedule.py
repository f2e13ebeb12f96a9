"""SFT training through the real data module and a Lightning Trainer (issue 8, section 7):
gradient accumulation normalises by the labelled tokens of the whole step, the learning-rate
schedule takes the documented values at given steps, and packing works end to end.

`test_loss.py` checks the loss helpers on hand-built batches; these tests check that the
training step and the data module actually use them that way.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from brainforge.config import TrainingConfig, load_config
from brainforge.training.sft import lr_lambda, warmup_steps

from conftest import write_config

LR = 1e-3


class Recorder(L.Callback):
    """Records, per optimizer step: the batch, the raw gradients, the learning rate in force,
    and at the first step the gradient of the token-mean loss over the whole step computed
    independently of the training step."""

    def __init__(self) -> None:
        self.batches: list = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []
        self.expected_grads: dict[str, torch.Tensor] = {}
        self.expected_loss: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from brainforge.training.losses import sum_token_nll

        self.batches.append(batch)
        if batch_idx:
            return
        params = {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}
        with torch.enable_grad():
            total = torch.zeros(())
            tokens = 0
            for micro_batch in batch:
                nll, count = sum_token_nll(pl_module.model, micro_batch)
                total, tokens = total + nll, tokens + int(count)
            loss = total / tokens
            grads = torch.autograd.grad(loss, list(params.values()))
        self.expected_grads = {n: g.detach().clone() for n, g in zip(params, grads)}
        self.expected_loss = float(loss.detach())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad and p.grad is not None})
        self.lrs.append(optimizer.param_groups[0]["lr"])


def fit_sft(tmp_path, tiny_model_dir, *, data=None, **training):
    from brainforge.data.module import SFTDataModule, prepare_sft_data
    from brainforge.training.run import load_policy, planned_steps
    from brainforge.training.sft import LLMTrainingAgent

    path = write_config(tmp_path / "sft.yaml", tiny_model_dir,
                        data={"max_seq_length": 192, "val_split": 0.0, **(data or {})},
                        training={"learning_rate": LR, "max_grad_norm": None, "test_prompts": [], **training})
    config = load_config(path, ["model.dtype=float32"])
    L.seed_everything(config.training.seed, verbose=False)
    model, tokenizer = load_policy(config)
    prepared = prepare_sft_data(config, tokenizer)
    datamodule = SFTDataModule(prepared, config, pad_id=tokenizer.pad_token_id)
    total = planned_steps(config, len(datamodule.train_items))
    module = LLMTrainingAgent(model, config.training, total)
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=total, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="32-true", callbacks=[recorder],
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    return recorder, module, datamodule


@pytest.fixture(scope="module")
def accumulated_run(tmp_path_factory, tiny_model_dir):
    """4 steps of 2 micro-batches x 1 example, linear decay after 1 warmup step."""
    return fit_sft(tmp_path_factory.mktemp("accumulate"), tiny_model_dir, max_steps=4, per_device_batch_size=1,
                   gradient_accumulation_steps=2, lr_scheduler="linear", warmup_steps=1)


def test_accumulated_step_serves_every_micro_batch(accumulated_run):
    recorder, _, _ = accumulated_run
    assert len(recorder.batches) == 4
    for batch in recorder.batches:
        assert isinstance(batch, list) and len(batch) == 2            # gradient_accumulation_steps micro-batches
        assert all(mb["input_ids"].shape[0] == 1 for mb in batch)    # per_device_batch_size examples each


def test_accumulated_gradient_is_the_token_mean_over_the_whole_step(accumulated_run):
    """With 2 micro-batches of different lengths, the step's gradient equals that of the
    summed NLL / all labelled tokens of the step; a per-micro-batch mean would weight the
    shorter example's tokens more."""
    recorder, module, _ = accumulated_run
    first = recorder.batches[0]
    counts = [int((mb["labels"][:, 1:] != -100).sum()) for mb in first]
    assert counts[0] != counts[1], "equal micro-batch sizes cannot tell the normalisations apart"
    got, want = recorder.grads[0], recorder.expected_grads
    assert set(got) == set(want) and want
    # lora_A gets no gradient at B = 0, so compare where the gradient is not identically 0
    moved = [n for n in want if want[n].abs().sum() > 0]
    assert moved
    for name in moved:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-7), name
    assert module.loss_history[0] == pytest.approx(recorder.expected_loss, rel=1e-5)


def test_learning_rate_follows_warmup_then_linear_decay_in_training(accumulated_run):
    recorder, _, _ = accumulated_run
    # warmup 1 of 4 steps: (0+1)/(1+1) = 0.5, then 1 - (step-1)/3: 1, 2/3, 1/3
    assert recorder.lrs == pytest.approx([LR * 0.5, LR, LR * 2 / 3, LR / 3])


@pytest.mark.parametrize("kind, expected", [
    # warmup 2 of 6 steps: (s+1)/3, then progress (s-2)/4
    ("cosine", [1 / 3, 2 / 3, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]),
    ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0]),
    ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_lr_schedule_values_at_given_steps(kind, expected):
    schedule = lr_lambda(kind, 2, 6)
    assert [schedule(step) for step in range(7)] == pytest.approx(expected, abs=1e-9)
    assert schedule(100) == pytest.approx(expected[-1])   # past the end it stays at the end value


def test_warmup_steps_from_ratio_or_count():
    assert warmup_steps(TrainingConfig(max_steps=8, warmup_ratio=0.25), 8) == 2
    assert warmup_steps(TrainingConfig(max_steps=8, warmup_steps=3), 8) == 3
    assert warmup_steps(TrainingConfig(max_steps=8), 8) == 0


def test_packing_through_the_data_module(tmp_path, tiny_model_dir, tokenizer):
    """`data.packing: true`: rows of whole examples within max_seq_length, every example once,
    and the loss of a packed micro-batch equals the loss of its examples unpacked."""
    from brainforge.data.collate import pad_collate
    from brainforge.data.module import SFTDataModule, prepare_sft_data
    from brainforge.training.losses import sum_token_nll
    from brainforge.training.run import load_policy

    max_len = 192
    path = write_config(tmp_path / "packed.yaml", tiny_model_dir,
                        data={"max_seq_length": max_len, "val_split": 0.0, "packing": True},
                        training={"per_device_batch_size": 2, "test_prompts": []})
    config = load_config(path, ["model.dtype=float32"])
    model, _ = load_policy(config)   # packing switches the model to per-example (segment) attention when it can
    model.eval()
    prepared = prepare_sft_data(config, tokenizer)
    datamodule = SFTDataModule(prepared, config, pad_id=tokenizer.pad_token_id)
    rows = datamodule.train_items
    key = lambda e: (tuple(e.input_ids), tuple(e.labels))  # noqa: E731
    assert sorted(key(e) for row in rows for e in row) == sorted(key(e) for e in prepared.train)
    assert len(rows) < len(prepared.train)                                 # something was packed
    assert all(sum(len(e.input_ids) for e in row) <= max_len for row in rows)

    micro_batches = next(iter(datamodule.train_dataloader()))
    assert isinstance(micro_batches, list) and micro_batches
    for batch in micro_batches:
        assert batch["input_ids"].shape[0] <= 2 and batch["input_ids"].shape[1] <= max_len
    # Loss of packed rows == loss of the same examples one by one (attention stays inside each).
    chosen = rows[:2]
    packed = datamodule._collator()(chosen)
    assert len(packed) == 1 and packed[0]["position_ids"][0, 0] == 0
    starts = (packed[0]["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len([s for s in starts if s < sum(len(e.input_ids) for e in chosen[0])]) == len(chosen[0])  # positions restart per example
    with torch.no_grad():
        nll, tokens = sum_token_nll(model, packed[0])
        alone = [sum_token_nll(model, pad_collate([e], tokenizer.pad_token_id)) for row in chosen for e in row]
    # Packing never trains an example's first token (it would be predicted from the previous example);
    # pad_collate never trains position 0 either, so the labelled tokens are the same.
    assert int(tokens) == sum(int(t) for _, t in alone)
    assert float(nll / tokens) == pytest.approx(float(sum(n for n, _ in alone) / tokens), rel=1e-4)
