"""Checkpoints under crashes, and resume that really restores the run (SFT and GRPO).

Crash injection: every file-system step of a checkpoint save (and of writing the final
adapter over an existing one) is made to fail in turn, the way a kill at that instant would
leave things: nothing after it runs. After each, the previous checkpoint and `latest` must be
intact and loadable, and no incomplete folder may carry a final name. This catches, e.g., a
checkpoint written straight into `step-N/`, or `latest` updated before the rename.

Runs in-process on the tiny model (a few seconds of training per test).
"""

from __future__ import annotations

import builtins
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import write_config

from brainforge.config import load_config
from brainforge.training import checkpointing, grpo_run, run
from brainforge.training.checkpointing import LATEST, STATE_FILE, latest_checkpoint, write_adapter


class Crash(BaseException):
    """A simulated kill: BaseException, so no library's `except Exception` can swallow it."""


class CrashAt:
    """Count file-system operations; raise Crash at operation number `at` (1-based)."""

    def __init__(self, at: int):
        self.at = at
        self.count = 0
        self.where = ""

    def tick(self, what: str) -> None:
        self.count += 1
        if self.count == self.at:
            self.where = what
            raise Crash(what)


def inject(monkeypatch: pytest.MonkeyPatch, crash: CrashAt) -> None:
    """Make every write, rename, fsync, mkdir and delete a possible crash point."""
    real_open, real_replace, real_rename, real_fsync, real_mkdir = builtins.open, os.replace, os.rename, os.fsync, os.mkdir
    real_rmtree, real_exchange = shutil.rmtree, checkpointing._exchange

    def open_(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            crash.tick(f"open {file} for writing")
        return real_open(file, mode, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        crash.tick(f"rename {src} -> {dst}")
        return real_replace(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        crash.tick(f"rename {src} -> {dst}")
        return real_rename(src, dst, *args, **kwargs)

    def fsync(fd):
        crash.tick("fsync")
        return real_fsync(fd)

    def mkdir(path, *args, **kwargs):
        crash.tick(f"mkdir {path}")
        return real_mkdir(path, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        try:
            crash.tick(f"delete {path}")
        except Crash:  # killed halfway through deleting: some files gone, some left
            first = next((p for p in Path(path).rglob("*") if p.is_file()), None)
            if first is not None:
                first.unlink()
            raise
        return real_rmtree(path, *args, **kwargs)

    def exchange(first, second):
        crash.tick(f"swap {first} <-> {second}")
        return real_exchange(first, second)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(checkpointing, "_exchange", exchange)


class AtStep:
    """The finished run's trainer, seen at a later step: the save under test writes `step-N`
    for that step while the run's own checkpoint is the previous one."""

    def __init__(self, trainer: Any, step: int):
        self._trainer = trainer
        self.global_step = step

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)


def train_in_process(config_path: Path, resume: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """`brainforge train` in this process; returns the run folder and the live trainer objects."""
    captured: dict[str, Any] = {}
    real_build = run.build_trainer

    def build(config, run_dir, total_steps, checkpointer, has_val):
        captured["checkpointer"] = checkpointer
        captured["trainer"] = real_build(config, run_dir, total_steps, checkpointer, has_val)
        return captured["trainer"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "build_trainer", build)
        patch.setattr(grpo_run, "build_trainer", build)
        captured["run_dir"] = run.train(load_config(config_path, overrides), config_path, resume=resume)
    return captured


def sft_config(tmp_path: Path, model: Path, **training: Any) -> Path:
    return write_config(tmp_path / "ckpt.yaml", model, data={"val_split": 0},
                        training={"max_steps": 2, "save_every_n_steps": 2, "run_name": "ckpt", "test_prompts": [],
                                  "learning_rate": 5e-3, **training},
                        logging={"level": "WARNING", "tensorboard": False})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("finished")
    captured = train_in_process(sft_config(tmp, tiny_model_dir))
    assert (captured["run_dir"] / "checkpoints" / LATEST).read_text() == "step-000002"
    return captured


@pytest.fixture(scope="module")
def peft_loader(tiny_model_dir):
    """Load an adapter folder into one PEFT model (built once): proves the files are complete."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))

    def load(adapter: Path) -> None:
        config = LoraConfig.from_pretrained(str(adapter))
        assert config.r == 4
        result = set_peft_model_state_dict(model, load_peft_weights(str(adapter)))
        assert not result.unexpected_keys, result.unexpected_keys
        json.loads((adapter / "brainforge_adapter.json").read_text())

    return load


def assert_checkpoints_intact(checkpoints: Path, load_adapter, allowed_latest: set[str], where: str) -> str:
    """`latest` names a complete checkpoint; every folder under a final name is complete."""
    latest = latest_checkpoint(checkpoints)
    assert latest is not None, f"after a crash at <{where}>: `latest` names no complete checkpoint"
    assert latest.name in allowed_latest, f"after a crash at <{where}>: latest is {latest.name}"
    for folder in checkpoints.glob("step-*"):
        assert (folder / STATE_FILE).exists(), f"after a crash at <{where}>: {folder.name} has no {STATE_FILE}"
        state = torch.load(folder / STATE_FILE, weights_only=False, map_location="cpu")
        assert state["state_dict"] and state["optimizer_states"], f"after a crash at <{where}>: {folder.name} state incomplete"
        try:
            load_adapter(folder / "adapter")
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            pytest.fail(f"after a crash at <{where}>: {folder.name}/adapter does not load: {exc!r}")
    return latest.name


def test_a_crash_at_any_point_of_a_checkpoint_save_keeps_the_previous_one(finished_run, peft_loader, monkeypatch, tmp_path):
    checkpoints = finished_run["run_dir"] / "checkpoints"
    checkpointer, trainer = finished_run["checkpointer"], finished_run["trainer"]
    module = trainer.lightning_module
    pristine = tmp_path / "pristine"
    shutil.copytree(checkpoints, pristine)
    crashed_at: list[str] = []
    try:
        monkeypatch.setattr(checkpointer, "keep", 1)  # so the save also prunes step 2 once step 4 is complete
        for at in range(1, 500):
            shutil.rmtree(checkpoints)
            shutil.copytree(pristine, checkpoints)
            checkpointer._last_saved = -1
            crash = CrashAt(at)
            with monkeypatch.context() as patch:
                inject(patch, crash)
                try:
                    checkpointer.save(AtStep(trainer, 4), module)
                except Crash:
                    pass
            if not crash.where:  # the save ran to the end: every point has been tried
                break
            crashed_at.append(crash.where)
            latest = assert_checkpoints_intact(checkpoints, peft_loader, {"step-000002", "step-000004"}, crash.where)
            if latest == "step-000002":
                assert (checkpoints / "step-000002" / "adapter" / "adapter_model.safetensors").exists()
        # The points tried include the ones that matter: the state file, the adapter, the rename, the pointer.
        assert len(crashed_at) >= 10, crashed_at
        assert any(STATE_FILE in w for w in crashed_at) and any("adapter_model.safetensors" in w or "adapter_config" in w for w in crashed_at)
        assert any(w.startswith("rename") and w.endswith("step-000004") for w in crashed_at), crashed_at
        assert any(w.startswith("rename") and w.endswith(LATEST) for w in crashed_at), crashed_at
        assert any(w.startswith("delete") and "step-000002" in w for w in crashed_at), crashed_at  # the prune
        assert assert_checkpoints_intact(checkpoints, peft_loader, {"step-000004"}, "nowhere (a complete save)") == "step-000004"
    finally:  # leave the finished run as it was, for the other tests of this module
        shutil.rmtree(checkpoints)
        shutil.copytree(pristine, checkpoints)


def test_a_crash_while_replacing_the_final_adapter_keeps_a_complete_one(finished_run, peft_loader, monkeypatch, tmp_path):
    """The final `adapter/` rewritten in place (a finished run resumed for more steps):
    at every point, `adapter/` is the old complete one or the new complete one."""
    run_dir, checkpointer = finished_run["run_dir"], finished_run["checkpointer"]
    model = finished_run["trainer"].lightning_module.model
    target = run_dir / "adapter"
    pristine = tmp_path / "adapter-pristine"
    shutil.copytree(target, pristine)
    tried = 0
    for at in range(1, 500):
        shutil.rmtree(target)
        shutil.copytree(pristine, target)
        crash = CrashAt(at)
        with monkeypatch.context() as patch:
            inject(patch, crash)
            try:
                write_adapter(model, checkpointer.tokenizer, checkpointer.chat_template, target, {"step": 99})
            except Crash:
                pass
        if not crash.where:
            break
        tried += 1
        assert target.is_dir(), f"after a crash at <{crash.where}>: no adapter/ at all"
        try:
            peft_loader(target)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"after a crash at <{crash.where}>: adapter/ does not load: {exc!r}")
    assert tried >= 5
    assert json.loads((target / "brainforge_adapter.json").read_text())["step"] == 99
    assert not list(run_dir.glob(".adapter.*"))  # nothing left aside after a complete write


def test_resume_after_a_kill_between_rename_and_pointer(finished_run, tiny_model_dir, monkeypatch, tmp_path):
    """A kill after `step-4/` is complete but before `latest` names it: `latest` still names
    step-2, the run resumes from step 2, and pruning (save_total_limit 1) must not delete the
    checkpoint `latest` names because a later-numbered stale folder is lying around."""
    source = finished_run["run_dir"]
    config = sft_config(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "outputs" / "ckpt"
    shutil.copytree(source, run_dir)
    checkpoints = run_dir / "checkpoints"
    for folder in checkpoints.glob("step-*"):  # back to the finished run's own state: step 2 only
        if folder.name != "step-000002":
            shutil.rmtree(folder)
    (checkpoints / LATEST).write_text("step-000002")
    checkpointer, trainer = finished_run["checkpointer"], finished_run["trainer"]
    saved_dir, checkpointer.dir = checkpointer.dir, checkpoints
    try:
        checkpointer._last_saved = -1
        real_pointer = checkpointing._write_pointer
        with monkeypatch.context() as patch:
            def killed(*args, **kwargs):
                raise Crash("before the pointer")
            patch.setattr(checkpointing, "_write_pointer", killed)
            with pytest.raises(Crash):
                checkpointer.save(AtStep(trainer, 4), trainer.lightning_module)
        assert checkpointing._write_pointer is real_pointer
    finally:
        checkpointer.dir = saved_dir
    assert (checkpoints / "step-000004" / STATE_FILE).exists() and (checkpoints / LATEST).read_text() == "step-000002"

    resumed = train_in_process(config, resume=True, overrides=[
        "training.max_steps=3", "training.save_every_n_steps=1", "training.save_total_limit=1"])
    assert resumed["trainer"].global_step == 3
    latest = latest_checkpoint(checkpoints)
    assert latest is not None and latest.name == "step-000003", sorted(p.name for p in checkpoints.iterdir())
    assert torch.load(latest / STATE_FILE, weights_only=False)["global_step"] == 3
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000003"]  # the stale step-4 is gone too


# ---------------------------------------------------------------------- resume restores the run


def restored_state(module_class, monkeypatch) -> dict[str, Any]:
    """Capture what the resumed run holds when training starts (after Lightning's restore)."""
    seen: dict[str, Any] = {}

    def on_train_start(self):
        optimizer = self.optimizers().optimizer if hasattr(self.optimizers(), "optimizer") else self.optimizers()
        scheduler = self.lr_schedulers()
        seen.update(
            global_step=self.trainer.global_step,
            optimizer=copy.deepcopy(optimizer.state_dict()),
            scheduler_position=scheduler.last_epoch,
            lr=optimizer.param_groups[0]["lr"],
            weights={f"model.{n}": p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad},
            module=self,
        )

    monkeypatch.setattr(module_class, "on_train_start", on_train_start)
    return seen


def assert_restored(seen: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    state = torch.load(checkpoint / STATE_FILE, weights_only=False, map_location="cpu")
    assert seen, "training never started"
    assert seen["global_step"] == state["global_step"] > 0, "the step counter was not restored"
    saved_optimizer = state["optimizer_states"][0]
    assert saved_optimizer["state"], "the checkpoint holds no optimizer state"
    assert set(seen["optimizer"]["state"]) == set(saved_optimizer["state"]), "Adam state was not restored"
    for index, saved in saved_optimizer["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(seen["optimizer"]["state"][index][key]), torch.as_tensor(saved[key])), f"Adam {key} of param {index} differs"
    assert seen["scheduler_position"] == state["lr_schedulers"][0]["last_epoch"] == state["global_step"], "LR schedule restarted"
    assert seen["lr"] == pytest.approx(saved_optimizer["param_groups"][0]["lr"])
    assert set(seen["weights"]) == set(state["state_dict"]), "trainable weights differ in name"
    for name, saved in state["state_dict"].items():
        assert torch.equal(seen["weights"][name], saved), f"trainable weight {name} was not restored"
    assert any(v.abs().sum() > 0 for n, v in state["state_dict"].items() if "lora_B" in n)  # trained (B starts at 0)
    return state


@pytest.mark.slow  # two tiny SFT runs: ~1 min on a busy 2-core machine
def test_sft_resume_restores_optimizer_schedule_step_and_weights(tmp_path, tiny_model_dir, monkeypatch):
    from brainforge.training.sft import LLMTrainingAgent

    config = sft_config(tmp_path, tiny_model_dir, lr_scheduler="linear", warmup_steps=1, max_steps=6)
    first = train_in_process(config, overrides=["training.max_steps=2"])
    checkpoint = latest_checkpoint(first["run_dir"] / "checkpoints")
    losses_before = list(first["trainer"].lightning_module.loss_history)

    seen = restored_state(LLMTrainingAgent, monkeypatch)
    resumed = train_in_process(config, resume=True, overrides=["training.max_steps=4"])
    state = assert_restored(seen, checkpoint)
    assert state["brainforge"]["loss_history"] == losses_before
    module = resumed["trainer"].lightning_module
    assert module.loss_history[:2] == losses_before and len(module.loss_history) == 4  # the curve continues
    assert json.loads((resumed["run_dir"] / "metrics.json").read_text())["steps"] == 4


def grpo_config(tmp_path: Path, model: Path) -> Path:
    import yaml

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(8)))
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model)},
        "peft": {"lora": {"r": 4, "lora_alpha": 8}},
        "data": {"source": {"path": str(prompts), "type": "prompt"}},
        "algorithm": {"name": "grpo", "grpo": {
            "num_generations": 4, "prompts_per_step": 2, "max_new_tokens": 16, "temperature": 1.0, "beta": 0.04,
            # a registered reward, and a graded one so groups do not tie and the policy moves
            "reward_functions": [{"name": "seed", "weight": 0.5}, {"name": "reward_fixtures.length_reward"}]}},
        "training": {"output_dir": str(tmp_path / "outputs"), "run_name": "grpo", "max_steps": 2, "learning_rate": 1e-2,
                     "save_every_n_steps": 2, "test_prompts": [], "lr_scheduler": "linear"},
        "logging": {"level": "WARNING", "tensorboard": False},
    }))
    return path


def same(a: Any, b: Any) -> bool:
    """Equal, NaN included (a step whose rewards were all None logs NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.slow  # two tiny GRPO runs: ~1 min on a busy 2-core machine
def test_grpo_resume_restores_optimizer_schedule_step_weights_and_history(tmp_path, tiny_model_dir, monkeypatch):
    from brainforge.training.grpo import GRPOModule

    config = grpo_config(tmp_path, tiny_model_dir)
    first = train_in_process(config)
    checkpoint = latest_checkpoint(first["run_dir"] / "checkpoints")
    history_before = copy.deepcopy(first["trainer"].lightning_module.history)
    assert len(history_before) == 2

    seen = restored_state(GRPOModule, monkeypatch)
    resumed = train_in_process(config, resume=True, overrides=["training.max_steps=3"])
    state = assert_restored(seen, checkpoint)
    assert same(state["brainforge"]["history"], history_before)
    history = resumed["trainer"].lightning_module.history
    assert len(history) == 3 and same(history[:2], history_before)  # the reward curve continues ...
    assert [h["step"] for h in history] == sorted({h["step"] for h in history})  # ... forward, no reset to step 0
    assert json.loads((resumed["run_dir"] / "metrics.json").read_text())["steps"] == 3
