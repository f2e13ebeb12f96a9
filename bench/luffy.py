"""Does guidance help where GRPO cannot learn? Held-out greedy accuracy curves for GRPO,
LUFFY, ExGRPO / hybrid and plain SFT on the same worked solutions, same model, same steps.

    python bench/luffy.py                                   # three-digit addition, all methods
    python bench/luffy.py --task add2 --methods grpo,luffy  # the two-digit addition benchmark

Every method trains through the product path (`brainforge.training.run.train`, the same as
`brainforge train`) in its own child process, saving a checkpoint every `--eval-every`
steps; each checkpoint's adapter is then scored greedily on held-out questions that never
appear in training (`brainforge.evaluation.evaluate`). The base model's sampled success on
the task (the share of correct samples at the training temperature: what GRPO has to learn
from) is measured first. Settings shared by all methods: default model, LoRA r=16
all-linear, lr 1e-4 constant, 2 prompts per step; RL methods fill groups of 4 at
temperature 0.7 (LUFFY: 1 worked solution + 3 samples), beta 0; SFT trains on the worked
solutions of the same 2 prompts per step. Prints one JSON line per method and writes a
picture (`--plot`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from _child import cpu_name, emit, prepare_environment, run_worker

TASKS = {
    "add3": {"min_digits": 3, "max_digits": 3, "operators": ["+"], "max_new_tokens": 64},
    "add2": {"min_digits": 2, "max_digits": 2, "operators": ["+"], "max_new_tokens": 48},
    "mul": {"min_digits": 1, "max_digits": 2, "operators": ["*"], "max_new_tokens": 64},
}
INSTRUCTION = "Work it out column by column, then give the answer."
SETTINGS = {"prompts": 2, "generations": 4, "lr": 1e-4, "rank": 16, "temperature": 0.7, "beta": 0.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="add3")
    parser.add_argument("--methods", default="grpo,luffy,hybrid,sft")
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--held-out", type=int, default=50)
    parser.add_argument("--plot", default=None, help="default: docs/luffy_<task>.png")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


def task_options(task: str, held_out: int) -> dict:
    options = {k: v for k, v in TASKS[task].items() if k != "max_new_tokens"}
    return {"size": 2000, "eval_size": held_out, "seed": 0, "min_terms": 2, "max_terms": 2, "allow_parentheses": False,
            "allow_negation": False, "instruction": INSTRUCTION, **options}


def config_dict(method: str, args: argparse.Namespace, out: Path) -> dict:
    source = {"name": "reasoning_gym:basic_arithmetic", "type": "prompt", "options": task_options(args.task, args.held_out)}
    training = {"output_dir": str(out), "run_name": method, "max_steps": args.steps, "learning_rate": SETTINGS["lr"],
                "lr_scheduler": "constant", "save_every_n_steps": args.eval_every, "save_total_limit": 1000, "seed": 0,
                "test_prompts": []}
    grpo = {"num_generations": SETTINGS["generations"], "prompts_per_step": SETTINGS["prompts"], "micro_batch_size": None,
            "max_new_tokens": TASKS[args.task]["max_new_tokens"], "temperature": SETTINGS["temperature"], "beta": SETTINGS["beta"],
            "reward_functions": [{"name": "last_number"}]}
    config = {"model": {"name_or_path": "default"},
              "peft": {"lora": {"r": SETTINGS["rank"], "lora_alpha": 2 * SETTINGS["rank"], "lora_dropout": 0.0}},
              "data": {"source": source}, "training": training, "logging": {"tensorboard": False},
              "algorithm": {"name": method if method != "sft" else "grpo", "grpo": grpo}}
    if method in ("luffy", "hybrid"):
        config["algorithm"]["off_policy"] = {"traces": ["worked:arithmetic"]}
    if method in ("exgrpo", "hybrid"):
        config["algorithm"]["experience"] = {"start_solve_rate": 0.2}
    if method == "sft":
        config["data"] = {"source": {"path": str(out / "worked_solutions.jsonl"), "type": "chat"}, "packing": False}
        config["algorithm"] = {"name": "sft"}
        config["training"]["per_device_batch_size"] = SETTINGS["prompts"]
    return config


def sft_dataset(args: argparse.Namespace, out: Path) -> None:
    """The worked solutions LUFFY sees, as chat examples for SFT (one per training prompt)."""
    from brainforge.config import validate_config
    from brainforge.data.prompts import load_prompts
    from brainforge.teachers.worked import worked_solution

    config = validate_config(config_dict("grpo", args, out))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "worked_solutions.jsonl").open("w") as handle:
        for prompt in load_prompts(config.sources(), None):
            solution = worked_solution(prompt, "arithmetic")
            if solution is not None:
                handle.write(json.dumps({"messages": [*prompt.messages, {"role": "assistant", "content": solution}]}) + "\n")


def train_method(method: str, args: argparse.Namespace, out: Path) -> dict:
    from brainforge.config import validate_config
    from brainforge.training.run import train

    if method == "sft":
        sft_dataset(args, out)
    config = validate_config(config_dict(method, args, out))
    path = out / f"{method}.yaml"
    started = time.perf_counter()
    run = train(config, path)
    seconds = time.perf_counter() - started
    curve = []
    for checkpoint in sorted((run / "checkpoints").glob("step-*")):
        step = int(checkpoint.name.removeprefix("step-"))
        curve.append((step, held_out_accuracy(args, checkpoint / "adapter")))
    metrics = json.loads((run / "metrics.json").read_text())
    return {"curve": curve, "train_seconds": round(seconds, 1), "seconds_per_step": metrics.get("seconds_per_step"),
            "reward_last5_mean": metrics.get("reward_last5_mean")}


def held_out_accuracy(args: argparse.Namespace, adapter: Path | None) -> float:
    from brainforge.config import validate_config
    from brainforge.evaluation import evaluate, held_out_prompts
    from brainforge.inference import load_chat_model

    config = validate_config(config_dict("grpo", args, Path("/tmp")))
    chat = load_chat_model(adapter=adapter, model="default")
    return evaluate(chat.model, chat.tokenizer, config, held_out_prompts(config, None), "x", k=0).greedy_accuracy


def base_rates(args: argparse.Namespace) -> dict:
    """Greedy held-out accuracy, and the share of correct samples at the training temperature."""
    import torch

    from brainforge.config import validate_config
    from brainforge.data.templates import chat_format
    from brainforge.evaluation import held_out_prompts
    from brainforge.generation.engine import GenerationEngine, SamplingParams
    from brainforge.inference import load_chat_model
    from brainforge.rewards.correctness import last_number_match

    config = validate_config(config_dict("grpo", args, Path("/tmp")))
    chat = load_chat_model(model="default")
    template = chat_format("chatml", chat.tokenizer).template
    engine = GenerationEngine.for_chat(chat.model, chat.tokenizer)
    prompts = held_out_prompts(config, None)
    generator = torch.Generator().manual_seed(0)
    right = total = 0
    for start in range(0, len(prompts), 4):
        chunk = prompts[start : start + 4]
        ids = [chat.tokenizer(chat.tokenizer.apply_chat_template(p.messages, chat_template=template, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"] for p in chunk]
        rollout = engine.generate(ids, SETTINGS["generations"], SamplingParams(max_new_tokens=TASKS[args.task]["max_new_tokens"],
                                                                               temperature=SETTINGS["temperature"]), generator=generator)
        scores = last_number_match([], rollout.texts, [p.columns["answer"] for p in chunk for _ in range(SETTINGS["generations"])])
        right += sum(s or 0 for s in scores)
        total += len(scores)
    return {"sampled_success": right / total, "greedy_accuracy": held_out_accuracy(args, None)}


def main() -> None:
    args = parse_args()
    prepare_environment(worker=bool(args.worker))
    passed = ["--task", args.task, "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--held-out", str(args.held_out)]
    if args.worker:
        emit(base_rates(args) if args.worker == "base" else train_method(args.worker, args, Path(args.out)))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="brainforge-luffy-"))
    context = {"task": args.task, "steps": args.steps, "held_out": args.held_out, "settings": SETTINGS,
               "machine": platform.processor() or platform.machine(), "cpu": cpu_name(), "cpus": os.cpu_count()}
    base = run_worker(__file__, [*passed, "--out", str(workdir / "base")], "base") or {}
    print(json.dumps({"method": "base", **base, **context}), flush=True)
    curves = {}
    for method in [m for m in args.methods.split(",") if m]:
        result = run_worker(__file__, [*passed, "--out", str(workdir / method)], method)
        if result is None:
            continue
        curve = [(0, base.get("greedy_accuracy"))] + [tuple(point) for point in result["curve"]]
        curves[method] = curve
        print(json.dumps({"method": method, "held_out_accuracy_by_step": curve, **{k: v for k, v in result.items() if k != "curve"},
                          **context}), flush=True)
    if curves:
        plot(curves, Path(args.plot or f"docs/luffy_{args.task}.png"), args, base)


def plot(curves: dict[str, list], path: Path, args: argparse.Namespace, base: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4))
    for method, curve in curves.items():
        axis.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label=method)
    axis.set_xlabel("training step (2 prompts per step)")
    axis.set_ylabel(f"held-out greedy accuracy ({args.held_out} questions)")
    rate = base.get("sampled_success")
    axis.set_title(f"{args.task}: base model sampled success {rate:.1%}" if rate is not None else args.task)
    axis.set_ylim(-0.02, 1.02)
    axis.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
