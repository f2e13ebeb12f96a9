"""The `brainforge` command. Each subcommand is a thin, typed function over the library.

User errors (`BrainforgeError`) print one line of explanation and exit 2; `--debug` shows
the traceback. Anything else is a bug and is shown in full.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from brainforge.errors import BrainforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune a small language model on the machine you have.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect and check config files.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect training data as the model will see it.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

_state = {"debug": False}

ConfigArg = typer.Argument(..., help="Path of a config.yaml.", show_default=False)
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set training.max_steps=20 (repeatable).")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors too."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors.")) -> None:
    _state["debug"] = debug
    level = logging.WARNING if quiet else (logging.DEBUG if debug else logging.INFO)
    _setup_logging(level)


def _setup_logging(level: int) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, show_time=False, rich_tracebacks=False)
    logger = logging.getLogger("brainforge")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    for noisy in ("transformers", "datasets", "lightning", "lightning.pytorch", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level <= logging.INFO else level)
    # On AVX512-bf16 CPUs, importing bitsandbytes asks the `kernels` package for an optional
    # 4-bit CPU kernel from the Hub; offline that fails with two warnings on every command
    # (4-bit still works without it). Not brainforge's business to show; --debug shows them.
    for optional_kernel in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(optional_kernel).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _echo(message: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        typer.echo(message)


# ------------------------------------------------------------------------------ train


@app.command()
def train(
    config: Path = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the latest run of this config from its last checkpoint."),
) -> None:
    """Train as the config says (sft, grpo, luffy, exgrpo or hybrid) and write the run folder."""
    from brainforge.config import load_config
    from brainforge.training.run import RUN_DIR_ENV
    from brainforge.training.run import train as run_training

    from brainforge.training.preflight import preflight

    cfg = load_config(config, set_)
    logging.getLogger("brainforge").setLevel(cfg.logging.level)
    if RUN_DIR_ENV not in os.environ:  # not in a DDP child, whose parent checked (and holds memory now)
        estimate = preflight(cfg)  # output folder, adapters, memory: refused here, before any weights load
        if estimate is not None:
            _echo(estimate.summary())
    run_dir = run_training(cfg, config, resume=resume)
    _echo(f"\nDone. Outputs in {run_dir}:")
    for name in ("adapter", "tensorboard", "checkpoints", "config.yaml", "metrics.json", "samples.jsonl"):
        if (run_dir / name).exists():
            _echo(f"  {run_dir / name}")
    _echo(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    _echo(f"Try it:      brainforge generate --adapter {run_dir} \"your prompt\"")


@app.command()
def reason(
    config: Path = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the latest reason run of this config: finished phases "
                                "are skipped, an unfinished one continues from its last checkpoint."),
) -> None:
    """Two phases in one run folder: reasoning (luffy/exgrpo/hybrid), then search (search_r1) from its adapter."""
    from brainforge.reasoning.pipeline import run_reason

    run_dir = run_reason(config, set_, resume=resume)
    _echo(f"\nDone. Outputs in {run_dir}:")
    for name in ("reason.json", "phase1", "phase2"):
        _echo(f"  {run_dir / name}")
    _echo(f"TensorBoard: tensorboard --logdir {run_dir}")
    _echo(f"Try it:      brainforge ask --adapter {run_dir} \"your question\"")
    _echo(f"Evaluate:    brainforge eval {config} --adapter {run_dir}")


# ------------------------------------------------------------------------------ config / data


@config_app.command("validate")
def config_validate(config: Path = ConfigArg, set_: Optional[List[str]] = SetOpt) -> None:
    """Check a config file against the schema; print the resolved config."""
    import yaml

    from brainforge.config import load_config

    from brainforge.training.preflight import preflight

    from brainforge.config import has_reason_section, load_reason_config

    if has_reason_section(config):  # a `brainforge reason` config: each phase as it will run
        for phase, phase_config in load_reason_config(config, set_).items():
            typer.echo(f"# ---- {phase} ----\n" + yaml.safe_dump(phase_config.model_dump(mode="json"), sort_keys=False))
        typer.echo(f"{config}: valid (phase 2's model.adapter_path is set to phase 1's adapter when it runs)")
        return
    cfg = load_config(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    estimate = preflight(cfg)
    typer.echo(estimate.summary() if estimate is not None else
               f"memory estimate: skipped (no local config.json for model {cfg.model.name_or_path})")
    typer.echo(f"{config}: valid")


@data_app.command("preview")
def data_preview(
    config: Path = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
    count: int = typer.Option(3, "--count", "-n", help="How many examples to show."),
) -> None:
    """Show rendered examples with trained tokens marked ⟦like this⟧; check all of them."""
    from brainforge.config import load_config
    from brainforge.data.preview import preview
    from brainforge.models.loader import load_tokenizer, resolve_model_path

    cfg = load_config(config, set_)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.trust_remote_code)
    if cfg.algorithm.is_rl:
        _preview_prompts(cfg, tokenizer, count)
        return
    for i, example in enumerate(preview(cfg, tokenizer, count)):
        typer.echo(f"--- example {i} from {example.source}: {example.num_tokens} tokens, {example.num_trained} trained")
        typer.echo(example.marked_text)
    typer.echo("--- every example trains at least one token and its end-of-turn token")


def _preview_prompts(cfg, tokenizer, count: int) -> None:
    """RL configs: the prompts as the policy will see them, and their reference columns."""
    from brainforge.data.templates import chat_format
    from brainforge.training.grpo_run import training_prompts

    template = chat_format(cfg.datasets.output_format, tokenizer).template
    prompts = training_prompts(cfg, limit=count)
    for i, prompt in enumerate(prompts):
        rendered = tokenizer.apply_chat_template(prompt.messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        columns = {k: (str(v)[:80] + "..." if len(str(v)) > 80 else v) for k, v in prompt.columns.items()}
        typer.echo(f"--- prompt {i}; reward columns: {columns}")
        typer.echo(rendered)


# ------------------------------------------------------------------------------ inference


AdapterOpt = typer.Option(None, "--adapter", "-a", help="A run folder or adapter folder.")
ModelOpt = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's base, or 'default').")


@app.command()
def generate(
    prompts: List[str] = typer.Argument(..., help="One or more prompts."),
    adapter: Optional[Path] = AdapterOpt,
    model: Optional[str] = ModelOpt,
    max_new_tokens: int = typer.Option(128, help="Generation length limit."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
) -> None:
    """Generate answers with a base model plus optional adapter."""
    from brainforge.inference import load_chat_model

    chat = load_chat_model(adapter, model)
    for prompt, answer in zip(prompts, chat.generate(prompts, max_new_tokens, temperature, top_p)):
        typer.echo(f">>> {prompt}\n{answer}\n")


@app.command()
def chat(
    adapter: Optional[Path] = AdapterOpt,
    model: Optional[str] = ModelOpt,
    max_new_tokens: int = typer.Option(256, help="Reply length limit."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding."),
) -> None:
    """Interactive chat (empty line or Ctrl-D to quit)."""
    from brainforge.inference import load_chat_model

    session = load_chat_model(adapter, model)
    history: list[dict[str, str]] = []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        reply = session.generate([history], max_new_tokens, temperature)[0]
        history.append({"role": "assistant", "content": reply})
        typer.echo(f"model> {reply}")


@app.command()
def merge(
    run: Path = typer.Argument(..., help="A run folder (or adapter folder)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/merged)."),
    dtype: str = typer.Option("bfloat16", help="Dtype of the saved weights: bfloat16, float16 or float32."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it holds an earlier merge output (other "
                               "non-empty folders are always refused)."),
) -> None:
    """Merge the adapter into its base and check both agree before declaring success.

    Written beside --out and renamed into place when complete: a failed or interrupted merge
    leaves what was there before."""
    from brainforge.merge import merge_adapter

    if dtype not in {"bfloat16", "float16", "float32"}:
        raise BrainforgeError(f"--dtype {dtype}: use bfloat16, float16 or float32")
    out_dir = merge_adapter(run, out, save_dtype=dtype, force=force)
    typer.echo(f"merged model: {out_dir} (loads with transformers.AutoModelForCausalLM.from_pretrained)")


@app.command("eval")
def eval_command(
    config: Path = ConfigArg,
    adapter: Optional[Path] = AdapterOpt,
    set_: Optional[List[str]] = SetOpt,
    k: int = typer.Option(4, "--k", help="Samples per prompt for pass@k (0 skips sampling)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N held-out prompts."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the results as JSON here."),
) -> None:
    """Held-out accuracy (greedy) and pass@k (sampled) for the base model and base + adapter.

    Agent configs (agent_grpo, apo, agent_sft) run the agent once per held-out task, greedy,
    and report its success rate (an apo run folder: the base model with its best prompt).
    QA configs (search_r1, or answer_match first) report EM, F1, answer rate and, for
    search_r1, search calls per question, greedy. A `brainforge reason` config is evaluated
    as its phase 2, and a reason run folder as --adapter means its phase 2 adapter."""
    import json

    from brainforge.config import has_reason_section, load_config, load_reason_config
    from brainforge.evaluation import EvalResult, run_eval
    from brainforge.models.loader import resolve_adapter_dir
    from brainforge.reasoning.policy import run_folder

    cfg = load_reason_config(config, set_)["phase2"] if has_reason_section(config) else load_config(config, set_)
    if cfg.algorithm.is_agent:
        from brainforge.agents.evaluation import run_agent_eval
        from brainforge.agents.store import DEFAULT_STORE

        agent_results = run_agent_eval(cfg, run_folder(adapter) if adapter is not None else None, limit, DEFAULT_STORE)
        for agent_result in agent_results:
            typer.echo(agent_result.summary())
        if output:
            output.write_text(json.dumps([r.as_dict() for r in agent_results], indent=2))
        return
    if adapter is not None:
        adapter = run_folder(adapter)
        resolve_adapter_dir(adapter)  # a damaged adapter fails now, not after the base model's evaluation
    results = run_eval(cfg, adapter, k, limit)
    for result in results:
        if not isinstance(result, EvalResult):
            typer.echo(result.summary())
            continue
        typer.echo(f"{result.model:60} greedy accuracy {result.greedy_accuracy:.3f}   pass@{result.k} {result.pass_at_k:.3f}   "
                   f"({result.prompts} prompts, {result.seconds:.0f}s)")
    if output:
        output.write_text(json.dumps([r.as_dict() for r in results], indent=2))


@app.command()
def doctor() -> None:
    """Versions, CPU features (AMX/bf16), GPU, default model and embedder packages."""
    from brainforge.doctor import report

    failed = False
    for name, value, ok in report():
        typer.echo(f"{'ok ' if ok else 'XX '} {name:22} {value}")
        failed |= not ok
    if failed:
        raise BrainforgeError("some required parts are missing (marked XX above)")


# ------------------------------------------------------------------------------ memory

from brainforge import memory_cli  # noqa: E402  (only typer functions; heavy imports happen inside them)

app.command()(memory_cli.ingest)
app.command()(memory_cli.search)
app.command()(memory_cli.ask)
app.add_typer(memory_cli.sop_app, name="sop")
app.add_typer(memory_cli.memory_app, name="memory")

from brainforge.traces_cli import traces_app  # noqa: E402  (typer functions; heavy imports happen inside them)

app.add_typer(traces_app, name="traces")

from brainforge.qa_cli import qa_app  # noqa: E402  (typer functions; heavy imports happen inside them)

app.add_typer(qa_app, name="qa")

from brainforge.agents.serve_cli import serve  # noqa: E402  (a typer function; heavy imports happen inside it)

app.command()(serve)


def main() -> None:
    try:
        app(standalone_mode=False)
    except BrainforgeError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing half-written is kept: the last completed checkpoint (train: resume with "
                   "--resume) or the last committed ingest (memory: run ingest again to finish) is intact", err=True)
        sys.exit(130)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
