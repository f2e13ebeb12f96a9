"""GRPO step throughput: brainforge vs TRL's GRPOTrainer, same model, prompts and settings.

    python bench/grpo.py                     # 8 steps each, the issue's anchor settings
    python bench/grpo.py --steps 12 --max-new-tokens 32

Settings shared by both tools: the default model (dtype auto: fp32 on CPUs without fast
bf16), LoRA r=16 all-linear, 2 prompts x 4 generations, max completion length 64, beta
0.04, learning rate 5e-5, temperature 0.7, reward = last number of the reply equals the
answer, prompts = reasoning-gym two-digit additions. Each tool runs in its own child
process (same process tree and threads). Prints one JSON line per tool and the ratios:
seconds per step (the first step excluded), completion tokens per second, peak RSS, and
for brainforge the seconds per phase of a step.

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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tools", default="brainforge,trl")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


TASK_OPTIONS = {"size": 400, "eval_size": 50, "seed": 0, "min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2,
                "operators": ["+"], "allow_parentheses": False, "allow_negation": False, "instruction": "Answer with the number only."}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_brainforge(args: argparse.Namespace) -> dict:
    import lightning as L

    from brainforge.config import validate_config
    from brainforge.data.prompts import load_prompts
    from brainforge.data.templates import chat_format
    from brainforge.hardware import configure_threads
    from brainforge.training.grpo import GRPOModule
    from brainforge.training.grpo_run import PromptDataModule
    from brainforge.training.run import load_policy

    configure_threads(args.threads)
    config = validate_config({
        "model": {"name_or_path": "default", "dtype": args.dtype},
        "peft": {"lora": {"r": args.rank, "lora_alpha": 2 * args.rank}},
        "data": {"source": {"name": "reasoning_gym:basic_arithmetic", "type": "prompt", "options": TASK_OPTIONS}},
        "algorithm": {"name": "grpo", "grpo": {
            "num_generations": args.generations, "prompts_per_step": args.prompts, "max_new_tokens": args.max_new_tokens,
            "temperature": 0.7, "beta": args.beta, "loss_type": "dapo", "reward_functions": [{"name": "last_number"}]}},
        "training": {"max_steps": args.steps, "learning_rate": args.lr, "lr_scheduler": "constant", "seed": 0},
        "logging": {"tensorboard": False},
    })
    L.seed_everything(0, verbose=False)
    model, tokenizer = load_policy(config)
    prompts = load_prompts(config.sources(), None)
    module = GRPOModule(model, tokenizer, chat_format("chatml", tokenizer).template, config.algorithm.grpo, config.training, args.steps)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=PromptDataModule(prompts, args.prompts))
    timed = module.history[1:]
    n = args.prompts * args.generations
    seconds = sum(h["time/step_s"] for h in timed)
    tokens = sum(h["completion/length_mean"] * n for h in timed)
    phases = {p: round(sum(h[f"time/{p}_s"] for h in timed) / len(timed), 3) for p in ("generation", "rewards", "reference", "loss", "optimizer")}
    return {"tool": "brainforge", "s_per_step": round(seconds / len(timed), 3), "completion_tokens_per_s": round(tokens / seconds, 1),
            "mean_completion_length": round(tokens / n / len(timed), 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "reward_mean": round(sum(h["reward/mean"] for h in module.history) / len(module.history), 3), "phases_s": phases}


def run_trl(args: argparse.Namespace) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from brainforge.data.prompts import reasoning_gym_prompts
    from brainforge.hardware import configure_threads, resolve_dtype
    from brainforge.models.gguf import ensure_default_model
    from brainforge.models.loader import load_tokenizer
    from brainforge.rewards.correctness import last_number_match

    configure_threads(args.threads)
    torch.manual_seed(0)
    path = str(ensure_default_model())
    dtype = resolve_dtype(args.dtype)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    prompts = reasoning_gym_prompts("basic_arithmetic", dict(TASK_OPTIONS), "train")
    dataset = datasets.Dataset.from_list([{"prompt": p.messages, "answer": p.columns["answer"]} for p in prompts])

    def reward(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return last_number_match(prompts, texts, answer=answer)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.lengths: list[float] = []

        def on_step_begin(self, *a, **k):
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._start)

        def on_log(self, args_, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    timer = Timer()
    config = GRPOConfig(
        output_dir="/tmp/brainforge-bench-trl-grpo", max_steps=args.steps, per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.max_new_tokens, beta=args.beta, learning_rate=args.lr,
        lr_scheduler_type="constant", temperature=0.7, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        bf16=dtype == torch.bfloat16, gradient_checkpointing=False, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", task_type="CAUSAL_LM"),
                          callbacks=[timer])
    trainer.train()
    import trl

    n = args.prompts * args.generations
    times, lengths = timer.times[1:], timer.lengths[1 : len(timer.times)]
    tokens = sum(l * n for l in lengths)
    return {"tool": f"trl-{trl.__version__}", "s_per_step": round(sum(times) / len(times), 3),
            "completion_tokens_per_s": round(tokens / sum(times[: len(lengths)]), 1),
            "mean_completion_length": round(sum(lengths) / len(lengths), 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def main() -> None:
    args = parse_args()
    prepare_environment(worker=bool(args.worker))
    if args.worker:
        result = run_trl(args) if args.worker == "trl" else run_brainforge(args)
        emit(result)
        return
    from brainforge.models.gguf import ensure_default_model

    ensure_default_model()
    context = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "settings": {
        "steps": args.steps, "prompts": args.prompts, "generations": args.generations, "max_new_tokens": args.max_new_tokens,
        "beta": args.beta, "lora_r": args.rank, "threads": args.threads, "dtype": args.dtype}}
    results = {}
    for worker in [t for t in args.tools.split(",") if t]:
        measured = run_worker(__file__, sys.argv[1:], worker)
        if measured is None:
            continue
        results[worker] = {**measured, **context}
        print(json.dumps(results[worker]), flush=True)
    if "brainforge" in results and "trl" in results:
        ours, theirs = results["brainforge"], results["trl"]
        print(json.dumps({"ratio": "brainforge/trl",
                          "step_throughput": round(theirs["s_per_step"] / ours["s_per_step"], 2),
                          "completion_tokens_per_s": round(ours["completion_tokens_per_s"] / theirs["completion_tokens_per_s"], 2),
                          "peak_rss": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 2)}), flush=True)


if __name__ == "__main__":
    main()
