"""Does GRPO teach? Held-out accuracy before and after a fixed wall-clock budget, for
brainforge and for TRL's GRPOTrainer under the same budget and settings.

    python bench/grpo_learning.py --budget-minutes 15
    python bench/grpo_learning.py --budget-minutes 5 --tools brainforge   # quicker look
    python bench/grpo_learning.py --budget-minutes 15 --tools luffy       # brainforge's LUFFY, same settings

Task: reasoning-gym two-digit addition ("Answer with the number only."); reward: the last
number of the reply equals the answer; 100 held-out questions that never appear in
training, scored greedily before training and after each tool's run. Settings for both
tools: default model, LoRA r=16 all-linear, lr 5e-5, beta 0.04, 2 prompts x 4 generations,
48 new tokens, temperature 0.7. Each tool trains in its own child process until the budget
is spent. Prints one JSON line per tool (steps done, accuracy before/after) and writes
`--plot` (reward per step, 10-step average, against wall-clock minutes, both tools).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from _child import emit, prepare_environment, run_worker
from pathlib import Path

TASK_OPTIONS = {"size": 3000, "eval_size": 100, "seed": 0, "min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2,
                "operators": ["+"], "allow_parentheses": False, "allow_negation": False, "instruction": "Answer with the number only."}
SETTINGS = {"prompts": 2, "generations": 4, "max_new_tokens": 48, "lr": 5e-5, "beta": 0.04, "rank": 16, "temperature": 0.7}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=15.0)
    parser.add_argument("--tools", default="brainforge,trl")
    parser.add_argument("--plot", default="docs/grpo_learning.png")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


def config_dict(output_dir: str, algorithm: str = "grpo") -> dict:
    """`algorithm: luffy` is the same run with one slot of each group of 4 holding the
    built-in column-method worked solution (`worked:arithmetic`), everything else equal."""
    config = {
        "model": {"name_or_path": "default"},
        "peft": {"lora": {"r": SETTINGS["rank"], "lora_alpha": 2 * SETTINGS["rank"]}},
        "data": {"source": {"name": "reasoning_gym:basic_arithmetic", "type": "prompt", "options": TASK_OPTIONS}},
        "algorithm": {"name": "grpo", "grpo": {
            "num_generations": SETTINGS["generations"], "prompts_per_step": SETTINGS["prompts"],
            "max_new_tokens": SETTINGS["max_new_tokens"], "temperature": SETTINGS["temperature"], "beta": SETTINGS["beta"],
            "reward_functions": [{"name": "last_number"}]}},
        "training": {"output_dir": output_dir, "max_steps": 100000, "learning_rate": SETTINGS["lr"], "lr_scheduler": "constant",
                     "save_every_n_steps": 100000, "seed": 0, "test_prompts": []},
        "logging": {"tensorboard": False},
    }
    if algorithm == "luffy":
        config["algorithm"]["name"] = "luffy"
        config["algorithm"]["off_policy"] = {"traces": ["worked:arithmetic"]}
    return config


def train_brainforge(budget_s: float, out: Path, algorithm: str = "grpo") -> dict:
    import lightning as L

    from brainforge.config import validate_config
    from brainforge.data.templates import chat_format
    from brainforge.training.checkpointing import write_adapter
    from brainforge.training.grpo_run import PromptDataModule, build_rl_module, prepare_rl_inputs
    from brainforge.training.run import load_policy

    config = validate_config(config_dict(str(out), algorithm))
    L.seed_everything(0, verbose=False)
    inputs = prepare_rl_inputs(config)
    model, tokenizer = load_policy(config)
    template = chat_format("chatml", tokenizer).template
    module = build_rl_module(config, model, tokenizer, template, inputs, 100000)
    started = time.perf_counter()

    class Budget(L.Callback):
        def on_train_batch_end(self, trainer, *a):
            if time.perf_counter() - started > budget_s:
                trainer.should_stop = True

    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=100000, logger=False, callbacks=[Budget()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=PromptDataModule(inputs.prompts, SETTINGS["prompts"]))
    write_adapter(model, tokenizer, template, out / "adapter", {"model": "default"})
    elapsed, curve = 0.0, []
    for h in module.history:
        elapsed += h["time/step_s"]
        curve.append((elapsed / 60, h.get("reward/on_policy_mean", h["reward/mean"])))  # luffy: the model's own samples
    return {"steps": trainer.global_step, "curve": curve}


def train_trl(budget_s: float, out: Path) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from brainforge.data.prompts import reasoning_gym_prompts
    from brainforge.models.gguf import ensure_default_model
    from brainforge.models.loader import load_tokenizer
    from brainforge.rewards.correctness import last_number_match

    torch.manual_seed(0)
    path = str(ensure_default_model())
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = reasoning_gym_prompts("basic_arithmetic", dict(TASK_OPTIONS), "train")
    dataset = datasets.Dataset.from_list([{"prompt": p.messages, "answer": p.columns["answer"]} for p in prompts])

    def reward(prompts, completions, answer, **kwargs):
        return last_number_match(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions], answer=answer)

    started = time.perf_counter()
    curve: list[tuple[float, float]] = []

    class Budget(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **k):
            if logs and "reward" in logs:
                curve.append(((time.perf_counter() - started) / 60, logs["reward"]))

        def on_step_end(self, args, state, control, **k):
            if time.perf_counter() - started > budget_s:
                control.should_training_stop = True

    config = GRPOConfig(
        output_dir=str(out / "trl"), max_steps=100000, per_device_train_batch_size=SETTINGS["prompts"] * SETTINGS["generations"],
        num_generations=SETTINGS["generations"], max_completion_length=SETTINGS["max_new_tokens"], beta=SETTINGS["beta"],
        learning_rate=SETTINGS["lr"], lr_scheduler_type="constant", temperature=SETTINGS["temperature"], logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=LoraConfig(r=SETTINGS["rank"], lora_alpha=2 * SETTINGS["rank"], target_modules="all-linear",
                                                 task_type="CAUSAL_LM"), callbacks=[Budget()])
    trainer.train()
    trainer.model.save_pretrained(str(out / "adapter"))
    tokenizer.save_pretrained(str(out / "adapter"))
    (out / "adapter" / "brainforge_adapter.json").write_text(json.dumps({"model": "default"}))
    return {"steps": trainer.state.global_step, "curve": curve}


def held_out_accuracy(adapter: Path | None) -> float:
    from brainforge.config import validate_config
    from brainforge.evaluation import evaluate, held_out_prompts
    from brainforge.inference import load_chat_model

    config = validate_config(config_dict("/tmp"))
    chat = load_chat_model(adapter=adapter, model="default")
    return evaluate(chat.model, chat.tokenizer, config, held_out_prompts(config, None), "x", k=0).greedy_accuracy


def main() -> None:
    args = parse_args()
    prepare_environment(worker=bool(args.worker))
    if args.worker:
        out = Path(args.out)
        if args.worker == "base":
            result = {"accuracy": held_out_accuracy(None)}
        else:
            if args.worker == "trl":
                result = train_trl(args.budget_minutes * 60, out)
            else:
                result = train_brainforge(args.budget_minutes * 60, out, "luffy" if args.worker == "luffy" else "grpo")
            result["accuracy_after"] = held_out_accuracy(out / "adapter")
        emit(result)
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="brainforge-grpo-learning-"))
    context = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "budget_minutes": args.budget_minutes, "settings": SETTINGS, "held_out": TASK_OPTIONS["eval_size"]}

    def child(worker: str) -> dict | None:
        return run_worker(__file__, ["--budget-minutes", str(args.budget_minutes), "--out", str(workdir / worker)], worker)

    base = child("base")
    before = base["accuracy"] if base else None
    curves = {}
    for tool in [t for t in args.tools.split(",") if t]:
        result = child(tool)
        if result is None:
            continue
        curves[tool] = result["curve"]
        print(json.dumps({"tool": tool, "steps": result["steps"], "held_out_accuracy_before": before,
                          "held_out_accuracy_after": result["accuracy_after"], **context}), flush=True)
    if curves:
        plot(curves, Path(args.plot), args.budget_minutes)


def plot(curves: dict[str, list], path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4))
    for tool, curve in curves.items():
        minutes = [c[0] for c in curve]
        rewards = [c[1] for c in curve]
        smooth = [sum(rewards[max(0, i - 9) : i + 1]) / len(rewards[max(0, i - 9) : i + 1]) for i in range(len(rewards))]
        axis.plot(minutes, smooth, label=f"{tool} ({len(curve)} steps), 10-step average")
    axis.set_xlabel("wall-clock minutes")
    axis.set_ylabel("training reward (share correct)")
    axis.set_title(f"GRPO, two-digit addition, {budget:g}-minute budget")
    axis.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
