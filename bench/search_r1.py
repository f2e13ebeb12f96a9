"""Does searching pay? Held-out answers on the offline country QA task (`qa:countries`: facts
from the `countryinfo` package, questions about 40 countries never trained on) for:

    closed-book      the base model, the question alone
    naive RAG        the base model, the top 3 results of the same retriever in the prompt
                     (what most users would do instead of training)
    search prompt    the base model with the Search-R1 instruction, untrained (the cold start)
    search_r1/<cs>   the trained Search-R1 policy, one per cold start (luffy, sft)
    reason           the two-phase pipeline's final adapter (LUFFY, then Search-R1 from it)

    python bench/search_r1.py --work /tmp/search_r1_bench
    python bench/search_r1.py --work DIR --train none          # baselines only
    python bench/search_r1.py --work DIR --train reuse         # score the runs already in DIR

Training goes through the product path (`brainforge train` / `brainforge reason`, in child
processes) with configs/reasoning.yaml's settings; every figure is greedy, on the same
held-out questions and the same store. Scores: exact match of the last `<answer>` (or of
the whole reply when it has none), token F1, `contains` (a gold answer's words appear in the
answer: fair to a model that answers in a sentence), answer rate, searches per question.
Prints one JSON line per model and writes the learning curves (`--plot`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _child import cpu_name, prepare_environment

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "reasoning.yaml"
CLOSED_BOOK = "Answer the question. Give only the answer inside <answer> </answer>, for example <answer> Paris </answer>.\nQuestion: {question}"
WITH_CONTEXT = "Context:\n{context}\n\n" + CLOSED_BOOK


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the task, the store and the runs (reused)")
    parser.add_argument("--held-out", type=int, default=100, help="held-out questions scored (of 227)")
    parser.add_argument("--steps", type=int, default=20, help="Search-R1 steps (standalone and phase 2)")
    parser.add_argument("--phase1-steps", type=int, default=10)
    parser.add_argument("--runs", default="luffy,sft,reason",
                        help="what to train: search_r1 alone per cold start (luffy, sft), and/or the reason pipeline")
    parser.add_argument("--warmup-steps", type=int, default=30, help="sft cold start: supervised steps before RL")
    parser.add_argument("--train", choices=["all", "reuse", "none"], default="all",
                        help="reuse: score the runs already in --work (all of them), none: baselines only")
    parser.add_argument("--no-score", action="store_true", help="train only (score later with --train reuse)")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run, key=value")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "search_r1.png"))
    return parser.parse_args()


def brainforge(*args: str) -> None:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "brainforge", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"brainforge {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    print(json.dumps({"command": "brainforge " + " ".join(args), "seconds": round(time.perf_counter() - started, 1)}), flush=True)


def prepare_task(work: Path) -> Path:
    """The documents, questions and store, built once per work folder."""
    store = work / "store"
    if not (work / "countries" / "docs").is_dir():
        brainforge("qa", "countries", str(work / "countries"))
    if not store.is_dir():
        brainforge("ingest", str(work / "countries" / "docs"), "--store", str(store))
    return store


def overrides(args: argparse.Namespace, store: Path, outputs: Path) -> list[str]:
    """Every run gets `--steps` RL steps in phase 2; with the sft cold start (the default)
    its `--warmup-steps` supervised steps come on top."""
    return [f"memory.store={store}", f"training.output_dir={outputs}",
            f"reason.phase2.training.max_steps={args.steps + args.warmup_steps}",
            f"reason.phase2.algorithm.search.warmup_steps={args.warmup_steps}",
            f"reason.phase1.training.max_steps={args.phase1_steps}", *args.set]


def train_runs(args: argparse.Namespace, store: Path) -> dict[str, Path]:
    """search_r1 alone per cold start (phase 2's config, from the base model), and the pipeline."""
    from brainforge.config import dump_config, load_reason_config

    work = Path(args.work)
    wanted = [r for r in args.runs.split(",") if r]
    for cold_start in [r for r in wanted if r != "reason"] if args.train == "all" else []:
        outputs = work / "outputs" / f"search_r1-{cold_start}"
        phase2 = load_reason_config(CONFIG, overrides(args, store, outputs) + [f"reason.phase2.algorithm.search.cold_start={cold_start}"])["phase2"]
        phase2.model.adapter_path = None
        if cold_start != "sft":
            phase2.training.max_steps = args.steps
        path = work / f"search_r1-{cold_start}.yaml"
        dump_config(phase2, path)
        brainforge("train", str(path))
    if "reason" in wanted and args.train == "all":
        brainforge("reason", str(CONFIG), *[item for o in overrides(args, store, work / "outputs" / "reason") for item in ("--set", o)])
    runs: dict[str, Path] = {}
    for outputs in sorted((work / "outputs").glob("search_r1-*")):
        runs[f"search_r1/{outputs.name.removeprefix('search_r1-')}"] = latest(outputs)
    if (work / "outputs" / "reason").is_dir():
        runs["reason"] = latest(work / "outputs" / "reason") / "phase2"
    return runs


def latest(outputs: Path) -> Path:
    """The newest run folder under `outputs`; a run stopped before its end counts with its
    last checkpoint (scored as such: its `steps` are the checkpoint's)."""
    found = sorted(p for p in outputs.iterdir() if p.is_dir()) if outputs.is_dir() else []
    if not found:
        raise SystemExit(f"no run in {outputs}; train first (--train all)")
    return found[-1]


def trained_adapter(run: Path) -> tuple[Path, int | None]:
    """The run's final adapter and its steps, or its last checkpoint's when it was stopped."""
    if (run / "adapter").is_dir():
        metrics = run / "metrics.json"
        return run, json.loads(metrics.read_text()).get("steps") if metrics.is_file() else None
    checkpoints = sorted((run / "checkpoints").glob("step-*/adapter"))
    if not checkpoints:
        raise SystemExit(f"{run} has neither an adapter nor a checkpoint")
    return checkpoints[-1], int(checkpoints[-1].parent.name.removeprefix("step-"))


def score_all(args: argparse.Namespace, store: Path, runs: dict[str, Path]) -> list[dict]:
    from brainforge.config import load_reason_config
    from brainforge.data.prompts import PromptExample
    from brainforge.evaluation import evaluate_qa, held_out_prompts, qa_figures
    from brainforge.inference import load_chat_model
    from brainforge.reasoning.rollout import tags_of
    from brainforge.reasoning.search_tool import MemorySearch

    config = load_reason_config(CONFIG, overrides(args, store, Path(args.work) / "outputs" / "scoring"))["phase2"]
    prompts = held_out_prompts(config, args.held_out)
    search = MemorySearch(config.memory, config.algorithm.search)
    questions = [str(p.columns["question"]) for p in prompts]
    golds = [p.columns["answer"] for p in prompts]
    contexts = search(questions)
    from brainforge.rewards.search_r1 import contains_gold, gold_answers

    found = sum(contains_gold(" ".join(texts), gold_answers(g) or []) for texts, g in zip(contexts, golds))
    results = [{"model": "retriever alone (question as query)", "gold_in_top3": round(found / len(questions), 4)}]
    print(json.dumps(results[0]), flush=True)
    base = load_chat_model(model=config.model.name_or_path)

    def single_turn(label: str, template: str, context: list[list[str]] | None) -> None:
        started = time.perf_counter()
        asked = [PromptExample([{"role": "user", "content": template.format(
            question=q, context="\n".join(f"[{i}] {t}" for i, t in enumerate(context[n], start=1)) if context else "")}],
            {"answer": g}) for n, (q, g) in enumerate(zip(questions, golds))]
        texts = generate_greedy(base, asked, config.algorithm.grpo.max_new_tokens)
        results.append(report(label, qa_figures(texts, golds, tags_of(config.algorithm.search)), started, len(prompts)))

    single_turn("closed-book", CLOSED_BOOK, None)
    single_turn("naive RAG (top 3 in the prompt)", WITH_CONTEXT, contexts)
    results.append(evaluate_qa(base.model, base.tokenizer, config, prompts, "search prompt, untrained", search).as_dict())
    print(json.dumps(results[-1]), flush=True)
    for label, run in runs.items():
        adapter, steps = trained_adapter(run)
        tuned = load_chat_model(adapter=adapter, model=config.model.name_or_path)
        row = evaluate_qa(tuned.model, tuned.tokenizer, config, prompts, label, search).as_dict()
        row.update(run=str(run), adapter=str(adapter), steps=steps, stopped_early=adapter != run)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def generate_greedy(chat, prompts, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    from brainforge.data.templates import chat_format
    from brainforge.generation.engine import GenerationEngine, SamplingParams

    template = chat_format("chatml", chat.tokenizer).template
    engine = GenerationEngine.for_chat(chat.model, chat.tokenizer)
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids = [chat.tokenizer(chat.tokenizer.apply_chat_template(p.messages, chat_template=template, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
        texts += engine.generate(ids, 1, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)).texts
    return texts


def report(label: str, figures: dict, started: float, n: int) -> dict:
    row = {"model": label, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()},
           "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(row), flush=True)
    return row


def learning_curves(runs: dict[str, Path], path: Path) -> dict[str, dict[str, list[float]]]:
    """Per run, per step: the reward of the policy's own samples (traces excluded), and the
    share of its rollouts that searched and that answered."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[str, list[float]]] = {}
    for label, run in runs.items():
        found: dict[str, list[tuple[int, float]]] = {}
        for events in (run / "tensorboard").glob("events.out.tfevents.*"):
            accumulator = EventAccumulator(str(events))
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        own = "reward/on_policy_mean" if "reward/on_policy_mean" in found else "reward/mean"
        curves[label] = {name: [v for _, v in sorted(found.get(tag, []))]
                         for name, tag in (("own_reward", own), ("search_rate", "search/call_rate"), ("answer_rate", "search/answer_rate"))}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for label, curve in curves.items():
        for axis, name in zip(axes, ("own_reward", "search_rate", "answer_rate")):
            values = curve[name]
            window = [sum(values[max(0, i - 4): i + 1]) / len(values[max(0, i - 4): i + 1]) for i in range(len(values))]
            axis.plot(range(1, len(window) + 1), window, label=label)
            axis.set_title({"own_reward": "reward of own samples (5-step mean)", "search_rate": "rollouts that searched",
                            "answer_rate": "rollouts that answered"}[name])
            axis.set_xlabel("RL step")
    axes[0].legend(loc="best", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return curves


def main() -> None:
    args = parse_args()
    prepare_environment(worker=False)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    store = prepare_task(work)
    runs = train_runs(args, store) if args.train != "none" else {}
    if args.no_score:
        return
    results = score_all(args, store, runs)
    curves = learning_curves(runs, Path(args.plot)) if runs else {}
    summary = {"benchmark": "search_r1", "cpu": cpu_name(), "cores": os.cpu_count(), "held_out": args.held_out,
               "steps": args.steps, "phase1_steps": args.phase1_steps, "command": " ".join(sys.argv),
               "minutes": round((time.perf_counter() - started) / 60, 1),
               "results": [{k: r[k] for k in ("model", "exact_match", "f1", "contains", "answer_rate", "searches_per_question", "gold_in_top3") if k in r}
                           for r in results], "curves": curves}
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}), flush=True)


if __name__ == "__main__":
    main()
