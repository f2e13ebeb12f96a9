"""Supervised fine-tuning as a LightningModule (the seed's `LLMTrainingAgent`).

Manual optimisation, on purpose: one training batch is one optimizer step's list of
micro-batches, so the step can divide the summed NLL by the labelled tokens of the whole
step (across processes too) and read top to bottom: count tokens, forward/backward each
micro-batch, clip, step, schedule.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from brainforge.config import TrainingConfig
from brainforge.training.checkpointing import keep_trainable_state
from brainforge.training.losses import sum_token_nll


class LLMTrainingAgent(L.LightningModule):
    def __init__(self, model: Any, training: TrainingConfig, total_steps: int):
        super().__init__()
        self.model = model
        self.training_cfg = training
        self.total_steps = total_steps
        self.automatic_optimization = False
        # Checkpoints hold only the adapter (see on_save_checkpoint), so loading them
        # must not demand the frozen base weights.
        self.strict_loading = False
        self.trained_tokens = 0
        self._step_started = time.perf_counter()
        self.loss_history: list[float] = []

    # ------------------------------------------------------------------ training step

    def training_step(self, micro_batches: list[dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()

        local_tokens = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
        normaliser = self._mean_tokens_per_process(local_tokens)

        step_loss = torch.zeros((), device=self.device)
        for micro_batch in micro_batches:
            nll_sum, _ = sum_token_nll(self.model, micro_batch)
            loss = nll_sum / normaliser
            self.manual_backward(loss)
            step_loss += loss.detach()

        if self.training_cfg.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.training_cfg.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        self._log_step(step_loss, local_tokens)
        return step_loss

    def _mean_tokens_per_process(self, local_tokens: int) -> float:
        """DDP averages gradients over processes, so each divides by the mean count."""
        if dist.is_available() and dist.is_initialized():
            count = torch.tensor([float(local_tokens)], device=self.device)
            dist.all_reduce(count)
            return max(count.item() / dist.get_world_size(), 1.0)
        return float(max(local_tokens, 1))

    def _log_step(self, step_loss: torch.Tensor, tokens: int) -> None:
        now = time.perf_counter()
        elapsed = max(now - self._step_started, 1e-9)
        self._step_started = now
        self.trained_tokens += tokens
        self.loss_history.append(float(step_loss))
        self.log("train/loss", step_loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/tokens_per_s", tokens / elapsed, on_step=True, on_epoch=False)
        self.log("train/trained_tokens", float(self.trained_tokens), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ validation

    def validation_step(self, micro_batches: list[dict[str, torch.Tensor]], batch_idx: int) -> None:
        nll = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        for micro_batch in micro_batches:
            batch_nll, batch_tokens = sum_token_nll(self.model, micro_batch)
            nll += batch_nll
            tokens += batch_tokens
        self._val_nll += nll
        self._val_tokens += tokens

    def on_validation_epoch_start(self) -> None:
        self._val_nll = torch.zeros((), device=self.device)
        self._val_tokens = torch.zeros((), device=self.device)

    def on_validation_epoch_end(self) -> None:
        nll, tokens = self._val_nll, self._val_tokens
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(nll)
            dist.all_reduce(tokens)
        if tokens > 0:
            self.log("val/loss", nll / tokens, prog_bar=True, sync_dist=False)

    # ------------------------------------------------------------------ optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.training_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        warmup = warmup_steps(cfg, self.total_steps)
        schedule = lr_lambda(cfg.lr_scheduler, warmup, self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights: the frozen base is reloaded from its source."""
        keep_trainable_state(self.model, checkpoint)
        checkpoint["brainforge"] = {"trained_tokens": self.trained_tokens, "loss_history": self.loss_history}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("brainforge", {})
        self.trained_tokens = extra.get("trained_tokens", 0)
        self.loss_history = list(extra.get("loss_history", []))


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        return int(cfg.warmup_ratio * total_steps)
    return 0


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak learning rate at a given step: linear warmup, then decay."""

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule
