"""APO: automatic prompt optimisation by beam search over critiques and rewrites (ProTeGi).

The agent's weights stay as they are; its prompt (`algorithm.agent.system_prompt`) is what
changes (ALGORITHMS.md section 8, as in Agent Lightning's `APO`):

1. the seed prompt is scored on a validation batch (mean reward);
2. each round, every prompt in the beam is run on a fresh training batch; a few of those
   rollouts (failures first) go to an optimiser model, which writes a critique of the prompt
   (the "textual gradient") and then a rewrite that addresses it, `branch_factor` times;
3. rewrites that are empty, unchanged, duplicates, or that lose a required placeholder
   are rejected *before* any evaluation and recorded with the reason;
4. survivors are scored on the same validation batch; the top `beam_width` of parents and
   children form the next beam; the best prompt ever seen (by validation score) wins;
5. the seed and the winner are scored on the test split, once, at the end. Selection never
   sees the test split: a small validation batch overfits, so the report must not.

Why one fixed validation batch: scores of different candidates are comparable only on the
same tasks, and a prompt's score can then be cached by its text, so a parent kept in the
beam is never re-run. Training batches are resampled each round (seeded), so critiques see
different failures.

`apo.json` (settings, seed, best, scores, every candidate with its round, parent, critique,
validation score or rejection reason) and `best_prompt.txt` are rewritten atomically after
the seed is scored and after every round, so a crash keeps the last complete round.

The optimiser is any OpenAI-compatible endpoint (`OptimiserClient`; by default the local
policy server, i.e. the agent's own model). The loop only needs an object with its two
methods (`Optimiser`), and `evaluate(prompt, tasks) -> list[EvaluatedRollout]`, which the
run glue builds on the runner and the trace store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from brainforge.config import ApoOptimiserSettings, ApoSettings
from brainforge.errors import BrainforgeError, ConfigError, DataError, MissingDependencyError

if TYPE_CHECKING:
    from brainforge.agents.store import RolloutRecord

log = logging.getLogger(__name__)

RESULT_FILE = "apo.json"
BEST_PROMPT_FILE = "best_prompt.txt"
OPEN_MARKER = "<new_prompt>"
CLOSE_MARKER = "</new_prompt>"
TRANSCRIPT_CHARS = 1500
"""Each transcript shown to the optimiser is clipped to this (head and tail kept): a small
local optimiser has a short context, and the end of a failed attempt is what matters most."""

_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.S | re.I)
_MARKED = re.compile(re.escape(OPEN_MARKER) + r"(.*?)" + re.escape(CLOSE_MARKER), re.S | re.I)
_FENCED = re.compile(r"```[^\n`]*\n(.*?)```", re.S)
_LABEL = re.compile(r"^(?:(?:new|improved|revised|updated|rewritten)\s+)?(?:system\s+)?prompt\s*:\s*", re.I)
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}


# ------------------------------------------------------------------------------ interfaces


@dataclass
class EvaluatedRollout:
    """One rollout of a prompt on one task: what `evaluate` returns per task, in task order.

    `reward` None (a failed or timed-out rollout) counts as 0, as does NaN. `transcript` is the
    rollout as text (the conversation, tool calls and results, the expected answer when
    known): the optimiser reads it to see *why* the prompt failed."""

    reward: float | None
    transcript: str
    task_id: str | None = None

    @property
    def score(self) -> float:
        if self.reward is None or not math.isfinite(self.reward):
            return 0.0
        return float(self.reward)


Evaluate = Callable[[str, list[dict[str, Any]]], list[EvaluatedRollout]]


def transcript_text(rollout: "RolloutRecord") -> str:
    """A stored rollout (`TraceStore.get_rollout`) as the text a critique reads.

    The conversation is the last LLM call's request (it holds every earlier turn) less the
    system message (the prompt under review, shown separately), then that call's own reply
    and any tool it asked for; then the task's expected answer when it has one and the
    outcome. An `evaluate` built on the runner and the store can pass this as `transcript`."""
    task = rollout.task or {}
    lines = []
    if not rollout.calls:
        lines.append("(the agent made no LLM call)")
    else:
        last = rollout.calls[-1]
        for message in last.messages:
            if message.get("role") != "system":
                lines.append(_message_line(message))
        lines.append(_message_line({"role": "assistant", "content": last.text, "tool_calls": last.tool_calls}))
        lines.extend(f"[tool {event.name}] {event.output}" for event in rollout.tool_events
                     if event.call_index is not None and event.call_index == last.index)
    if task.get("answer") is not None:
        lines.append(f"Expected answer: {task['answer']}")
    outcome = f"Outcome: {rollout.status}, reward {rollout.reward}"
    lines.append(outcome + (f", error: {rollout.error}" if rollout.error else ""))
    return "\n".join(lines)


def _message_line(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts
        content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    text = f"[{message.get('role', '?')}] {content or ''}".rstrip()
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        text += f"\n  -> calls {function.get('name')}({function.get('arguments')})"
    return text


class Optimiser(Protocol):
    """What the search needs from the optimiser model (`OptimiserClient` is the real one).

    Both methods return the model's text; `rewrite`'s reply is parsed by `extract_prompt`.
    A failed call raises `OptimiserCallError` (that candidate is recorded as rejected and the
    search goes on) or `OptimiserError` (the optimiser cannot be used at all: the run stops)."""

    def critique(self, prompt: str, rollouts: Sequence[EvaluatedRollout]) -> str: ...

    def rewrite(self, prompt: str, critique: str, placeholders: Sequence[str]) -> str: ...


class OptimiserError(BrainforgeError):
    """The optimiser endpoint cannot be used (unreachable, refused the key, unknown model)."""


class OptimiserCallError(BrainforgeError):
    """One optimiser call failed (a timeout, a request it refused); the search goes on."""


@dataclass
class Candidate:
    """One prompt the search produced; `rejected` says why it was never evaluated."""

    id: int
    round: int
    parent: int | None
    prompt: str
    critique: str | None = None
    reply: str | None = None          # the optimiser's raw rewrite reply, for debugging parses
    validation_score: float | None = None
    rejected: str | None = None


@dataclass
class ApoResult:
    best_prompt: str
    best_validation: float
    best_test: float
    seed_validation: float
    seed_test: float
    candidates: list[Candidate]
    path: Path                        # apo.json


# ------------------------------------------------------------------------------ optimiser client


class OptimiserClient:
    """Writes critiques and rewrites through any OpenAI-compatible `chat.completions` API.

    `settings.endpoint` null means the local policy server: the run glue passes its base URL
    (and its API key and served model name, when it has them) as `local_base_url`,
    `local_api_key`, `local_model`."""

    def __init__(self, settings: ApoOptimiserSettings, local_base_url: str | None = None, *,
                 local_api_key: str | None = None, local_model: str | None = None,
                 timeout_s: float = 600.0, max_retries: int = 2) -> None:
        try:
            import openai
        except ImportError as exc:
            raise MissingDependencyError("openai", "agent", "APO's optimiser client") from exc
        self._openai = openai
        self.settings = settings
        if settings.endpoint is not None:
            self.base_url, self.model = settings.endpoint, settings.model
        elif local_base_url is not None:
            self.base_url, self.model = local_base_url, local_model or settings.model
        else:
            raise ConfigError("algorithm.apo.optimiser.endpoint is null (use the local policy server) but no local "
                              "server URL was given; set algorithm.apo.optimiser.endpoint to an OpenAI-compatible base URL")
        if settings.api_key_env:
            api_key = os.environ.get(settings.api_key_env)
            if not api_key:
                raise ConfigError(f"algorithm.apo.optimiser.api_key_env: the environment variable {settings.api_key_env} "
                                  "is not set; export it with the endpoint's API key, or remove api_key_env")
        else:
            # The openai client insists on some key; an endpoint that checks none ignores it.
            api_key = (local_api_key if settings.endpoint is None else None) or "no-key"
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)

    def critique(self, prompt: str, rollouts: Sequence[EvaluatedRollout]) -> str:
        return self._complete(critique_messages(prompt, rollouts))

    def rewrite(self, prompt: str, critique: str, placeholders: Sequence[str]) -> str:
        return self._complete(rewrite_messages(prompt, critique, placeholders))

    def _complete(self, messages: list[dict[str, str]]) -> str:
        openai = self._openai
        where = f"the APO optimiser at {self.base_url} (model {self.model!r})"
        try:
            response = self._client.chat.completions.create(
                model=self.model, messages=messages,  # type: ignore[arg-type]
                temperature=self.settings.temperature, max_tokens=self.settings.max_tokens)
        except openai.APITimeoutError as exc:
            raise OptimiserCallError(f"{where} timed out: {exc}") from None
        except (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError,
                openai.NotFoundError) as exc:
            raise OptimiserError(f"{where} cannot be used: {exc}. Check algorithm.apo.optimiser.endpoint, .model "
                                 "and .api_key_env") from None
        except openai.APIError as exc:
            raise OptimiserCallError(f"{where} failed: {exc}") from None
        if not response.choices:
            raise OptimiserCallError(f"{where} answered with no choices")
        return response.choices[0].message.content or ""


def critique_messages(prompt: str, rollouts: Sequence[EvaluatedRollout]) -> list[dict[str, str]]:
    """The request for a critique ("textual gradient") of `prompt` given some of its rollouts."""
    attempts = "\n\n".join(f"## Attempt {i} (reward {_number(r.score)})\n{_clip(r.transcript.strip() or '(empty)')}"
                           for i, r in enumerate(rollouts, 1))
    user = ("An AI agent was given this prompt:\n<prompt>\n" + prompt + "\n</prompt>\n\n"
            f"Here are {len(rollouts)} of its attempts at tasks, with the reward each earned "
            "(higher is better; 1 means solved, 0 means failed):\n\n" + attempts + "\n\n"
            "What in the prompt is wrong or missing that explains the failures? Give at most four short, "
            "concrete points. Do not write a new prompt.")
    return [{"role": "system", "content": "You review the prompt given to an AI agent and explain, briefly and "
                                          "specifically, why the agent failed."},
            {"role": "user", "content": user}]


def rewrite_messages(prompt: str, critique: str, placeholders: Sequence[str]) -> list[dict[str, str]]:
    """The request for a rewrite of `prompt` that addresses `critique`, between the markers."""
    keep = (" Keep these placeholders exactly as written, each at least once: " + ", ".join(placeholders) + "."
            if placeholders else "")
    user = ("Current prompt:\n<prompt>\n" + prompt + "\n</prompt>\n\nA critique of it:\n" + critique.strip() + "\n\n"
            "Write an improved prompt that fixes the problems in the critique and keeps what already works." + keep +
            f" Reply with only the new prompt, between {OPEN_MARKER} and {CLOSE_MARKER}.")
    return [{"role": "system", "content": "You rewrite the prompt of an AI agent so that it succeeds more often."},
            {"role": "user", "content": user}]


def extract_prompt(reply: str) -> str:
    """The prompt inside an optimiser's rewrite reply; "" when there is none.

    Models do not follow formats reliably, so in order: the longest block between the markers
    (an echo of the instruction "between <new_prompt> and </new_prompt>" is a short block and
    loses); an opening marker never closed (the reply ran out); the longest fenced block; the
    whole reply less an introduction line ("Here is the improved prompt:"). Reasoning blocks
    (`<think>`), surrounding quotes and fences, and a "New prompt:" label are stripped."""
    text = _THINK.sub("", reply)
    blocks = [_unwrap(block) for block in _MARKED.findall(text)]
    blocks = [block for block in blocks if block]
    if blocks:
        return max(blocks, key=len)
    opening = text.lower().rfind(OPEN_MARKER)
    if opening >= 0 and text.lower().find(CLOSE_MARKER, opening) < 0:
        return _unwrap(text[opening + len(OPEN_MARKER):])
    fenced = [_unwrap(block) for block in _FENCED.findall(text)]
    fenced = [block for block in fenced if block]
    if fenced:
        return max(fenced, key=len)
    lines = text.strip().splitlines()
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):
        lines = lines[1:]
    return _unwrap("\n".join(lines).replace(OPEN_MARKER, "").replace(CLOSE_MARKER, ""))


def _unwrap(text: str) -> str:
    while True:
        before = text
        text = text.strip()
        if text.startswith("```"):  # a fence, its language tag line with it
            text = text[3:]
            text = (text.split("\n", 1)[1] if "\n" in text else text).rstrip().removesuffix("```")
        text = _LABEL.sub("", text.strip())
        if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1] and text[0] not in text[1:-1] and text[-1] not in text[1:-1]:
            text = text[1:-1]  # quoted as a whole (a quote inside means the quotes belong to the prompt)
        if text == before:
            return text


def _clip(text: str, limit: int = TRANSCRIPT_CHARS) -> str:
    if len(text) <= limit:
        return text
    head = limit * 2 // 5
    tail = limit - head
    return f"{text[:head]}\n[... {len(text) - limit} characters left out ...]\n{text[-tail:]}"


def _number(value: float) -> str:
    return f"{value:.3g}"


# ------------------------------------------------------------------------------ the search


def required_placeholders(settings: ApoSettings, seed_prompt: str) -> list[str]:
    """`settings.placeholders`, each checked against the seed; default: the seed's `{name}` fields."""
    if not settings.placeholders:
        return list(dict.fromkeys(_PLACEHOLDER.findall(seed_prompt)))
    for placeholder in settings.placeholders:
        if not placeholder or placeholder not in seed_prompt:
            raise ConfigError(f"algorithm.apo.placeholders: {placeholder!r} does not occur in the seed prompt "
                              "(algorithm.agent.system_prompt); list only placeholders the prompt has, e.g. '{task}', "
                              "or leave the list empty to require the seed's own {...} placeholders")
    return list(dict.fromkeys(settings.placeholders))


def run_apo(settings: ApoSettings, seed_prompt: str, evaluate: Evaluate, optimiser: Optimiser,
            train_tasks: Sequence[dict[str, Any]], validation_tasks: Sequence[dict[str, Any]],
            test_tasks: Sequence[dict[str, Any]], out_dir: Path, seed: int = 0, *,
            max_parallel_edits: int = 8) -> ApoResult:
    """Optimise `seed_prompt` by beam search (module docstring); returns the winner and its scores.

    `evaluate(prompt, tasks)` runs the agent with `prompt` once per task and returns one
    `EvaluatedRollout` per task, in order. Up to `max_parallel_edits` critique-and-rewrite
    chains run at once (the local policy server batches them); which rollouts each chain sees
    is drawn beforehand from the seeded RNG, so the history does not depend on thread timing."""
    if not seed_prompt.strip():
        raise ConfigError("algorithm.agent.system_prompt is empty; APO needs a seed prompt to improve")
    placeholders = required_placeholders(settings, seed_prompt)
    if not train_tasks:
        raise DataError("APO: the training split has no tasks; point data.source at a task set with a train split")
    if not validation_tasks:
        raise DataError(f"APO: the validation split {settings.validation_split!r} has no tasks; set "
                        "algorithm.apo.validation_split to a split the task set has")
    if not test_tasks:
        raise DataError(f"APO: the test split {settings.test_split!r} has no tasks; set algorithm.apo.test_split "
                        "to a split the task set has")
    search = _Search(settings, seed_prompt, placeholders, evaluate, optimiser, Path(out_dir), random.Random(seed),
                     max(1, max_parallel_edits), seed)
    return search.run(list(train_tasks), list(validation_tasks), list(test_tasks))


def _normal(prompt: str) -> str:
    return " ".join(prompt.split())


def _sample(rng: random.Random, tasks: list[dict[str, Any]], size: int | None) -> list[dict[str, Any]]:
    if size is None or size >= len(tasks):
        return list(tasks)
    return rng.sample(tasks, size)


def pick_for_critique(rng: random.Random, rollouts: Sequence[EvaluatedRollout], size: int) -> list[EvaluatedRollout]:
    """Up to `size` rollouts, lowest reward first (failures teach most), ties in random order."""
    shuffled = list(rollouts)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda rollout: rollout.score)[:size]


@dataclass
class _Job:
    parent: Candidate
    shown: list[EvaluatedRollout]


@dataclass
class _Edit:
    critique: str | None = None
    reply: str | None = None
    error: OptimiserCallError | None = None


@dataclass
class _Search:
    settings: ApoSettings
    seed_prompt: str
    placeholders: list[str]
    evaluate: Evaluate
    optimiser: Optimiser
    out_dir: Path
    rng: random.Random
    max_parallel_edits: int
    seed: int
    candidates: list[Candidate] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)      # validation score by normalised prompt text
    seen: dict[str, int] = field(default_factory=dict)          # normalised prompt text -> candidate id
    validation: list[dict[str, Any]] = field(default_factory=list)
    test: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def run(self, train: list[dict[str, Any]], validation: list[dict[str, Any]], test: list[dict[str, Any]]) -> ApoResult:
        settings = self.settings
        self.validation = _sample(self.rng, validation, settings.validation_batch)
        self.test = _sample(self.rng, test, settings.test_batch)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log.info("APO: beam %d x branch %d, %d rounds; %d validation, %d test tasks; placeholders %s",
                 settings.beam_width, settings.branch_factor, settings.rounds, len(self.validation), len(self.test),
                 ", ".join(self.placeholders) or "none")
        with _progress(settings.rounds) as progress:
            progress("scoring the seed prompt", 0)
            seed = self._add(Candidate(id=0, round=0, parent=None, prompt=self.seed_prompt))
            self._score(seed)
            beam = [seed]
            self._write(status="running")
            log.info("APO: seed prompt scores %s on validation", _number(self._value(seed)))
            for round_index in range(1, settings.rounds + 1):
                beam = self._round(round_index, beam, train, progress)
                self._write(status="running")
                best = self._best()
                log.info("APO round %d/%d: beam %s, best so far #%d at %s (seed %s)", round_index, settings.rounds,
                         ", ".join(f"#{c.id}={_number(self._value(c))}" for c in beam), best.id,
                         _number(self._value(best)), _number(self._value(seed)))
                progress(f"round {round_index}/{settings.rounds} done", 1)
            progress("scoring the seed and the best prompt on the test split", 0)
            best = self._best()
            seed_test = self._mean(self.seed_prompt, self.test)
            best_test = seed_test if best.id == seed.id else self._mean(best.prompt, self.test)
            self._write(status="finished", seed_test=seed_test, best_test=best_test)
        log.info("APO: best prompt #%d: validation %s, test %s (seed: validation %s, test %s); written to %s",
                 best.id, _number(self._value(best)), _number(best_test), _number(self._value(seed)),
                 _number(seed_test), self.out_dir / RESULT_FILE)
        return ApoResult(best_prompt=best.prompt, best_validation=self._value(best), best_test=best_test,
                         seed_validation=self._value(seed), seed_test=seed_test, candidates=self.candidates,
                         path=self.out_dir / RESULT_FILE)

    def _round(self, round_index: int, beam: list[Candidate], train: list[dict[str, Any]],
               progress: Callable[[str, int], None]) -> list[Candidate]:
        settings = self.settings
        jobs: list[_Job] = []
        parents: list[dict[str, Any]] = []
        for position, parent in enumerate(beam, 1):
            progress(f"round {round_index}/{settings.rounds}: running beam prompt {position}/{len(beam)} "
                     "on training tasks", 0)
            batch = _sample(self.rng, train, settings.train_batch)
            rollouts = self._evaluate(parent.prompt, batch)
            parents.append({"id": parent.id, "train_score": _mean(rollouts)})
            jobs.extend(_Job(parent, pick_for_critique(self.rng, rollouts, settings.critique_batch))
                        for _ in range(settings.branch_factor))
        progress(f"round {round_index}/{settings.rounds}: asking for {len(jobs)} critiques and rewrites", 0)
        children = [child for child in (self._child(round_index, job, outcome)
                                        for job, outcome in zip(jobs, self._edit(jobs))) if child.rejected is None]
        for position, child in enumerate(children, 1):
            progress(f"round {round_index}/{settings.rounds}: scoring candidate {position}/{len(children)}", 0)
            self._score(child)
        pool = sorted(beam + children, key=lambda candidate: (-self._value(candidate), candidate.id))
        beam = pool[:settings.beam_width]
        best = self._best()
        self.rounds.append({"round": round_index, "parents": parents, "children": [c.id for c in children],
                            "rejected": len(jobs) - len(children), "beam": [c.id for c in beam],
                            "best": best.id, "best_validation": self._value(best)})
        return beam

    def _edit(self, jobs: list[_Job]) -> list[_Edit]:
        """Critique then rewrite per job, concurrently; results in job order."""
        def one(job: _Job) -> _Edit:
            edit = _Edit()
            try:
                edit.critique = self.optimiser.critique(job.parent.prompt, job.shown)
                edit.reply = self.optimiser.rewrite(job.parent.prompt, edit.critique, self.placeholders)
            except OptimiserCallError as exc:
                edit.error = exc
            return edit

        if self.max_parallel_edits == 1 or len(jobs) <= 1:
            return [one(job) for job in jobs]
        pool = ThreadPoolExecutor(max_workers=min(self.max_parallel_edits, len(jobs)), thread_name_prefix="apo-edit")
        try:
            futures = [pool.submit(one, job) for job in jobs]
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _child(self, round_index: int, job: _Job, edit: _Edit) -> Candidate:
        child = Candidate(id=len(self.candidates), round=round_index, parent=job.parent.id, prompt="",
                          critique=edit.critique, reply=edit.reply)
        if edit.error is not None or edit.reply is None:
            child.rejected = f"optimiser call failed: {edit.error}"
        else:
            child.prompt = extract_prompt(edit.reply)
            child.rejected = self._rejection(child.prompt, job.parent)
        if child.rejected is not None:
            log.debug("APO: candidate #%d (from #%d) rejected: %s", child.id, job.parent.id, child.rejected)
        return self._add(child)

    def _rejection(self, prompt: str, parent: Candidate) -> str | None:
        key = _normal(prompt)
        if not key:
            return "empty rewrite (no prompt found in the optimiser's reply)"
        if key == _normal(parent.prompt):
            return "unchanged (the rewrite is its parent)"
        missing = [p for p in self.placeholders if p not in prompt]
        if missing:
            return f"lost required placeholder(s) {', '.join(missing)}"
        if key in self.seen:
            return f"duplicate of candidate #{self.seen[key]}"
        return None

    def _add(self, candidate: Candidate) -> Candidate:
        self.candidates.append(candidate)
        if candidate.rejected is None:
            self.seen.setdefault(_normal(candidate.prompt), candidate.id)
        return candidate

    def _score(self, candidate: Candidate) -> None:
        key = _normal(candidate.prompt)
        if key not in self.scores:
            self.scores[key] = self._mean(candidate.prompt, self.validation)
        candidate.validation_score = self.scores[key]

    def _value(self, candidate: Candidate) -> float:
        assert candidate.validation_score is not None, f"candidate #{candidate.id} was never scored"
        return candidate.validation_score

    def _best(self) -> Candidate:
        """Best validation score ever seen; ties go to the older candidate (the seed unless beaten)."""
        scored = [c for c in self.candidates if c.rejected is None and c.validation_score is not None]
        return min(scored, key=lambda candidate: (-self._value(candidate), candidate.id))

    def _mean(self, prompt: str, tasks: list[dict[str, Any]]) -> float:
        return _mean(self._evaluate(prompt, tasks))

    def _evaluate(self, prompt: str, tasks: list[dict[str, Any]]) -> list[EvaluatedRollout]:
        rollouts = list(self.evaluate(prompt, tasks))
        if len(rollouts) != len(tasks):
            raise ValueError(f"APO evaluate returned {len(rollouts)} rollouts for {len(tasks)} tasks; it must "
                             "return one EvaluatedRollout per task, in order")
        return rollouts

    def _write(self, *, status: str, seed_test: float | None = None, best_test: float | None = None) -> None:
        seed, best = self.candidates[0], self._best()
        document = {
            "status": status,
            "rounds_completed": len(self.rounds),
            "seed": self.seed,
            "settings": self.settings.model_dump(mode="json"),
            "placeholders": self.placeholders,
            "validation_tasks": len(self.validation),
            "test_tasks": len(self.test),
            "seed_prompt": seed.prompt,
            "seed_validation_score": seed.validation_score,
            "seed_test_score": seed_test,
            "best_candidate": best.id,
            "best_prompt": best.prompt,
            "best_validation_score": best.validation_score,
            "best_test_score": best_test,
            "seconds": round(time.time() - self.started, 3),
            "rounds": self.rounds,
            "candidates": [asdict(candidate) for candidate in self.candidates],
        }
        _write_atomic(self.out_dir / RESULT_FILE, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        _write_atomic(self.out_dir / BEST_PROMPT_FILE, best.prompt + "\n")


def _mean(rollouts: Sequence[EvaluatedRollout]) -> float:
    return sum(rollout.score for rollout in rollouts) / len(rollouts) if rollouts else 0.0


def _write_atomic(path: Path, text: str) -> None:
    """Written beside and renamed into place: a crash leaves the previous complete file."""
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


@contextmanager
def _progress(rounds: int) -> Iterator[Callable[[str, int], None]]:
    """A rich progress bar over rounds on stderr when it is a terminal; yields `update(what, advance)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]APO"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
                  TimeElapsedColumn(), TextColumn("{task.description}"), transient=True, console=console,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task("", total=rounds)
        yield lambda description, advance: bar.update(task, description=description, advance=advance)
