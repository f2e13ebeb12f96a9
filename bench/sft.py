"""SFT throughput: brainforge vs TRL's SFTTrainer, same model, data, LoRA, length, batch.

    python bench/sft.py                      # both tools, default settings
    python bench/sft.py --steps 12 --packing # also brainforge with packing (fuller rows)

Each tool runs in its own child process of this one (same machine, same process tree, same
thread count) so peak RSS is per tool. Prints one JSON line per run and one with the ratios.
Measured: trained (labelled, non-padding) tokens per second over the timed steps (the first
`--warmup` steps are excluded) and the child's peak RSS.

Needs the bench extra for TRL: pip install -e '.[bench]'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

from _child import emit, prepare_environment, run_worker

SOURCES = [
    {"name": "sample:chat", "type": "chat", "weight": 0.5},
    {"name": "sample:coding", "type": "coding", "weight": 0.5},
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per tool")
    parser.add_argument("--warmup", type=int, default=2, help="leading steps left out of the timing")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtype", default="auto", help="base weight dtype: auto (bf16 only where fast), float32, bfloat16")
    parser.add_argument("--packing", action="store_true", help="also run brainforge with padding-free packing")
    parser.add_argument("--tools", default="brainforge,brainforge-padded,trl",
                        help="brainforge (padding-free, the default), brainforge-padded, trl")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def conversations(args: argparse.Namespace) -> list[list[dict[str, str]]]:
    from brainforge.config import SourceConfig
    from brainforge.data.sources import mix_sources

    mixed = mix_sources([SourceConfig(**s) for s in SOURCES], None, seed=0, stopping_strategy="all_exhausted")
    return list(mixed["messages"])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_rate(step_times: list[float], step_tokens: list[int], warmup: int) -> tuple[float, float]:
    times, tokens = step_times[warmup:], step_tokens[warmup:]
    return sum(tokens) / sum(times), sum(times) / len(times)


# ----------------------------------------------------------------------------- brainforge


def run_brainforge(args: argparse.Namespace, variant: str) -> dict:
    import lightning as L
    import torch

    from brainforge.config import validate_config
    from brainforge.data.module import SFTDataModule, prepare_sft_data
    from brainforge.hardware import configure_threads
    from brainforge.training.run import load_policy
    from brainforge.training.sft import LLMTrainingAgent

    configure_threads(args.threads)
    config = validate_config({
        "model": {"name_or_path": "default", "dtype": args.dtype},
        "peft": {"lora": {"r": args.rank, "lora_alpha": 2 * args.rank, "lora_dropout": 0.0}},
        "datasets": {"multi_source_enabled": True, "sources": SOURCES, "stopping_strategy": "all_exhausted"},
        "data": {"max_seq_length": args.max_length, "val_split": 0.0,
                 "packing": variant == "brainforge+packing", "padding_free": variant != "brainforge-padded"},
        "training": {"max_steps": args.steps, "per_device_batch_size": args.batch, "learning_rate": args.lr,
                     "lr_scheduler": "constant", "seed": 0},
        "logging": {"tensorboard": False},
    })
    L.seed_everything(0, verbose=False)
    model, tokenizer = load_policy(config)
    data = prepare_sft_data(config, tokenizer)
    datamodule = SFTDataModule(data, config, pad_id=tokenizer.pad_token_id)
    module = LLMTrainingAgent(model, config.training, args.steps)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=args.steps, logger=False,
                        callbacks=[timer], enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    tokens_per_s, s_per_step = timed_rate(timer.times, timer.tokens, args.warmup)
    return {"tool": variant, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "trained_tokens_per_s": round(tokens_per_s, 1), "s_per_step": round(s_per_step, 3),
            "mean_trained_tokens_per_step": round(sum(timer.tokens[args.warmup:]) / len(timer.tokens[args.warmup:]), 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "torch_threads": torch.get_num_threads()}


def _lightning_callback_base():
    import lightning as L

    return L.Callback


class StepTimer(_lightning_callback_base()):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        self._tokens = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in batch)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.tokens.append(self._tokens)


# ----------------------------------------------------------------------------- TRL


def run_trl(args: argparse.Namespace) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from brainforge.hardware import configure_threads, resolve_dtype
    from brainforge.models.gguf import ensure_default_model
    from brainforge.models.loader import load_tokenizer

    configure_threads(args.threads)
    path = str(ensure_default_model())
    dtype = resolve_dtype(args.dtype)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    rows = [{"prompt": conv[:-1], "completion": conv[-1:]} for conv in conversations(args)]
    dataset = datasets.Dataset.from_list(rows)

    step_tokens: list[int] = []

    class CountingCollator:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, examples):
            batch = self.inner(examples)
            step_tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
            return batch

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._start)

    timer = Timer()
    config = SFTConfig(
        output_dir="/tmp/brainforge-bench-trl", max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to=[], max_length=args.max_length, packing=False, use_cpu=True,
        bf16=dtype == torch.bfloat16, dataloader_num_workers=0, gradient_checkpointing=False, seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    trainer.data_collator = CountingCollator(trainer.data_collator)
    trainer.train()
    # The collator runs once per step, before the step's timer starts (no prefetch with 0 workers).
    tokens = step_tokens[: len(timer.times)]
    tokens_per_s, s_per_step = timed_rate(timer.times, tokens, args.warmup)
    import trl

    return {"tool": f"trl-{trl.__version__}", "dtype": str(dtype).removeprefix("torch."),
            "trained_tokens_per_s": round(tokens_per_s, 1), "s_per_step": round(s_per_step, 3),
            "mean_trained_tokens_per_step": round(sum(tokens[args.warmup:]) / len(tokens[args.warmup:]), 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver


def main() -> None:
    args = parse_args()
    prepare_environment(worker=bool(args.worker))
    if args.worker:
        result = run_trl(args) if args.worker == "trl" else run_brainforge(args, args.worker)
        emit(result)
        return

    from brainforge.models.gguf import ensure_default_model

    ensure_default_model()  # convert once, outside the timed children
    workers = [t for t in args.tools.split(",") if t]
    if args.packing:
        workers.insert(1, "brainforge+packing")
    machine = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    results: dict[str, dict] = {}
    for worker in workers:
        measured = run_worker(__file__, sys.argv[1:], worker)
        if measured is None:
            continue
        result = {**measured, **machine, "settings": {
            "steps": args.steps, "warmup": args.warmup, "batch": args.batch, "max_length": args.max_length,
            "lora_r": args.rank, "threads": args.threads}}
        results[worker] = result
        print(json.dumps(result), flush=True)
    trl_result = next((r for k, r in results.items() if k == "trl"), None)
    for name, result in results.items():
        if trl_result is not None and name != "trl":
            print(json.dumps({
                "ratio": f"{name}/trl",
                "trained_tokens_per_s": round(result["trained_tokens_per_s"] / trl_result["trained_tokens_per_s"], 2),
                "peak_rss": round(result["peak_rss_mb"] / trl_result["peak_rss_mb"], 2),
            }), flush=True)


if __name__ == "__main__":
    main()
