"""Does agent training teach? Held-out success of the default tool agent before and after
agent_grpo, APO and agent SFT, each under about the same wall-clock budget.

    python bench/agent.py                                   # 10 minutes per method, 40 held-out tasks
    python bench/agent.py --budget-minutes 5 --methods agent_grpo --test-tasks 24

Agent: `brainforge.agents.tool_agent:solve` (plain OpenAI client, worked examples as earlier
turns), on the bundled `agent:tools` tasks (calculator, read_file, python); held-out = the
first `--test-tasks` of the test split, never trained on, each run once, greedy, against an
in-process policy server (`brainforge eval`'s agent path). Each method trains through
`brainforge train` in a child process from the repository's config (configs/agent_grpo.yaml,
configs/apo.yaml, configs/agent_sft.yaml) with the budget set by `--set`:
* agent_grpo: `training.max_minutes` = budget;
* apo: configs/apo.yaml as it is (2 rounds, beam 2, 2 rewrites per prompt; its wall-clock
  is reported, not cut at the budget);
* agent_sft: collection on the first `--sft-tasks` training tasks, then SFT epochs (its
  wall-clock is reported; it is not cut at the budget).
Prints one JSON line per method (success before/after, per kind, minutes, CPU) and the
command line of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _child import cpu_name, prepare_environment

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--methods", default="agent_grpo,apo,agent_sft")
    parser.add_argument("--test-tasks", type=int, default=40)
    parser.add_argument("--sft-tasks", type=int, default=96)
    parser.add_argument("--workdir", default=None)
    return parser.parse_args()


def overrides(method: str, args: argparse.Namespace, out: Path) -> list[str]:
    common = [f"training.output_dir={out}", f"training.run_name={method}"]
    if method == "agent_grpo":
        return common + ["training.max_steps=1000", f"training.max_minutes={args.budget_minutes}"]
    if method == "apo":
        return common                                       # configs/apo.yaml's search: about the budget here
    return common + [f"data.source.max_samples={args.sft_tasks}"]


def train(method: str, args: argparse.Namespace, out: Path) -> tuple[Path, float, list[str]]:
    config = REPO / "configs" / f"{method}.yaml"
    command = [sys.executable, "-m", "brainforge", "train", str(config)]
    for item in overrides(method, args, out):
        command += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    minutes = (time.perf_counter() - started) / 60
    if done.returncode != 0:
        raise RuntimeError(f"{method} training failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return out / method, minutes, command


def evaluate(config_name: str, adapter: Path | None, limit: int, store: Path) -> dict:
    from brainforge.agents.evaluation import run_agent_eval
    from brainforge.config import load_config

    config = load_config(REPO / "configs" / f"{config_name}.yaml")
    results = run_agent_eval(config, adapter, limit, store, include_base=adapter is None)
    return results[-1].as_dict()


def main() -> None:
    args = parse_args()
    prepare_environment(worker=False)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-agent-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "eval_traces.sqlite"
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    started = time.perf_counter()
    base = evaluate("agent_grpo", None, args.test_tasks, store)
    print(json.dumps({"method": "base", **base, **machine}), flush=True)
    for method in args.methods.split(","):
        try:
            run, minutes, command = train(method, args, workdir)
            after = evaluate(method, run, args.test_tasks, store)
        except Exception as exc:  # reported, and the other methods still run
            print(json.dumps({"method": method, "error": str(exc)[-2000:]}), flush=True)
            continue
        extra: dict = {}
        if (run / "metrics.json").is_file():
            metrics = json.loads((run / "metrics.json").read_text())
            extra = {"steps": metrics.get("steps"), "seconds_per_step": metrics.get("seconds_per_step"),
                     "train_reward_first5": metrics.get("reward_first5_mean"), "train_reward_last5": metrics.get("reward_last5_mean")}
        if (run / "apo.json").is_file():
            apo = json.loads((run / "apo.json").read_text())
            extra = {"apo_seed_validation": apo.get("seed_validation_score"), "apo_best_validation": apo.get("best_validation_score"),
                     "apo_seed_test": apo.get("seed_test_score"), "apo_best_test": apo.get("best_test_score"),
                     "apo_candidates": len(apo.get("candidates", [])), "best_prompt": apo.get("best_prompt")}
        print(json.dumps({"method": method, "success_before": base["success_rate"], "success_after": after["success_rate"],
                          "by_kind_before": base["by_kind"], "by_kind_after": after["by_kind"],
                          "tool_calls_per_task_after": after["tool_calls_per_task"], "train_minutes": round(minutes, 1),
                          "budget_minutes": args.budget_minutes, "test_tasks": after["tasks"], **extra, **machine,
                          "command": " ".join(command[1:])}), flush=True)
    print(json.dumps({"total_minutes": round((time.perf_counter() - started) / 60, 1), "workdir": str(workdir)}), flush=True)


if __name__ == "__main__":
    main()
