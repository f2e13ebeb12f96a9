"""Mutation check: put plausible one-line bugs into a scratch copy of the tree, one at a time,
and check that the tests meant to catch each one fail.

    python bench/mutation_check.py --list                    # the table, and whether each original text is still there
    python bench/mutation_check.py                           # every mutation (tens of minutes on 2 cores)
    python bench/mutation_check.py --only grpo-advantages-negated --only seed-chat-cutoff-50
    python bench/mutation_check.py --match retrieval --output mutations.jsonl

The working tree is never modified: src/, tests/, configs/, bench/ and the top-level files
are copied as they are now (uncommitted edits included) into a temporary folder. Each
mutation edits that copy, runs its test selection there with PYTHONPATH pointing at the
copy's src/ (ahead of the editable install, also in the `brainforge` subprocesses the tests
start), and puts the file back. The selections first run on the unmutated copy: one that
fails there marks its mutations `baseline-fails`, since a failure would then prove nothing.

One JSON line per mutation on stdout:
    {"id", "status", "issue", "file", "tests", "returncode", "seconds", "failed"}
status: caught (the selection failed), survived (it passed: a test is missing), stale (the
original text is not in the file exactly once: the code moved; update the table),
baseline-fails, timeout, error (the selection is wrong: no tests collected, usage error).
Then a summary line. Exit status 0 when every mutation run was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "configs", "bench", "pyproject.toml", "README.md", "Makefile")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "outputs", ".brainforge", "*.egg-info", ".pytest_cache")


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    edits: tuple[tuple[str, str], ...]
    """(original, replacement) pairs; each original must occur exactly once in the file."""
    tests: tuple[str, ...]
    """pytest arguments selecting the tests that must fail (paths, node ids, -k EXPR)."""
    issue: str
    """What the mutation stands for (issue 8 section 7 wording where it comes from there)."""


def m(id: str, file: str, original: str, replacement: str, tests: tuple[str, ...] | str, issue: str) -> Mutation:
    return Mutation(id, file, ((original, replacement),), (tests,) if isinstance(tests, str) else tests, issue)


GRPO_STEP = "tests/test_regressions_grpo.py"
SCHEDULE = "tests/test_training_schedule.py"
EVALUATION = "tests/test_evaluation.py"
RETRIEVAL = "tests/test_retrieval_options.py"
ADAPTERS = "tests/test_adapter_outputs.py"
CHECKPOINTS = "tests/test_checkpoints.py"

MUTATIONS: tuple[Mutation, ...] = (
    # --- GRPO: direction of the update and what the reward sees --------------------------
    m("grpo-advantages-negated", "src/brainforge/training/grpo.py",
      "advantages = group_advantages(rewards, K, self.settings.scale_rewards)",
      "advantages = -group_advantages(rewards, K, self.settings.scale_rewards)",
      f"{GRPO_STEP}::test_a_step_raises_the_likelihood_of_better_completions",
      "GRPO advantages negated in the loss"),
    m("grpo-loss-sign-flipped", "src/brainforge/rl/losses.py",
      "on_policy = -torch.min(unclipped, clipped)", "on_policy = torch.min(unclipped, clipped)",
      f"{GRPO_STEP}::test_a_step_raises_the_likelihood_of_better_completions",
      "GRPO surrogate maximised instead of minimised (advantages negated inside the loss)"),
    m("grpo-reward-columns-other-prompt", "src/brainforge/training/grpo.py",
      "columns = {k: [p.columns.get(k) for p in row_prompts] for k in keys}",
      "columns = {k: [p.columns.get(k) for p in row_prompts[::-1]] for k in keys}",
      f"{GRPO_STEP}::test_reward_columns_belong_to_their_prompt_and_completion",
      "reward columns matched to another prompt's completions"),
    m("grpo-reward-columns-interleaved", "src/brainforge/training/grpo.py",
      "return self.score_rows([p for p in prompts for _ in range(K)], rollout)",
      "return self.score_rows([p for _ in range(K) for p in prompts], rollout)",
      f"{GRPO_STEP}::test_reward_columns_belong_to_their_prompt_and_completion",
      "reward columns repeated in the wrong order (prompt-major vs sample-major)"),
    m("grpo-reward-prompts-interleaved", "src/brainforge/training/grpo.py",
      "prompt_texts = [p.text for p in row_prompts]",
      "prompt_texts = [p.text for p in row_prompts[::-1]]",
      f"{GRPO_STEP}::test_reward_columns_belong_to_their_prompt_and_completion",
      "reward prompts matched to another prompt's completions"),
    m("grpo-batch-scaling-per-group", "src/brainforge/rl/advantages.py",
      "centred = centred / (std + eps)", "centred = centred / (grouped.std(dim=1, keepdim=True) + eps)",
      (f"{GRPO_STEP}", "-k", "batch"),
      "batch-level reward scaling replaced by per-group scaling"),
    m("grpo-scale-rewards-ignored", "src/brainforge/training/grpo.py",
      "advantages = group_advantages(rewards, K, self.settings.scale_rewards)",
      "advantages = group_advantages(rewards, K)",
      f"{GRPO_STEP}::test_trainer_scales_advantages_by_the_batch_std_when_asked",
      "scale_rewards: batch silently trained with per-group scaling"),
    m("seed-chat-cutoff-50", "src/brainforge/rewards/seed.py",
      "elif len(text) < 10:", "elif len(text) < 50:",
      (f"{GRPO_STEP}", "-k", "cutoffs"),
      "the seed reward's 10-character chat cutoff changed to 50"),
    # --- SFT: accumulation, schedule, packing -------------------------------------------
    m("sft-loss-per-micro-batch", "src/brainforge/training/sft.py",
      "loss = nll_sum / normaliser",
      "loss = nll_sum / max(float((micro_batch['labels'][:, 1:] != -100).sum()), 1.0) / len(micro_batches)",
      f"{SCHEDULE}::test_accumulated_gradient_is_the_token_mean_over_the_whole_step",
      "the SFT loss normalised per micro-batch instead of per step"),
    m("sft-accumulation-ignored", "src/brainforge/data/module.py",
      "return self.config.training.per_device_batch_size * self.config.training.gradient_accumulation_steps",
      "return self.config.training.per_device_batch_size",
      f"{SCHEDULE}::test_accumulated_step_serves_every_micro_batch",
      "gradient_accumulation_steps > 1 silently ignored"),
    m("lr-scheduler-not-stepped", "src/brainforge/training/sft.py",
      "        scheduler.step()\n", "        pass\n",
      f"{SCHEDULE}::test_learning_rate_follows_warmup_then_linear_decay_in_training",
      "LR schedule never advances in SFT"),
    m("lr-warmup-off-by-one", "src/brainforge/training/sft.py",
      "return (step + 1) / (warmup + 1)", "return step / warmup",
      (SCHEDULE, "-k", "lr_schedule or learning_rate"),
      "LR warmup values (first step at LR 0)"),
    m("lr-cosine-is-linear", "src/brainforge/training/sft.py",
      "return 0.5 * (1.0 + math.cos(math.pi * progress))", "return 1.0 - progress",
      (SCHEDULE, "-k", "lr_schedule"),
      "cosine decay computed as linear"),
    m("packing-ignored", "src/brainforge/data/module.py",
      "self.train_items: list = pack_examples(data.train, max_len, seed) if packing else list(data.train)",
      "self.train_items: list = list(data.train)",
      f"{SCHEDULE}::test_packing_through_the_data_module",
      "data.packing not applied by the data module"),
    m("packing-positions-continue", "src/brainforge/data/collate.py",
      "positions[r, offset : offset + n] = torch.arange(n)",
      "positions[r, offset : offset + n] = torch.arange(offset, offset + n)",
      (f"{SCHEDULE}::test_packing_through_the_data_module", "tests/test_loss.py"),
      "packed examples' positions do not restart"),
    # --- evaluation and held-out splits -------------------------------------------------
    m("eval-pass-at-k-all", "src/brainforge/evaluation.py",
      "solved_any += [any(s >= success_threshold", "solved_any += [all(s >= success_threshold",
      f"{EVALUATION}::test_accuracy_and_pass_at_k_against_hand_computed_values",
      "pass@k counts prompts where all samples are right"),
    m("eval-pass-at-k-wrong-slice", "src/brainforge/evaluation.py",
      "for s in scores[i * k : (i + 1) * k]", "for s in scores[i : i + k]",
      f"{EVALUATION}::test_accuracy_and_pass_at_k_against_hand_computed_values",
      "pass@k reads another prompt's samples"),
    m("eval-accuracy-threshold-strict", "src/brainforge/evaluation.py",
      "accuracy = sum(s >= success_threshold for s in greedy_scores)",
      "accuracy = sum(s > success_threshold for s in greedy_scores)",
      f"{EVALUATION}::test_accuracy_and_pass_at_k_against_hand_computed_values",
      "greedy accuracy misses answers scored exactly at the threshold"),
    m("eval-reads-training-split", "src/brainforge/evaluation.py",
      'prompts = load_prompts(sources, config.data.system_prompt, split="test")',
      "prompts = load_prompts(sources, config.data.system_prompt)",
      f"{EVALUATION}::test_eval_reads_the_held_out_split_not_the_training_one",
      "eval scores the training prompts"),
    m("eval-ignores-adapter", "src/brainforge/evaluation.py",
      "tuned = load_chat_model(adapter=adapter, model=config.model.name_or_path)",
      "tuned = load_chat_model(model=config.model.name_or_path)",
      f"{EVALUATION}::test_eval_command_end_to_end",
      "brainforge eval --adapter evaluates the base model twice"),
    m("humaneval-eval-size-zero", "src/brainforge/data/prompts.py",
      'chosen = problems[cut:] if split in ("test", "eval", "validation") else problems[:cut]',
      'chosen = problems[-eval_size:] if split in ("test", "eval", "validation") else problems[:-eval_size]',
      (EVALUATION, "-k", "humaneval"),
      "eval_size: 0 gives an empty training set through problems[:-0]"),
    m("reasoning-gym-split-overlaps", "src/brainforge/data/prompts.py",
      'items = [item for item in build(size + eval_size, seed + 1) if item["question"] not in held_out_questions][:size]',
      "items = list(build(size, seed))",
      (EVALUATION, "-k", "reasoning_gym or held_out"),
      "held-out split of a reasoning_gym source overlaps the training prompts"),
    # --- adapters: generate / merge ------------------------------------------------------
    m("generate-ignores-adapter", "src/brainforge/inference.py",
      "loaded = load_adapter(base, adapter) if adapter is not None else base", "loaded = base",
      f"{ADAPTERS}::test_generate_uses_the_adapter",
      "generate's test passes if the adapter is ignored"),
    m("cli-generate-drops-adapter", "src/brainforge/cli.py",
      "chat = load_chat_model(adapter, model)", "chat = load_chat_model(None, model)",
      f"{ADAPTERS}::test_generate_uses_the_adapter",
      "the generate command does not pass --adapter on"),
    m("merge-unload-without-merging", "src/brainforge/merge.py",
      "merged = with_adapter.merge_and_unload()", "merged = with_adapter.unload()",
      f"{ADAPTERS}::test_merged_model_matches_the_adapter",
      "the merged model's outputs differ from the adapter's"),
    # --- retrieval options -----------------------------------------------------------------
    m("retrieval-fusion-ignored", "src/brainforge/memory/retrieval.py",
      'if self.config.fusion == "rrf":', "if True:",
      (RETRIEVAL, "-k", "fusion"),
      "fusion: linear ignored by the retriever"),
    m("retrieval-rrf-k-ignored", "src/brainforge/memory/retrieval.py",
      "fused = reciprocal_rank_fusion(lists, k=self.config.rrf_k, weights=weights)",
      "fused = reciprocal_rank_fusion(lists, k=60, weights=weights)",
      (RETRIEVAL, "-k", "rrf_k"),
      "rrf_k ignored by the retriever"),
    m("retrieval-recall-n-ignored", "src/brainforge/memory/retrieval.py",
      "candidates = fused[:self.config.recall_n]", "candidates = fused",
      (RETRIEVAL, "-k", "recall_n"),
      "recall_n ignored by the retriever"),
    # --- checkpoints and resume (tests by the crash-safety work) ---------------------------
    m("resume-ignores-checkpoint", "src/brainforge/training/run.py",
      'trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint / "trainer_state.ckpt") if checkpoint else None)',
      "trainer.fit(module, datamodule=datamodule, ckpt_path=None)",
      f"{CHECKPOINTS}::test_sft_resume_restores_optimizer_schedule_step_and_weights",
      "--resume ignoring the checkpoint (ckpt_path=None)"),
    m("grpo-resume-ignores-checkpoint", "src/brainforge/training/grpo_run.py",
      'trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint / "trainer_state.ckpt") if checkpoint else None)',
      "trainer.fit(module, datamodule=datamodule, ckpt_path=None)",
      f"{CHECKPOINTS}::test_grpo_resume_restores_optimizer_schedule_step_weights_and_history",
      "GRPO --resume ignoring the checkpoint"),
    Mutation("checkpoint-straight-into-step-dir", "src/brainforge/training/checkpointing.py", (
        ('staging = self.dir / f".{name}.tmp"', "staging = self.dir / name"),
        ("_replace_dir(staging, self.dir / name)  # complete under its final name ...", "pass"),
    ), (f"{CHECKPOINTS}::test_a_crash_at_any_point_of_a_checkpoint_save_keeps_the_previous_one",),
       "checkpoints written straight into step-N/"),
    Mutation("checkpoint-latest-before-rename", "src/brainforge/training/checkpointing.py", (
        ("            _replace_dir(staging, self.dir / name)  # complete under its final name ...\n"
         "            _fsync_dir(self.dir)\n"
         "            _write_pointer(self.dir, name)  # ... before `latest` names it\n",
         "            _write_pointer(self.dir, name)\n"
         "            _replace_dir(staging, self.dir / name)\n"
         "            _fsync_dir(self.dir)\n"),
    ), (CHECKPOINTS, "-k", "crash_at_any_point or kill_between_rename"), "`latest` updated before the rename"),
    # --- sandbox weak assertions (tests by the sandbox work) ------------------------------
    m("sandbox-network-shared", "src/brainforge/rewards/sandbox.py",
      '_bwrap(), "--unshare-all", "--unshare-user",',
      '_bwrap(), "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",',
      ("tests/test_sandbox_hostile.py", "-k", "sockets"),
      "the sandbox's network test passes with the network shared"),
    m("sandbox-output-uncapped", "src/brainforge/rewards/sandbox.py",
      "keep = max(0, self.limits.max_output_bytes - len(self._stderr))", "keep = len(chunk)",
      ("tests/test_sandbox_hostile.py", "-k", "output_bomb"),
      "the output-cap test passes for any output"),
    # --- LUFFY / ExGRPO (issue 9) ------------------------------------------------------------
    m("luffy-shaping-detached", "src/brainforge/rl/off_policy.py",
      "return -advantages * shaping(off_policy_weight(logps, behaviour_logps), gamma)",
      "return -advantages * shaping(off_policy_weight(logps, behaviour_logps).detach(), gamma)",
      ("tests/test_luffy_model.py::test_trace_only_group_gives_the_adapter_a_gradient_through_f",),
      "off-policy weight assembled without gradient (the published-reimplementation bug): traces teach nothing"),
    m("luffy-prefix-mask-dropped", "src/brainforge/training/grpo.py",
      "prefix_mask=rollout.prefix_mask, behaviour_logps=rollout.behaviour_logps,",
      "prefix_mask=None, behaviour_logps=rollout.behaviour_logps,",
      ("tests/test_luffy_exgrpo_runs.py::test_luffy_trains_and_logs_the_mixed_loss",),
      "trace tokens trained with the on-policy ratio (~1) instead of f(pi_theta)"),
    m("exgrpo-no-retirement", "src/brainforge/rl/experience.py",
      "        if successes == self.group_size:\n            self._retire(uid)\n            return\n",
      "",
      ("tests/test_experience_buffer.py", "-k", "retire"),
      "questions solved K of K times stay in the buffer and keep being replayed"),
    m("exgrpo-buffer-not-checkpointed", "src/brainforge/training/grpo.py",
      'checkpoint["brainforge"]["experience"] = self.replay.buffer.state_dict()',
      'checkpoint["brainforge"]["experience_unused"] = self.replay.buffer.state_dict()',
      ("tests/test_luffy_exgrpo_runs.py::test_resume_with_an_incompatible_buffer_says_what_differs",),
      "the experience buffer is not saved with the checkpoint: --resume loses it"),
)


# ------------------------------------------------------------------------------ running


def make_scratch(source: Path) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="brainforge-mutation-"))
    for name in COPIED:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, scratch / name, ignore=IGNORED, symlinks=True)
        elif path.is_file():
            shutil.copy2(path, scratch / name)
    return scratch


def scratch_env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(scratch / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def check_import_path(scratch: Path) -> None:
    """The copy's src/ must win over the editable install, or nothing mutated would run."""
    done = subprocess.run([sys.executable, "-c", "import brainforge; print(brainforge.__file__)"], cwd=scratch,
                          env=scratch_env(scratch), capture_output=True, text=True, timeout=300)
    where = done.stdout.strip()
    if done.returncode != 0 or not where.startswith(str(scratch)):
        raise SystemExit(f"the scratch copy's brainforge is not the one imported ({where or done.stderr[-500:]})")


def run_pytest(scratch: Path, tests: tuple[str, ...], timeout: float, log: Path) -> tuple[int | None, float, list[str]]:
    """Run the selection; return (returncode or None on timeout, seconds, FAILED/ERROR lines).
    Output goes to a file (never an unread pipe); the whole process group is killed on timeout."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=scratch, env=scratch_env(scratch), stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    text = log.read_text(errors="replace")
    failed = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))][:5]
    return code, round(time.monotonic() - started, 1), failed


def apply(path: Path, mutation: Mutation) -> str | None:
    """Apply the edits to `path`; return the original text, or None (nothing written) when stale."""
    original = text = path.read_text()
    for before, after in mutation.edits:
        if text.count(before) != 1:
            return None
        text = text.replace(before, after)
    path.write_text(text)
    return original


def is_stale(root: Path, mutation: Mutation) -> bool:
    path = root / mutation.file
    if not path.exists():
        return True
    text = path.read_text()
    return any(text.count(before) != 1 for before, _ in mutation.edits)


def status_of(code: int | None) -> str:
    if code is None:
        return "timeout"
    if code == 0:
        return "survived"
    if code in (1, 2):  # tests failed / collection or import error
        return "caught"
    return "error"      # 4: usage error, 5: no tests collected: the selection is wrong


def emit(row: dict, output: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if output:
        with output.open("a") as handle:
            handle.write(line + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="Print the table (and stale originals) and exit.")
    parser.add_argument("--only", action="append", default=[], help="Run this mutation id (repeatable).")
    parser.add_argument("--match", default=None, help="Also run the mutations whose id contains this text.")
    parser.add_argument("--timeout", type=float, default=1200, help="Seconds per test run before it is killed.")
    parser.add_argument("--no-baseline", action="store_true", help="Skip running the selections on the unmutated copy.")
    parser.add_argument("--keep", action="store_true", help="Keep the scratch copy (its path is printed).")
    parser.add_argument("--output", type=Path, default=None, help="Also append the JSON lines to this file.")
    parser.add_argument("--tree", type=Path, default=REPO, help="Tree to copy (default: this repository).")
    args = parser.parse_args()

    selected = bool(args.only) or args.match is not None   # --only and --match add up; neither: every mutation
    chosen = [mu for mu in MUTATIONS if not selected or mu.id in args.only or (args.match is not None and args.match in mu.id)]
    unknown = set(args.only) - {mu.id for mu in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation id(s): {', '.join(sorted(unknown))}; see --list")
    if args.list:
        for mu in chosen:
            print(json.dumps({"id": mu.id, "file": mu.file, "tests": list(mu.tests), "issue": mu.issue,
                              "stale": is_stale(args.tree, mu)}))
        return 0

    scratch = make_scratch(args.tree)
    logs = scratch / ".mutation-logs"
    logs.mkdir()
    counts: dict[str, int] = {}
    started = time.monotonic()
    try:
        check_import_path(scratch)
        baseline: dict[tuple[str, ...], tuple[int | None, list[str]]] = {}
        for index, mu in enumerate(chosen):
            row = {"id": mu.id, "issue": mu.issue, "file": mu.file, "tests": list(mu.tests)}
            if is_stale(scratch, mu):
                row.update(status="stale")
            else:
                if not args.no_baseline and mu.tests not in baseline:
                    code, _, failed = run_pytest(scratch, mu.tests, args.timeout, logs / f"baseline-{index}.log")
                    baseline[mu.tests] = (code, failed)
                if not args.no_baseline and baseline[mu.tests][0] != 0:
                    code, failed = baseline[mu.tests]
                    row.update(status="baseline-fails", returncode=code, failed=failed)
                else:
                    path = scratch / mu.file
                    original = apply(path, mu)
                    assert original is not None
                    try:
                        code, seconds, failed = run_pytest(scratch, mu.tests, args.timeout, logs / f"{mu.id}.log")
                    finally:
                        path.write_text(original)
                    row.update(status=status_of(code), returncode=code, seconds=seconds, failed=failed)
            counts[row["status"]] = counts.get(row["status"], 0) + 1
            emit(row, args.output)
    finally:
        if args.keep:
            print(json.dumps({"scratch": str(scratch)}), flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    summary = {"summary": counts, "mutations": len(chosen), "minutes": round((time.monotonic() - started) / 60, 1)}
    emit(summary, args.output)
    return 0 if counts.get("caught", 0) == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
