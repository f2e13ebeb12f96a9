"""The SFT recipe: config in, run folder out. Reads top to bottom: setup, fit, outputs.

Run folder layout (`output_dir/<run>/`):
    config.yaml          the resolved config
    tensorboard/         event files
    checkpoints/         step-NNNNNN/{adapter/, trainer_state.ckpt}, `latest`
    adapter/             the final PEFT adapter (+ tokenizer with the training chat template)
    metrics.json         losses, tokens, throughput, memory
    samples.jsonl        generations for `training.test_prompts`
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import lightning as L

from brainforge.config import BrainforgeConfig, dump_config
from brainforge.data.module import PreparedData, SFTDataModule, prepare_sft_data
from brainforge.errors import BrainforgeError, ConfigError, MissingDependencyError
from brainforge.hardware import configure_threads, resolve_dtype
from brainforge.inference import ChatModel
from brainforge.models.attention import enable_segment_attention
from brainforge.models.loader import attach_lora, load_base_model, load_tokenizer, resolve_model_path
from brainforge.training.checkpointing import AdapterCheckpoint, latest_checkpoint, write_adapter
from brainforge.training.interrupt import StopOnInterrupt, interrupt_guard
from brainforge.training.sft import LLMTrainingAgent

log = logging.getLogger(__name__)

RUN_DIR_ENV = "BRAINFORGE_RUN_DIR"


def train(config: BrainforgeConfig, config_path: str | Path, resume: bool = False, resume_command: str | None = None) -> Path:
    """Run SFT as configured and return the run folder. `resume_command` is what Ctrl-C
    tells the user to run to continue (`brainforge reason` passes its own)."""
    inherited_run_dir = RUN_DIR_ENV in os.environ  # set for DDP children by their parent
    hint = f"The last complete checkpoint is kept; continue with: {resume_command or f'brainforge train {config_path} --resume'}"
    try:
        with interrupt_guard(hint):
            return _train(config, Path(config_path), resume)
    finally:
        if not inherited_run_dir:
            os.environ.pop(RUN_DIR_ENV, None)


def _train(config: BrainforgeConfig, config_path: Path, resume: bool) -> Path:
    L.seed_everything(config.training.seed, workers=True, verbose=False)
    configure_threads(config.training.num_threads)
    run_dir = resolve_run_dir(config, config_path, resume)
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if resume and checkpoint is None:
        raise BrainforgeError(f"--resume: {run_dir} has no complete checkpoint to resume from")

    if config.algorithm.is_rl:
        from brainforge.training.grpo_run import prepare_rl_inputs, run_grpo

        inputs = prepare_rl_inputs(config, config_path)  # prompts, traces and store are checked before the model loads
        model, tokenizer = load_policy(config)
        return run_grpo(config, run_dir, checkpoint, model, tokenizer, inputs)
    if config.algorithm.name == "apo":
        from brainforge.agents.run import run_apo_job

        if resume:
            raise BrainforgeError("--resume: apo does not resume; its apo.json keeps every completed round. Start a new run")
        dump_config(config, run_dir / "config.yaml")
        model, tokenizer = load_policy(config)
        return run_apo_job(config, run_dir, model, tokenizer)
    model, tokenizer = load_policy(config)
    if config.algorithm.name == "agent_sft":  # sample the agent's successes, then train on them as below
        from brainforge.agents.sft import collect_sft_data

        config = collect_sft_data(config, run_dir, model, tokenizer, reuse=resume)

    data = prepare_sft_data(config, tokenizer)
    datamodule = SFTDataModule(data, config, pad_id=tokenizer.pad_token_id)
    total_steps = planned_steps(config, len(datamodule.train_items))
    module = LLMTrainingAgent(model, config.training, total_steps)
    meta = {"model": config.model.name_or_path, "output_format": config.datasets.output_format}
    checkpointer = AdapterCheckpoint(
        run_dir / "checkpoints", config.training.save_every_n_steps, config.training.save_total_limit,
        tokenizer, data.fmt.template, meta,
    )
    trainer = build_trainer(config, run_dir, total_steps, checkpointer, has_val=bool(datamodule.val_items))
    if trainer.is_global_zero:
        dump_config(config, run_dir / "config.yaml")
        log.info("run folder: %s (%d optimizer steps)", run_dir, total_steps)

    val_before = None
    if datamodule.val_items and checkpoint is None:
        val_before = _val_loss(trainer.validate(module, datamodule=datamodule, verbose=False))
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint / "trainer_state.ckpt") if checkpoint else None)
    train_seconds = time.perf_counter() - started
    val_loss = _val_loss(trainer.validate(module, datamodule=datamodule, verbose=False)) if datamodule.val_items else None

    if trainer.is_global_zero:
        write_adapter(model, tokenizer, data.fmt.template, run_dir / "adapter", {**meta, "step": trainer.global_step})
        write_samples(ChatModel(model, tokenizer), config, run_dir / "samples.jsonl")
        write_metrics(run_dir / "metrics.json", module, trainer, data, train_seconds, val_before, val_loss)
    return run_dir


# ---------------------------------------------------------------------------- setup


def load_policy(config: BrainforgeConfig) -> tuple[Any, Any]:
    """Base model (bf16 or 4-bit) with a trainable LoRA adapter, and its tokenizer."""
    dtype = resolve_dtype(config.model.dtype, config.training.precision)
    path = resolve_model_path(config.model.name_or_path)
    tokenizer = load_tokenizer(path, config.model.trust_remote_code)
    base = load_base_model(config.model, dtype, config.peft.quantization, model_path=path)
    if (config.data.packing or config.data.padding_free) and not enable_segment_attention(base):
        log.info("attention implementation %s: packed rows use a dense block-diagonal mask", base.config._attn_implementation)
    base.train()  # from_pretrained returns eval mode; dropout (if any) must be live
    model = attach_lora(
        base, config.peft.lora, config.model.adapter_path, trainable=True,
        gradient_checkpointing=config.training.gradient_checkpointing,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("model %s in %s: %.2fM trainable of %.1fM parameters", config.model.name_or_path, dtype, trainable / 1e6, total / 1e6)
    return model, tokenizer


def resolve_run_dir(config: BrainforgeConfig, config_path: Path, resume: bool) -> Path:
    """The run folder; identical in every DDP process (children inherit it by env)."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited)
    output_dir = Path(config.training.output_dir)
    prefix = config.training.run_name or config_path.stem
    if resume:
        candidates = [p for p in output_dir.glob(f"{prefix}*") if latest_checkpoint(p / "checkpoints")]
        if not candidates:
            raise BrainforgeError(f"--resume: no run of '{prefix}' with a checkpoint under {output_dir}")
        run_dir = max(candidates, key=lambda p: (p / "checkpoints" / "latest").stat().st_mtime)
    else:
        name = config.training.run_name or f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = output_dir / name
        _check_inside(run_dir, output_dir)
        if config.training.run_name and latest_checkpoint(run_dir / "checkpoints"):
            raise BrainforgeError(f"{run_dir} already holds a run; pass --resume to continue it or choose another training.run_name")
        run_dir.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    return run_dir.resolve()


def _check_inside(run_dir: Path, output_dir: Path) -> None:
    """The run folder must be a folder inside output_dir: whatever a name resolves to (a
    symlink, `..`), a run never writes elsewhere."""
    resolved, root = run_dir.resolve(), output_dir.resolve()
    if root not in resolved.parents:
        raise ConfigError(f"training.run_name: the run folder {run_dir} resolves to {resolved}, outside "
                          f"training.output_dir ({root}); use a plain folder name")


def planned_steps(config: BrainforgeConfig, num_items: int) -> int:
    training = config.training
    if training.max_steps is not None:
        return training.max_steps
    world = _world_size(config)
    per_step = training.per_device_batch_size * training.gradient_accumulation_steps * world
    assert training.num_epochs is not None  # checked at construction
    return max(1, math.ceil(num_items / per_step)) * training.num_epochs


def _world_size(config: BrainforgeConfig) -> int:
    devices = config.hardware.devices
    return (devices if isinstance(devices, int) else 1) * config.hardware.num_nodes


def build_trainer(config: BrainforgeConfig, run_dir: Path, total_steps: int, checkpointer: L.Callback, has_val: bool) -> L.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    loggers: list[Any] = []
    if config.logging.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False))
    if config.logging.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise MissingDependencyError("wandb", "wandb", "logging.wandb")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=config.logging.wandb_project, save_dir=str(run_dir), name=run_dir.name))
    callbacks: list[L.Callback] = [checkpointer, StopOnInterrupt()]
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    eval_every = config.training.eval_every_n_steps
    hardware = config.hardware
    try:
        return L.Trainer(
            accelerator=hardware.accelerator,
            devices=hardware.devices,
            strategy=hardware.strategy,
            num_nodes=hardware.num_nodes,
            precision="32-true",  # weights keep the dtype we loaded them in; adapters train in fp32
            max_steps=total_steps,
            max_epochs=-1,
            max_time=timedelta(minutes=config.training.max_minutes) if config.training.max_minutes else None,
            logger=loggers or False,
            callbacks=callbacks,
            enable_checkpointing=False,
            log_every_n_steps=config.training.logging_every_n_steps,
            val_check_interval=eval_every if eval_every else 1.0,
            check_val_every_n_epoch=None if eval_every else 1,
            limit_val_batches=1.0 if has_val else 0,
            num_sanity_val_steps=0,
            default_root_dir=str(run_dir),
            enable_model_summary=False,
        )
    except (ValueError, TypeError, RuntimeError, MisconfigurationException) as exc:
        raise ConfigError(f"hardware: Lightning rejected accelerator={hardware.accelerator!r} devices={hardware.devices!r} strategy={hardware.strategy!r}: {exc}") from exc


# ---------------------------------------------------------------------------- outputs


def write_samples(chat: ChatModel, config: BrainforgeConfig, path: Path) -> None:
    """The seed's "Test Generation": greedy answers to the configured test prompts."""
    prompts = config.training.test_prompts
    if not prompts:
        path.write_text("")
        return
    chat.model.eval()
    conversations: list[Any] = list(prompts)
    if config.memory.enabled:  # answer as at `ask` time: the same context and SOP in the prompt
        from brainforge.memory.assistant import augment_with_memory

        base = [{"role": "system", "content": config.data.system_prompt}] if config.data.system_prompt else []
        conversations = augment_with_memory([[*base, {"role": "user", "content": p}] for p in prompts], config.memory)
    completions = chat.generate(conversations, max_new_tokens=config.training.sample_max_new_tokens, system_prompt=config.data.system_prompt)
    with path.open("w") as handle:
        for prompt, conversation, completion in zip(prompts, conversations, completions):
            row = {"prompt": prompt, "completion": completion}
            if config.memory.enabled:
                row["system_prompt"] = conversation[0]["content"]
            handle.write(json.dumps(row) + "\n")


def _val_loss(results: list[dict[str, Any]]) -> float | None:
    value = results[0].get("val/loss") if results else None
    return float(value) if value is not None else None


def write_metrics(
    path: Path, module: LLMTrainingAgent, trainer: L.Trainer, data: PreparedData, seconds: float,
    val_before: float | None, val_loss: float | None,
) -> None:
    losses = module.loss_history
    metrics = {
        "steps": trainer.global_step,
        "world_size": trainer.world_size,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "val_loss_before": val_before,
        "val_loss": val_loss,
        "trained_tokens": module.trained_tokens,
        "train_seconds": round(seconds, 2),
        "trained_tokens_per_s": round(module.trained_tokens / seconds, 1) if seconds > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "data": data.stats,
        "train_examples": len(data.train),
    }
    path.write_text(json.dumps(metrics, indent=2))


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
