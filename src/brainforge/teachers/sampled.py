"""Rejection sampling from a local teacher: `brainforge traces generate`.

A user whose task has no ready-made worked solutions gets LUFFY traces from any stronger
model they have on disk: sample k completions per training prompt, keep those the config's
own reward marks correct (total >= `algorithm.experience.success_threshold`, the threshold
every off-policy part of the trainer uses), drop repeats, write them as a trace file.

Each kept trace carries the sampler's per-token log-probs, so the trainer can use the real
importance ratio pi_theta / pi_teacher instead of taking the behaviour probability as 1.
They are the engine's log-probs: full softmax of logits / temperature (also under top_p,
which only narrows what is *sampled*), the same convention the trainer uses for its own
log-probs; `token_ids` are the sampled tokens, the end-of-turn token included when the
teacher emitted one (LUFFY's trace is "the entire trace plus EOS"). The `tokenizer`
fingerprint lets the trainer use those log-probs only when the student tokenizes alike.

Teachers are local only (nothing is fetched from a hub): `default`, a Hugging Face model
folder, a GGUF file (or a folder holding one), a run folder or an adapter folder (its base
model plus the adapter, prompts rendered with the chat template saved beside the adapter,
the one it was trained with).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from brainforge.errors import BrainforgeError, ModelError

if TYPE_CHECKING:
    from brainforge.data.prompts import PromptExample
    from brainforge.data.traces import Trace
    from brainforge.generation.engine import Rollout

log = logging.getLogger(__name__)

ROWS_PER_CALL = 64
"""Completions sampled per engine call: prompts are batched `ROWS_PER_CALL // k` at a time
(at least one), so the prompt prefill is shared and decode steps run many rows at once."""

TEACHER_FORMS = ("'default', a Hugging Face model folder (with config.json), a .gguf file, "
                 "a run folder (with adapter/), an adapter folder (with adapter_config.json), or worked:FAMILY (brainforge traces families)")


@dataclass
class TeacherReport:
    """What one `generate_traces` call did."""

    teacher: str
    out: Path
    prompts: int
    """Prompts sampled from."""
    samples: int
    """Completions sampled (prompts x k)."""
    kept: int
    """Traces written: correct and not a repeat of an earlier one for the same prompt. With none,
    no file is written (an empty trace file is invalid, and would only block a rerun)."""
    prompts_with_trace: int
    """Prompts with at least one kept trace."""
    duplicates: int
    """Correct completions dropped because the same response was already kept for the prompt."""
    empty: int
    """Correct completions dropped because they were empty (whitespace or special tokens only)."""
    truncated_kept: int
    """Kept traces that hit max_new_tokens before ending their turn (marked `"extra": {"truncated": true}`:
    their token_ids lack the end-of-turn token the trainer renders after a trace)."""
    seconds: float

    def summary(self) -> str:
        """Two lines for the CLI."""
        rate = self.kept / self.samples if self.samples else 0.0
        return (f"teacher {self.teacher}: {self.samples} samples from {self.prompts} prompts, {self.kept} kept "
                f"({rate:.0%}; {self.duplicates} duplicates and {self.empty} empty dropped, {self.truncated_kept} cut at "
                f"max_new_tokens), "
                f"{self.prompts_with_trace}/{self.prompts} prompts have a trace, {self.seconds:.1f} s\n"
                + (f"traces: {self.out}" if self.kept else
                   f"nothing written to {self.out}: no sample was correct; raise --k or --temperature, or use a stronger teacher"))


@dataclass
class Teacher:
    """A loaded teacher: model, tokenizer, and the chat template prompts are rendered with."""

    model: Any
    tokenizer: Any
    chat_template: str


def generate_traces(
    config_path: str | Path,
    overrides: list[str] | None,
    teacher: str,
    k: int,
    out: Path | None,
    limit: int | None,
    temperature: float | None,
    max_new_tokens: int | None,
) -> TeacherReport:
    """Sample `k` completions per RL prompt of the config from `teacher`, keep the correct
    ones, write them to `out` (default `./<config stem>.traces.jsonl`; not written when none
    is kept; an existing file is never overwritten). Every check that needs no model
    (arguments, out file, teacher path, config, prompts, rewards) runs before the teacher loads."""
    from brainforge.config import load_config
    from brainforge.data.traces import tokenizer_fingerprint, write_traces
    from brainforge.generation.engine import GenerationEngine, SamplingParams
    from brainforge.rewards.registry import resolve_reward
    from brainforge.training.grpo_run import training_prompts

    started = time.perf_counter()
    if k < 1:
        raise BrainforgeError(f"--k {k}: sample at least 1 completion per prompt")
    if limit is not None and limit < 1:
        raise BrainforgeError(f"--limit {limit}: use at least 1 prompt (or leave it out for all)")
    if temperature is not None and (math.isnan(temperature) or temperature < 0):
        raise BrainforgeError(f"--temperature {temperature}: must be >= 0 (0 is greedy, which repeats itself for k > 1)")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise BrainforgeError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    config_path = Path(config_path)
    out = Path(out) if out is not None else Path.cwd() / f"{config_path.stem}.traces.jsonl"
    _refuse_existing(out)
    if teacher.startswith("worked:"):
        return write_worked_traces(config_path, overrides, teacher.removeprefix("worked:"), out, limit, started)
    adapter, model = resolve_teacher(teacher)
    config = load_config(config_path, overrides)
    if not config.algorithm.is_rl:
        raise BrainforgeError(f"{config_path}: algorithm.name is {config.algorithm.name}; traces are sampled for an RL config "
                              "(grpo, luffy, exgrpo or hybrid), whose prompts and algorithm.grpo.reward_functions say what is correct")
    settings = config.algorithm.grpo
    prompts = training_prompts(config, limit)  # none at all is a DataError naming the source
    rewards = [(spec.name, resolve_reward(spec.name), spec.weight, dict(spec.kwargs)) for spec in settings.reward_functions]
    threshold = config.algorithm.experience.success_threshold
    params = SamplingParams(
        max_new_tokens=max_new_tokens or settings.max_new_tokens,
        temperature=settings.temperature if temperature is None else temperature,
        top_p=settings.top_p,
        stop_strings=tuple(settings.stop_strings),
        return_logprobs=True,
    )

    loaded = load_teacher(teacher, config.model.dtype, config.hardware.accelerator, resolved=(adapter, model))
    engine = GenerationEngine.for_chat(loaded.model, loaded.tokenizer)
    device = next(loaded.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.training.seed)
    fingerprint = tokenizer_fingerprint(loaded.tokenizer)
    per_call = max(1, ROWS_PER_CALL // k)
    traces: list[Trace] = []
    counts = {"prompts_with_trace": 0, "duplicates": 0, "empty": 0, "truncated_kept": 0}
    log.info("sampling %d completions for each of %d prompts from %s (temperature %s, max_new_tokens %d)",
             k, len(prompts), teacher, params.temperature, params.max_new_tokens)
    with _progress(len(prompts)) as advance:
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            rollout = engine.generate([encode_prompt(loaded, p.messages) for p in chunk], k, params, generator=generator)
            totals = score(rewards, chunk, k, rollout.texts, settings.reward_errors)
            traces.extend(kept_traces(chunk, k, rollout, totals, threshold, f"teacher:{teacher}", fingerprint, counts))
            advance(len(chunk))

    if traces:  # an empty trace file is not a valid one (load_traces refuses it), and would block a rerun
        _refuse_existing(out)  # it may have appeared while sampling
        write_traces(out, traces)
    else:
        log.warning("no correct, non-empty completion from %s; %s not written", teacher, out)
    return TeacherReport(teacher=teacher, out=out, prompts=len(prompts), samples=len(prompts) * k, kept=len(traces),
                         seconds=time.perf_counter() - started, **counts)


def write_worked_traces(config_path: Path, overrides: list[str] | None, family: str, out: Path, limit: int | None,
                        started: float) -> TeacherReport:
    """`--teacher worked:<family>`: the built-in programmatic teacher's solutions for the
    config's prompts, written as a trace file (to read, edit or mix with sampled ones). They
    are correct by construction and carry no log-probs (the behaviour probability is 1)."""
    from brainforge.config import load_config
    from brainforge.data.traces import write_traces
    from brainforge.teachers.worked import worked_traces
    from brainforge.training.grpo_run import training_prompts

    config = load_config(config_path, overrides)
    prompts = training_prompts(config, limit)
    traces, unsolved = worked_traces(prompts, family)
    if unsolved:
        log.warning("worked:%s cannot solve %d of the %d prompts (not in a format it knows); they get no trace", family, unsolved, len(prompts))
    if traces:
        write_traces(out, traces)
    else:
        log.warning("worked:%s solved none of the %d prompts; %s not written", family, len(prompts), out)
    return TeacherReport(teacher=f"worked:{family}", out=out, prompts=len(prompts), samples=len(prompts), kept=len(traces),
                         seconds=time.perf_counter() - started, prompts_with_trace=len(traces), duplicates=0, empty=0,
                         truncated_kept=0)


# ---------------------------------------------------------------------------- teacher


def load_teacher(teacher: str, dtype: str = "auto", accelerator: str = "auto",
                 resolved: tuple[str | None, str | None] | None = None) -> Teacher:
    """Load `teacher` (see the module docstring for the accepted forms) for sampling, on the
    GPU when there is one and the config's hardware.accelerator allows it. `resolved` is
    `resolve_teacher(teacher)` when the caller already checked it."""
    from brainforge.data.templates import CHATML_TEMPLATE
    from brainforge.inference import load_chat_model

    adapter, model = resolved or resolve_teacher(teacher)
    try:
        chat = load_chat_model(adapter=adapter, model=model, dtype=dtype)
    except BrainforgeError as exc:
        raise ModelError(f"--teacher {teacher}: {exc}") from exc
    except Exception as exc:  # transformers/PEFT raise many types for a folder they cannot use
        detail = (str(exc).splitlines() or [""])[0][:300]
        raise ModelError(f"--teacher {teacher}: could not load it as a model ({type(exc).__name__}: {detail}); "
                         f"give {TEACHER_FORMS}") from exc
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        chat.model.to("cuda")
    template = getattr(chat.tokenizer, "chat_template", None) or CHATML_TEMPLATE
    return Teacher(chat.model, chat.tokenizer, template)


def resolve_teacher(teacher: str) -> tuple[str | None, str | None]:
    """(adapter, model) for `load_chat_model`; a run or adapter folder's base model is read
    from the adapter and must be local too. Anything else is a one-line error."""
    from brainforge.models.loader import ADAPTER_CONFIG, adapter_base_model, resolve_adapter_dir

    if teacher == "default":
        return None, "default"
    path = Path(teacher).expanduser()
    if not path.exists():
        raise ModelError(f"--teacher {teacher}: no such file or folder (nothing is fetched from a hub); give {TEACHER_FORMS}")
    if path.is_file():
        if path.suffix == ".gguf":
            return None, str(path)
        raise ModelError(f"--teacher {teacher}: a file that is not .gguf; give {TEACHER_FORMS}")
    if (path / "adapter").is_dir() or (path / ADAPTER_CONFIG).exists():
        try:
            adapter = resolve_adapter_dir(path)
            base = adapter_base_model(adapter)
        except BrainforgeError as exc:
            raise ModelError(f"--teacher {teacher}: {exc}") from exc
        if base != "default" and not Path(base).expanduser().exists():
            raise ModelError(f"--teacher {teacher}: its adapter was trained on {base!r}, which is not on this machine "
                             "(nothing is fetched from a hub); copy that base model here, or give a merged model folder")
        return str(adapter), None
    if (path / "config.json").exists() or any(path.glob("*.gguf")):
        return None, str(path)
    raise ModelError(f"--teacher {teacher}: this folder holds no model (no config.json, .gguf, adapter/ or "
                     f"adapter_config.json); give {TEACHER_FORMS}")


def encode_prompt(teacher: Teacher, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids as the teacher sees it: its chat template, generation prompt on."""
    text = teacher.tokenizer.apply_chat_template(messages, chat_template=teacher.chat_template, tokenize=False,
                                                 add_generation_prompt=True)
    return teacher.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- selection


def kept_traces(prompts: list[PromptExample], k: int, rollout: Rollout, totals: list[float], threshold: float,
                source: str, fingerprint: str, counts: dict[str, int]) -> list[Trace]:
    """The traces to keep from one rollout (row i belongs to prompt i // k): correct (total
    reward >= threshold), not empty, not a repeat of a response already kept for the prompt.
    `counts` accumulates prompts_with_trace, duplicates, empty and truncated_kept."""
    from brainforge.data.traces import Trace

    assert rollout.logprobs is not None, "sample with return_logprobs=True"
    kept: list[Trace] = []
    for index, prompt in enumerate(prompts):
        seen: set[str] = set()
        for row in range(index * k, (index + 1) * k):
            text = rollout.texts[row]
            if math.isnan(totals[row]) or totals[row] < threshold:
                continue
            if not text.strip():  # a trace is a reply: an empty one is not a valid trace line
                counts["empty"] += 1
                continue
            if text in seen:
                counts["duplicates"] += 1
                continue
            seen.add(text)
            length = int(rollout.completion_mask[row].sum())  # generated tokens, the stop token included
            truncated = bool(rollout.truncated[row])
            counts["truncated_kept"] += truncated
            kept.append(Trace(
                response=text, prompt=prompt.text, prompt_id=_prompt_id(prompt.columns), reward=totals[row],
                source=source, logprobs=rollout.logprobs[row, :length].tolist(),
                token_ids=rollout.completion_ids[row, :length].tolist(), tokenizer=fingerprint,
                extra={"truncated": True} if truncated else {},
            ))
        counts["prompts_with_trace"] += bool(seen)
    return kept


# ---------------------------------------------------------------------------- scoring


def score(rewards: list[tuple[str, Any, float, dict[str, Any]]], prompts: list[PromptExample], k: int,
          texts: list[str], reward_errors: str = "raise") -> list[float]:
    """Weighted sum of the config's rewards per completion (row i belongs to prompt i // k),
    as the GRPO trainer computes it: NaN where every function returned None. A function that
    raises stops the run, or with `reward_errors: none` scores this batch None (as in training)."""
    from brainforge.rewards.registry import RewardError, call_reward

    prompt_texts = [p.text for p in prompts for _ in range(k)]
    keys = sorted({key for p in prompts for key in p.columns})
    columns = {key: [p.columns.get(key) for p in prompts for _ in range(k)] for key in keys}
    totals = [0.0] * len(texts)
    seen = [False] * len(texts)
    for name, function, weight, kwargs in rewards:
        try:
            values = call_reward(name, function, prompt_texts, texts, columns, kwargs)
        except RewardError:
            if reward_errors == "raise":
                raise
            log.warning("reward %s raised; its scores for this batch are None", name, exc_info=True)
            continue
        for i, value in enumerate(values):
            if value is not None and not math.isnan(value):
                totals[i] += weight * value
                seen[i] = True
    return [total if present else math.nan for total, present in zip(totals, seen)]


def _prompt_id(columns: dict[str, Any]) -> str | None:
    value = columns.get("id")
    return None if value is None else str(value)


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise BrainforgeError(f"{out} already exists; pass --out with another file name (traces are never overwritten)")


@contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over prompts on stderr (gone once done); yields `advance(n)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]traces"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("", total=total)
        yield lambda n: bar.advance(task, n)
