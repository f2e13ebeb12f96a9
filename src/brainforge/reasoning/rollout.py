"""Multi-turn rollouts with search calls (Search-R1, ALGORITHMS.md section 5).

Each turn samples every still-active row in one batched call of the generation engine,
stopping at the end of a search or an answer (or the end of the assistant turn):

    turn 1     all B*K rows: prompts prefilled once, K samples each
    parse      the first action of the turn's text (tags.parse_action)
    search     the queries of all searching rows go to the search tool in one call
    observe    `<context>[1] ... [2] ... [3] ...</context>` appended as token ids
    turn 2..   the rows still active continue from prompt + transcript

Token ids are appended, never re-tokenised: what the policy is trained on is exactly what it
saw. Every appended observation token is marked in `observation_mask`, built here at
concatenation time: those tokens are attended to in the loss pass but take no part in the
policy loss, the KL or the entropy (state masking).

Budgets: a rollout may take `max_search_calls` actions that are not answers (searches and
invalid actions alike: each costs an observation); after the last, one final turn is
sampled with search disabled (it may still answer). `max_turn_tokens` caps each turn,
`max_observation_tokens` each observation's retrieved text, `max_total_tokens` the whole
transcript. A search that raises or finds nothing still closes its observation tag, and the
rollout goes on; every such event is counted in the row's `SearchLog`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from brainforge.config import SearchSettings
from brainforge.generation.engine import GenerationEngine, Rollout, SamplingParams
from brainforge.reasoning.tags import Action, SearchTags, parse_action

log = logging.getLogger(__name__)

SearchFunction = Callable[[list[str]], list[list[str]]]
"""Queries in, for each query the texts of its top results (best first)."""


@dataclass
class SearchLog:
    """What happened in one rollout row, for the logs and the evaluation."""

    search_calls: int = 0
    invalid_actions: int = 0
    failed_searches: int = 0
    empty_searches: int = 0
    answered: bool = False
    ended: str = ""
    """Why the rollout stopped: answer, end_of_turn, final_turn, total_cap."""
    queries: list[str] = field(default_factory=list)


def tags_of(settings: SearchSettings) -> SearchTags:
    return SearchTags(settings.think_tag, settings.search_tag, settings.observation_tag, settings.answer_tag)


def search_messages(question: str, settings: SearchSettings, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages of a Search-R1 prompt: training, `ask` and `eval` all use these."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": settings.instruction.replace("{question}", question.strip())}]


class ObservationWriter:
    """Observation token ids: the tags tokenised once, the body cut to its token budget, so
    the closing tag is always there."""

    def __init__(self, tokenizer: Any, settings: SearchSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        tags = tags_of(settings)
        self.tags = tags
        names = "|".join(re.escape(n) for n in (tags.think, tags.search, tags.observation, tags.answer))
        self._tag_pattern = re.compile(rf"<(/?)\s*({names})\s*>", re.IGNORECASE)
        self.open_ids = self._ids(f"\n{tags.open(tags.observation)}\n")
        self.close_ids = self._ids(f"\n{tags.close(tags.observation)}\n")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def results(self, texts: list[str], room: int | None = None) -> list[int] | None:
        body = "\n".join(f"[{i}] {self.neutralise(text.strip())}" for i, text in enumerate(texts, start=1)) if texts else "No results."
        return self.wrap(body, room)

    def neutralise(self, text: str) -> str:
        """Retrieved text that contains our tags (ingested docs and code can) would close the
        observation early or plant an answer; `<context>` becomes `‹context›`."""
        return self._tag_pattern.sub(lambda m: f"‹{m.group(1)}{m.group(2)}›", text)

    def failure(self, error: str, room: int | None = None) -> list[int] | None:
        return self.wrap(f"The search failed: {error}", room)

    def invalid(self, action: Action, room: int | None = None) -> list[int] | None:
        tags = self.tags
        return self.wrap(f"Invalid action: {action.reason}. Search with {tags.open(tags.search)} query {tags.close(tags.search)} "
                         f"or answer with {tags.open(tags.answer)} answer {tags.close(tags.answer)}.", room)

    def wrap(self, body: str, room: int | None = None) -> list[int] | None:
        """The observation's ids, its body cut to `max_observation_tokens` and to what fits
        in `room` tokens with both tags; None when not even one body token fits."""
        limit = self.settings.max_observation_tokens
        if room is not None:
            limit = min(limit, room - len(self.open_ids) - len(self.close_ids))
            if limit < 1:
                return None
        return self.open_ids + self._ids(body)[:limit] + self.close_ids


@dataclass
class _Row:
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    observed: list[bool] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    log: SearchLog = field(default_factory=SearchLog)
    done: bool = False
    truncated: bool = False

    def extend(self, ids: list[int], observed: bool, logps: list[float] | None = None) -> None:
        self.ids += ids
        self.observed += [observed] * len(ids)
        self.logps += logps if logps is not None else [0.0] * len(ids)

    def room(self, settings: SearchSettings) -> int:
        """Tokens an observation may take: what the total cap leaves, minus one for the next turn."""
        return settings.max_total_tokens - len(self.ids) - 1

    def observe(self, ids: list[int] | None) -> None:
        """Append an observation, or end the rollout at the total cap when none fits."""
        if ids is None:
            self.finish("total_cap", truncated=True)
        else:
            self.extend(ids, observed=True)

    def finish(self, why: str, truncated: bool = False) -> None:
        self.done, self.truncated, self.log.ended = True, truncated, why


def search_rollout(engine: GenerationEngine, prompts: list[list[int]], num_samples: int | list[int], params: SamplingParams,
                   search: SearchFunction, settings: SearchSettings, generator: torch.Generator | None = None) -> Rollout:
    """`num_samples` multi-turn rollouts of each prompt (rows grouped by prompt, as
    `GenerationEngine.generate`). The result's `completion_ids` are the whole transcripts,
    `observation_mask` marks the environment's tokens, `logprobs` holds the sampling
    log-probs of the policy's tokens (0 on observations) and `search_logs` one SearchLog per row."""
    counts = [num_samples] * len(prompts) if isinstance(num_samples, int) else list(num_samples)
    rows = [_Row(list(prompt)) for prompt, count in zip(prompts, counts) for _ in range(count)]
    if not rows:
        return engine.generate(prompts, counts, params)
    tags = tags_of(settings)
    writer = ObservationWriter(engine.tokenizer, settings)
    stop_ids = set(engine.stop_token_ids.tolist())
    stats = {"decode_row_steps": 0.0, "completion_tokens": 0.0}
    final_turn = [False] * len(rows)
    first = True
    while True:
        active = [i for i, row in enumerate(rows) if not row.done]
        if not active:
            break
        budget = max(min(settings.max_turn_tokens, settings.max_total_tokens - len(rows[i].ids)) for i in active)
        # A final-turn row stops at a search too (which then goes unanswered): were it let
        # past `</search>`, it could write its own "retrieved" context.
        stops = (tags.close(tags.search), tags.close(tags.answer))
        turn_params = dataclasses.replace(params, max_new_tokens=budget, stop_strings=stops, return_logprobs=True)
        if first:  # one prefill per prompt, K samples of each
            out = engine.generate(prompts, counts, turn_params, generator=generator)
            first = False
        else:
            out = engine.generate([rows[i].prompt + rows[i].ids for i in active], 1, turn_params, generator=generator)
        stats["decode_row_steps"] += out.stats["decode_row_steps"]
        queries: dict[int, str] = {}
        for position, i in enumerate(active):
            row = rows[i]
            length = int(out.completion_mask[position].sum())
            room = settings.max_total_tokens - len(row.ids)
            new = out.completion_ids[position, : min(length, room)].tolist()
            assert out.logprobs is not None
            row.extend(new, observed=False, logps=out.logprobs[position, : len(new)].tolist())
            stats["completion_tokens"] += len(new)
            text = engine.tokenizer.decode(new, skip_special_tokens=True)
            action = parse_action(text, tags)
            if action.kind == "answer":
                row.log.answered = True
                row.finish("answer")
            elif new and new[-1] in stop_ids:
                row.finish("end_of_turn")
            elif len(row.ids) >= settings.max_total_tokens:
                row.finish("total_cap", truncated=True)
            elif final_turn[i]:
                row.finish("final_turn", truncated=bool(out.truncated[position]))
            elif action.kind == "search":
                queries[i] = action.content
            else:
                row.log.invalid_actions += 1
                row.observe(writer.invalid(action, row.room(settings)))
        if queries:
            observations = _observe(search, queries, writer, rows, settings)
            for i, ids in observations.items():
                rows[i].observe(ids)
        for i in active:
            row = rows[i]
            if row.done:
                continue
            if len(row.ids) >= settings.max_total_tokens:
                row.finish("total_cap", truncated=True)
            elif row.log.search_calls + row.log.invalid_actions >= settings.max_search_calls:
                final_turn[i] = True
    return _as_rollout(engine, rows, stats)


def _observe(search: SearchFunction, queries: dict[int, str], writer: ObservationWriter, rows: list[_Row],
             settings: SearchSettings) -> dict[int, list[int] | None]:
    """One call to the search tool for all rows' (distinct) queries; a failure fails every
    query of the call, each gets a closed observation saying so."""
    distinct = list(dict.fromkeys(queries.values()))
    try:
        results = search(distinct)
        if len(results) != len(distinct):
            raise RuntimeError(f"the search tool returned {len(results)} result lists for {len(distinct)} queries")
        by_query = dict(zip(distinct, results))
        error = ""
    except Exception as exc:  # the rollout must go on whatever the retriever does
        log.warning("search failed for %d queries: %s: %s", len(distinct), type(exc).__name__, exc)
        by_query, error = {}, f"{type(exc).__name__}"
    out: dict[int, list[int] | None] = {}
    for i, query in queries.items():
        log_ = rows[i].log
        log_.search_calls += 1
        log_.queries.append(query)
        if error:
            log_.failed_searches += 1
            out[i] = writer.failure(error, rows[i].room(settings))
        else:
            texts = [t for t in by_query[query] if t and t.strip()]
            log_.empty_searches += not texts
            out[i] = writer.results(texts, rows[i].room(settings))
    return out


def _as_rollout(engine: GenerationEngine, rows: list[_Row], stats: dict[str, float]) -> Rollout:
    width = max(1, max(len(row.ids) for row in rows))
    n = len(rows)
    ids = torch.full((n, width), engine.pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    observed = torch.zeros((n, width), dtype=torch.bool)
    logps = torch.zeros((n, width))
    for r, row in enumerate(rows):
        t = len(row.ids)
        ids[r, :t] = torch.tensor(row.ids, dtype=torch.long)
        mask[r, :t] = 1
        observed[r, :t] = torch.tensor(row.observed, dtype=torch.bool)
        logps[r, :t] = torch.tensor(row.logps)
    texts = [engine.tokenizer.decode(row.ids, skip_special_tokens=True) for row in rows]
    logs = [row.log for row in rows]
    stats = {**stats, "search_calls": float(sum(log_.search_calls for log_ in logs))}
    return Rollout(prompt_ids=[row.prompt for row in rows], completion_ids=ids, completion_mask=mask,
                   truncated=torch.tensor([row.truncated for row in rows]), texts=texts, logprobs=logps, stats=stats,
                   observation_mask=observed, search_logs=logs)
