"""Crash soak: `kill -9` SFT and GRPO runs at random moments, resume each time, and check
that nothing was corrupted and little was lost.

    python bench/soak.py                         # 8 minutes per kind, SFT then GRPO
    python bench/soak.py --minutes 3 --kinds sft --seed 1

Each cycle starts `brainforge train CONFIG [--resume]` (the real CLI code path), kills it
with SIGKILL at a seeded random moment (aimed at start-up, at a checkpoint save, or at any
point of the next two save intervals of steps), then verifies every checkpoint folder (the adapter loads with PEFT, the
trainer state loads and names its step, `latest` names a complete one) and resumes. At the
end one more resume runs to completion. Reported per kind (one JSON line each, then a
summary line):
    kills, kills_survived         every kill was followed by a successful resume
    checkpoints_corrupt           folders that fail to load (target 0), latest_invalid likewise
    steps_lost                    steps done before a kill minus the step resumed from
                                  (target: at most one save interval)
    resume_step_mismatches        a resumed run whose first step is not checkpoint step + 1
    curve_jumps                   the first losses (SFT) / KLs (GRPO) after a resume far from
                                  those just before the kill: a resume that lost the weights
                                  or optimizer shows up here
Model: the tiny random Llama (bench/_tiny_model.py) with the default model's tokenizer. It
tests the machinery (checkpoint files, pointer, resume), which does not depend on model
size, and its steps take a fraction of a second, so a few minutes hold dozens of kills.

Process start-up (importing torch, Lightning, transformers) takes far longer than a tiny
training step, so the runs are forked from a "zygote" process that has imported them once
and never runs a tensor op; each run is still its own process, killed with SIGKILL. The
runs log each finished step and each checkpoint save to a progress file (instrumentation
installed in the forked child, nothing in the product changes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _child import cpu_name, prepare_environment

SFT_SOURCES = [
    {"name": "sample:chat", "type": "chat", "weight": 0.5, "max_samples": 16},
    {"name": "sample:coding", "type": "coding", "weight": 0.5, "max_samples": 16},
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0, help="kill/resume cycles per kind for this long (then one final run)")
    parser.add_argument("--kinds", default="sft,grpo")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    parser.add_argument("--startup-kills", type=float, default=0.15,
                        help="share of kills aimed at start-up: uniformly in the first --startup-s seconds")
    parser.add_argument("--startup-s", type=float, default=8.0)
    parser.add_argument("--save-kills", type=float, default=0.25,
                        help="share of kills aimed at a checkpoint save: 0-0.5 s after one starts")
    parser.add_argument("--sft-save-every", type=int, default=5)
    parser.add_argument("--grpo-save-every", type=int, default=2)
    parser.add_argument("--min-kills", type=int, default=20, help="fewer kills than this in the time given fails the run")
    parser.add_argument("--workdir", help="where runs go (default: a temporary folder, removed after)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def length_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """Graded (longer is better, capped), so groups do not tie and the GRPO policy moves."""
    return [min(len(c), 200) / 200 for c in completions]


# ---------------------------------------------------------------------------- configs


def write_configs(work: Path, model: Path, args: argparse.Namespace) -> dict[str, Path]:
    import yaml

    common_training = {"output_dir": str(work / "outputs"), "max_steps": 100000, "lr_scheduler": "constant",
                       "save_total_limit": 2, "test_prompts": [], "seed": 0}
    sft = {
        "model": {"name_or_path": str(model)},
        "peft": {"lora": {"r": 4, "lora_alpha": 8}},
        "datasets": {"multi_source_enabled": True, "sources": SFT_SOURCES},
        "data": {"max_seq_length": 192, "val_split": 0},
        "training": {**common_training, "run_name": "soak-sft", "per_device_batch_size": 2, "learning_rate": 2e-2,
                     "save_every_n_steps": args.sft_save_every},
        "logging": {"level": "WARNING"},
    }
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(16)))
    grpo = {
        "model": {"name_or_path": str(model)},
        "peft": {"lora": {"r": 4, "lora_alpha": 8}},
        "data": {"source": {"path": str(prompts), "type": "prompt"}},
        "algorithm": {"name": "grpo", "grpo": {
            "num_generations": 4, "prompts_per_step": 2, "max_new_tokens": 16, "temperature": 1.0, "beta": 0.04,
            "reward_functions": [{"name": "seed", "weight": 0.5}, {"name": "soak.length_reward"}]}},
        "training": {**common_training, "run_name": "soak-grpo", "learning_rate": 1e-2, "save_every_n_steps": args.grpo_save_every},
        "logging": {"level": "WARNING"},
    }
    paths = {}
    for kind, config in (("sft", sft), ("grpo", grpo)):
        paths[kind] = work / f"soak-{kind}.yaml"
        paths[kind].write_text(yaml.safe_dump(config))
    return paths


# ---------------------------------------------------------------------------- the zygote


def zygote() -> None:
    """Import the heavy modules once, then fork one child per request from stdin."""
    prepare_environment(worker=True)
    import lightning  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import brainforge.cli  # noqa: F401
    import brainforge.training.grpo_run  # noqa: F401
    import brainforge.training.run  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os._exit(_child_main(request))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


def _child_main(request: dict[str, Any]) -> int:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the zygote
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        if request["op"] == "train":
            _instrument(Path(request["progress"]))
            sys.argv = ["brainforge", *request["argv"]]
            from brainforge.cli import main

            try:
                main()
            except SystemExit as exc:
                return exc.code if isinstance(exc.code, int) else 1
            return 0
        if request["op"] == "verify":
            Path(request["out"]).write_text(json.dumps(verify(Path(request["run_dir"]), Path(request["model"]))))
            return 0
        if request["op"] == "build":
            from _tiny_model import build_tiny_model

            build_tiny_model(Path(request["model"]))
            return 0
        return 3
    except BaseException:  # noqa: BLE001 - report anything, the parent reads the log
        import traceback

        traceback.print_exc()
        return 4
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _instrument(progress: Path) -> None:
    """Log every finished step (and its loss / reward / KL) and every checkpoint save."""
    from brainforge.training.checkpointing import AdapterCheckpoint
    from brainforge.training.grpo import GRPOModule
    from brainforge.training.sft import LLMTrainingAgent

    handle = open(progress, "a", buffering=1)  # line-buffered: a kill loses at most the line in flight
    began = time.monotonic()

    def write(row: dict[str, Any]) -> None:
        handle.write(json.dumps({**row, "t": round(time.monotonic() - began, 2)}) + "\n")

    def wrap_step(cls: type) -> None:
        original = cls.training_step

        def training_step(self, batch, batch_idx):
            loss = original(self, batch, batch_idx)
            row = {"step": self.global_step, "loss": float(loss)}
            if isinstance(self, GRPOModule) and self.history:
                row.update(reward=self.history[-1].get("reward/mean"), kl=self.history[-1].get("kl"))
            write(row)
            return loss

        cls.training_step = training_step

    wrap_step(LLMTrainingAgent)
    wrap_step(GRPOModule)
    original_save = AdapterCheckpoint.save

    def save(self, trainer, module):
        write({"save_start": trainer.global_step})
        original_save(self, trainer, module)
        write({"save_end": trainer.global_step})

    AdapterCheckpoint.save = save


def verify(run_dir: Path, model: Path) -> dict[str, Any]:
    """Every checkpoint folder loads (adapter with PEFT, trainer state); `latest` names one."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    checkpoints = run_dir / "checkpoints"
    folders = sorted(p for p in checkpoints.glob("step-*") if p.is_dir())
    corrupt = []
    for folder in folders:
        try:
            state = torch.load(folder / "trainer_state.ckpt", weights_only=False, map_location="cpu")
            if state["global_step"] != int(folder.name.removeprefix("step-")) or not state["state_dict"] or not state["optimizer_states"]:
                raise ValueError(f"state names step {state['global_step']} or lacks weights/optimizer")
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(folder / "adapter"))
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            corrupt.append(f"{folder.name}: {exc!r}"[:300])
    pointer = checkpoints / "latest"
    latest = pointer.read_text().strip() if pointer.exists() else None
    latest_ok = latest is not None and (checkpoints / latest) in folders and not any(c.startswith(latest + ":") for c in corrupt)
    return {"folders": [p.name for p in folders], "corrupt": corrupt, "latest": latest, "latest_ok": latest_ok,
            "latest_step": int(latest.removeprefix("step-")) if latest_ok else 0,
            "leftovers": sorted(p.name for p in checkpoints.glob(".*")) if checkpoints.exists() else []}


# ---------------------------------------------------------------------------- the parent


class Zygote:
    def __init__(self, log: Path):
        self.log = open(log, "a")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _next(self, timeout: float | None) -> dict[str, Any] | None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            raise RuntimeError(f"the zygote died; see {self.log.name}")
        return json.loads(line)

    def start(self, request: dict[str, Any]) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._next(timeout=600)
        if reply is None:
            raise RuntimeError("the zygote did not fork within 600 s")
        return reply["pid"]

    def wait_exit(self, timeout: float | None) -> int | None:
        reply = self._next(timeout)
        return None if reply is None else reply["exit"]

    def run(self, request: dict[str, Any], timeout: float = 900) -> int:
        pid = self.start(request)
        code = self.wait_exit(timeout)
        if code is None:
            os.kill(pid, signal.SIGKILL)
            code = self.wait_exit(None)
            raise RuntimeError(f"{request['op']} did not finish within {timeout} s")
        return code

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_for(zygote: Zygote, progress: Path, target: dict[str, int], timeout: float) -> int | None:
    """Wait until the run logs `target` (e.g. {"step": 12}); its exit code if it ended first."""
    (key, value), = target.items()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(row.get(key, -1) >= value for row in read_progress(progress)):
            return None
        code = zygote.wait_exit(0.1)
        if code is not None:
            return code
    return None


def read_progress(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line in flight at the kill
            pass
    return rows


def soak(kind: str, config: Path, work: Path, model: Path, zygote: Zygote, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    run_dir = work / "outputs" / f"soak-{kind}"
    save_every = args.sft_save_every if kind == "sft" else args.grpo_save_every
    metric = "loss" if kind == "sft" else "kl"
    logs = work / "logs" / kind
    logs.mkdir(parents=True, exist_ok=True)
    kills: list[dict[str, Any]] = []
    errors: list[str] = []
    verified = corrupt = latest_invalid = mismatches = jumps = 0
    leftovers_seen: set[str] = set()
    timeline: dict[int, float] = {}  # step -> metric, along the run that survives
    resumed_from = 0
    started = time.monotonic()
    deadline = started + args.minutes * 60
    cycle = 0
    while time.monotonic() < deadline:
        cycle += 1
        argv = ["train", str(config)] + (["--resume"] if resumed_from else [])
        progress = logs / f"progress-{cycle:03d}.jsonl"
        log = logs / f"run-{cycle:03d}.log"
        # Where to aim (seeded): start-up, a checkpoint save, or any moment of the steps up to
        # two save intervals on (the run must get past a save to make progress at all).
        aim = rng.random()
        if aim < args.startup_kills:
            target, delay = None, rng.uniform(0, args.startup_s)
        elif aim < args.startup_kills + args.save_kills:
            target, delay = {"save_start": resumed_from - resumed_from % save_every + save_every}, rng.uniform(0, 0.5)
        else:
            target, delay = {"step": resumed_from + rng.randint(1, 2 * save_every)}, rng.uniform(0, 1.5)
        pid = zygote.start({"op": "train", "argv": argv, "log": str(log), "progress": str(progress)})
        code = _wait_for(zygote, progress, target, timeout=600) if target else None
        if code is None:
            code = zygote.wait_exit(delay)
        if code is not None:  # it ended by itself: with max_steps 100000 that is an error
            errors.append(f"cycle {cycle}: exited {code} before the kill: {log.read_text()[-800:]}")
            break
        os.kill(pid, signal.SIGKILL)
        zygote.wait_exit(None)
        rows = read_progress(progress)
        steps = [r for r in rows if "step" in r]
        saves_open = {r["save_start"] for r in rows if "save_start" in r} - {r["save_end"] for r in rows if "save_end" in r}
        moment = "saving" if saves_open else ("training" if steps else "starting")
        if steps:
            if steps[0]["step"] != resumed_from + 1:
                mismatches += 1
            before = [timeline[s] for s in sorted(timeline) if s <= resumed_from][-5:]
            after = [r[metric] for r in steps[:3] if r.get(metric) is not None]
            if resumed_from and before and after and _jumped(before, after, metric):
                jumps += 1
            for key in [s for s in timeline if s > resumed_from]:
                del timeline[key]
            timeline.update({r["step"]: r[metric] for r in steps if r.get(metric) is not None})
        done = steps[-1]["step"] if steps else resumed_from

        out = logs / f"verify-{cycle:03d}.json"
        if zygote.run({"op": "verify", "run_dir": str(run_dir), "model": str(model), "out": str(out), "log": str(logs / "verify.log")}) != 0:
            errors.append(f"cycle {cycle}: verification failed to run; see {logs / 'verify.log'}")
            break
        check = json.loads(out.read_text())
        verified += len(check["folders"])
        corrupt += len(check["corrupt"])
        errors.extend(f"cycle {cycle}: corrupt {c}" for c in check["corrupt"])
        leftovers_seen.update(check["leftovers"])
        if check["latest"] is not None and not check["latest_ok"]:
            latest_invalid += 1
            errors.append(f"cycle {cycle}: latest names {check['latest']}, not a complete checkpoint")
        survived = not check["corrupt"] and (check["latest"] is None or check["latest_ok"])
        kills.append({"cycle": cycle, "delay_s": round(delay, 2), "moment": moment, "steps_done": done, "survived": survived,
                      "resumes_from": check["latest_step"], "steps_lost": done - check["latest_step"]})
        resumed_from = check["latest_step"]

    final = _final_run(kind, config, run_dir, logs, zygote, resumed_from, save_every) if not errors else {"ok": False}
    lost = [k["steps_lost"] for k in kills]
    curve = [timeline[s] for s in sorted(timeline)]
    return {
        "bench": "soak", "kind": kind, "model": "tiny (bench/_tiny_model.py)", "minutes": args.minutes, "seed": args.seed,
        "save_every_n_steps": save_every,
        "kills": len(kills),
        "kills_by_moment": {m: sum(k["moment"] == m for k in kills) for m in ("starting", "training", "saving")},
        "kills_survived": sum(k["survived"] for k in kills),  # left a loadable latest (or none yet) and no corrupt folder
        "checkpoints_verified": verified, "checkpoints_corrupt": corrupt, "latest_invalid": latest_invalid,
        "steps_lost_max": max(lost, default=0), "steps_lost_mean": round(sum(lost) / len(lost), 2) if lost else 0,
        "steps_lost_within_one_interval": all(x <= save_every for x in lost),
        "resume_step_mismatches": mismatches, f"{metric}_jumps_after_resume": jumps,
        f"{metric}_curve": {"steps": len(curve), "first": _round(curve[0]) if curve else None,
                            "last5_mean": _round(sum(curve[-5:]) / len(curve[-5:])) if curve else None},
        "leftover_temporaries_seen": sorted(leftovers_seen)[:10],
        "final_resume": final,
        "seconds": round(time.monotonic() - started, 1),
        "errors": errors[:10],
    }


def _jumped(before: list[float], after: list[float], metric: str) -> bool:
    """The first values after a resume far outside those just before the kill.

    SFT loss: above 1.5x the highest of the last five before (per-batch loss varies, a
    resume without weights goes back to the untrained ~ln(vocab)). GRPO KL: back near zero
    (below a tenth of the lowest of the last five) while it was clearly positive: the
    adapter was reset to its zero initialisation."""
    mean_after = sum(after) / len(after)
    if metric == "loss":
        return mean_after > 1.5 * max(before)
    return min(before) > 1e-4 and mean_after < 0.1 * min(before)


def _final_run(kind: str, config: Path, run_dir: Path, logs: Path, zygote: Zygote, resumed_from: int, save_every: int) -> dict[str, Any]:
    """Resume once more and let it finish: the run completes after all the kills."""
    target = resumed_from + save_every
    argv = ["train", str(config), "--set", f"training.max_steps={target}"] + (["--resume"] if resumed_from else [])
    log = logs / "final.log"
    code = zygote.run({"op": "train", "argv": argv, "log": str(log), "progress": str(logs / "progress-final.jsonl")})
    metrics_path = run_dir / "metrics.json"
    steps = json.loads(metrics_path.read_text()).get("steps") if metrics_path.exists() else None
    return {"ok": code == 0 and steps == target, "exit": code, "steps": steps, "expected_steps": target,
            **({} if code == 0 else {"log_tail": log.read_text()[-600:]})}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def main() -> None:
    args = parse_args()
    if args.worker == "zygote":
        zygote()
        return
    prepare_environment(worker=False)
    rng = random.Random(args.seed)
    temporary = None if args.workdir else tempfile.TemporaryDirectory(prefix="brainforge-soak-")
    work = Path(args.workdir or temporary.name)
    work.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    zygote_process = Zygote(work / "zygote.log")
    results = []
    try:
        model = work / "tiny-model"
        if zygote_process.run({"op": "build", "model": str(model), "log": str(work / "build.log")}) != 0:
            raise SystemExit(f"building the tiny model failed: {(work / 'build.log').read_text()[-2000:]}")
        configs = write_configs(work, model, args)
        for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
            result = {**soak(kind, configs[kind], work, model, zygote_process, args, rng), **machine}
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        zygote_process.close()
        if temporary:
            temporary.cleanup()
    ok = all(r["kills"] >= args.min_kills and r["checkpoints_corrupt"] == 0 and r["latest_invalid"] == 0
             and r["steps_lost_within_one_interval"] and r["resume_step_mismatches"] == 0 and not r["errors"]
             and r["final_resume"].get("ok") and not any(v for k, v in r.items() if k.endswith("_jumps_after_resume"))
             for r in results)
    print(json.dumps({"bench": "soak", "summary": {r["kind"]: {"kills": r["kills"], "corrupt": r["checkpoints_corrupt"],
                                                                 "steps_lost_max": r["steps_lost_max"],
                                                                 "save_every_n_steps": r["save_every_n_steps"]} for r in results},
                      "ok": ok, **machine}), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
