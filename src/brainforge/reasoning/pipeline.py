"""`brainforge reason CONFIG`: the seed's two-phase pipeline in one run folder.

Phase 1 (luffy, exgrpo or hybrid) teaches the model to reason; phase 2 (search_r1) starts
from phase 1's final adapter and teaches it to search the memory store. Each phase is an
ordinary training run (`training.run.train`), so each has the usual run folder:

    outputs/<config name>-<timestamp>/      (or training.run_name)
        reason.json         phases, their status, steps, adapter and metrics paths
        phase1/             adapter/, checkpoints/, tensorboard/, config.yaml, metrics.json, ...
        phase2/             the same; config.yaml has model.adapter_path = ../phase1/adapter

What can be checked before phase 1 is checked before the run folder exists: both phases'
configs, phase 2's prompts and its store (a missing store would otherwise fail after the
whole of phase 1). `--resume` continues the latest run of the config: a phase that
reason.json marks done and whose adapter exists is skipped, an unfinished one continues
from its last checkpoint (or starts again if it wrote none).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from brainforge.config import BrainforgeConfig, load_reason_config
from brainforge.errors import BrainforgeError, ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "reason.json"
PHASES = ("phase1", "phase2")

TrainFunction = Callable[..., Path]
"""`(config, config_path, resume, resume_command=...) -> run folder`: `training.run.train`
(a stand-in in tests)."""


def check_before_phase1(phases: dict[str, BrainforgeConfig], config_path: Path) -> None:
    """Everything that can fail before phase 1 trains: both phases' output folder and
    phase 1's adapters (preflight), and phase 2's prompts and store. Nothing is written."""
    from brainforge.training.grpo_run import prepare_rl_inputs
    from brainforge.training.preflight import preflight

    estimate = preflight(phases["phase1"])
    if estimate is not None:
        log.info("phase1: %s", estimate.summary())
    prepare_rl_inputs(phases["phase2"], config_path)  # the store (naming `brainforge ingest`) and the QA prompts


def run_reason(config_path: Path, overrides: list[str] | None = None, resume: bool = False,
               train: TrainFunction | None = None) -> Path:
    """Run (or resume) both phases and return the pipeline's run folder."""
    phases = load_reason_config(config_path, overrides)
    for phase, config in phases.items():
        if config.hardware.devices != 1 or config.hardware.num_nodes != 1:
            # Lightning starts DDP workers by running the command line again: each would start its own pipeline.
            raise ConfigError(f"{config_path}: hardware.devices / hardware.num_nodes ({phase}): brainforge reason runs "
                              "each phase in one process; set hardware.devices: 1, or train the phases one by one "
                              "with brainforge train (phase 2 with model.adapter_path: <phase 1 run>/adapter)")
    check_before_phase1(phases, config_path)
    if train is None:
        from brainforge.training.run import train as train_run

        train = train_run
    run_dir = reason_run_dir(phases["phase1"], config_path, resume)
    state = read_state(run_dir) if resume else None
    state = state or new_state(phases, config_path)
    write_state(run_dir, state)
    for phase in PHASES:
        config = phases[phase]
        record = state["phases"][phase]
        phase_dir = run_dir / phase
        if record["status"] == "done" and (phase_dir / "adapter" / "adapter_config.json").is_file():
            log.info("%s: done in an earlier run (%s steps), skipped", phase, record.get("steps"))
            continue
        config.training.output_dir = str(run_dir)
        config.training.run_name = phase
        if phase == "phase2":
            config.model.adapter_path = str(run_dir / "phase1" / "adapter")
            from brainforge.training.preflight import preflight

            preflight(config)  # phase 1's adapter must be complete before phase 2 loads it
        from brainforge.training.checkpointing import latest_checkpoint

        continue_phase = resume and latest_checkpoint(phase_dir / "checkpoints") is not None
        log.info("%s: %s (%s)%s", phase, config.algorithm.name, phase_dir, ", resuming from its last checkpoint" if continue_phase else "")
        record.update(status="running", run_dir=str(phase_dir))
        write_state(run_dir, state)
        try:
            train(config, config_path, continue_phase, resume_command=f"brainforge reason {config_path} --resume")
        except BaseException as exc:
            record.update(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                          error=f"{type(exc).__name__}: {exc}"[:500])
            state["status"] = record["status"]
            write_state(run_dir, state)
            raise
        record.pop("error", None)
        record.update(status="done", adapter=str(phase_dir / "adapter"), metrics=str(phase_dir / "metrics.json"),
                      steps=_steps(phase_dir / "metrics.json"))
        write_state(run_dir, state)
    state["status"] = "done"
    write_state(run_dir, state)
    return run_dir


def new_state(phases: dict[str, BrainforgeConfig], config_path: Path) -> dict[str, Any]:
    return {"config": str(Path(config_path).resolve()), "status": "running", "started": datetime.now().isoformat(timespec="seconds"),
            "phases": {phase: {"algorithm": phases[phase].algorithm.name, "status": "pending"} for phase in PHASES}}


def reason_run_dir(config: BrainforgeConfig, config_path: Path, resume: bool) -> Path:
    """`output_dir/<run_name or config name-timestamp>`; with resume, the run_name folder or
    the latest run of this config that has a reason.json."""
    output_dir = Path(config.training.output_dir)
    name = config.training.run_name
    if resume:
        prefix = name or Path(config_path).stem
        candidates = [p for p in output_dir.glob(f"{prefix}*") if (p / STATE_FILE).is_file()]
        if name:
            candidates = [p for p in candidates if p.name == name]
        if not candidates:
            raise BrainforgeError(f"--resume: no reason run of '{prefix}' (a folder with {STATE_FILE}) under {output_dir}; "
                                  f"start one with: brainforge reason {config_path}")
        return max(candidates, key=lambda p: (p / STATE_FILE).stat().st_mtime).resolve()
    run_dir = output_dir / (name or f"{Path(config_path).stem}-{datetime.now():%Y%m%d-%H%M%S}")
    if (run_dir / STATE_FILE).exists():
        raise BrainforgeError(f"{run_dir} already holds a reason run; pass --resume to continue it or choose another training.run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir.resolve()


def read_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BrainforgeError(f"{path}: unreadable ({exc}); it records which phases are done. Remove the run folder "
                              "and start again, or restore the file") from None
    if not isinstance(state, dict) or not isinstance(state.get("phases"), dict) or set(state["phases"]) != set(PHASES):
        raise BrainforgeError(f"{path}: not a brainforge reason state file (no phase1/phase2 records)")
    return state


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Written beside and renamed into place: an interruption never leaves half a file."""
    path = run_dir / STATE_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(state, indent=2))
    os.replace(temporary, path)


def _steps(metrics: Path) -> int | None:
    try:
        return int(json.loads(metrics.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
