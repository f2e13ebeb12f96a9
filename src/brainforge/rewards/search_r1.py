"""Search-R1 rewards (ALGORITHMS.md section 5): each component is its own reward, so the
trainer logs each one separately (`reward/<name>/mean`) and the config weights them.

    answer_match   0.7   the last answer block equals a gold answer (normalised EM, or F1)
    tag_order      0.2   the transcript's tags come in a legal order (`structure_valid`)
    search_bonus   0.1   a search retrieved a gold answer (an *effective* search)
    search_r1_format     the format-aware variant of Search-R1 (`qa_em_format.py`) in one reward

A completion is the transcript after the prompt: the policy's turns and the observations
the environment inserted (see `brainforge.reasoning.tags`). Scoring the transcript alone,
never the prompt, keeps the prompt's example `<answer>` out of the count.

Every function returns None for a row without a usable gold answer: such a row is not a
QA row (a mixed batch may hold other tasks), and rewarding its tags alone would teach the
format on tasks that do not ask for it. The gold `answer` of a row may be a string, a
list of strings, or a JSON-encoded list string (`'["975", "+975"]'`). Tag names come as
the keyword arguments `think_tag`, `search_tag`, `observation_tag` and `answer_tag`
(defaults: the `SearchTags` defaults), the same names as `algorithm.search`, so a config
with other tags scores what its rollouts parse.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Literal

from brainforge.reasoning.tags import SearchTags, last_answer, retrieved_blocks, structure_valid
from brainforge.rewards.correctness import normalize_text

_ARTICLES = frozenset({"a", "an", "the"})
_WORD = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?|[^\W_]+")
"""A word of `_words`: a number with its thousands commas and decimals (`1,000.5`), or a run of letters/digits."""


def search_tags(kwargs: dict[str, Any]) -> SearchTags:
    """The tag names from a reward's keyword arguments (the `algorithm.search.*_tag` names)."""
    defaults = SearchTags()
    return SearchTags(
        think=kwargs.get("think_tag", defaults.think),
        search=kwargs.get("search_tag", defaults.search),
        observation=kwargs.get("observation_tag", defaults.observation),
        answer=kwargs.get("answer_tag", defaults.answer),
    )


def gold_answers(value: Any) -> list[str] | None:
    """The gold answers of one row, or None when it has none.

    A list (or tuple) gives its items; a string that decodes as a JSON list gives that list
    (datasets that store lists as text); any other string is one gold. Golds that normalise
    to nothing ("", "the", "?") are dropped: they would match an empty answer."""
    if value is None:
        return None
    if isinstance(value, str):
        items: list[Any] = [value]
        if value.strip().startswith("["):
            try:
                decoded = json.loads(value)
            except ValueError:
                decoded = None
            if isinstance(decoded, list):
                items = decoded
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    golds = [str(item) for item in items if item is not None and normalize_text(str(item))]
    return golds or None


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between two texts after `normalize_text`."""
    predicted, wanted = normalize_text(prediction).split(), normalize_text(gold).split()
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def answer_score(answer: str | None, golds: list[str], metric: Literal["em", "f1"] = "em") -> float:
    """EM (1.0 when the normalised answer equals any normalised gold) or the best token F1;
    0.0 without an answer or when the answer normalises to nothing."""
    if answer is None or not normalize_text(answer):
        return 0.0
    if metric == "f1":
        return max(token_f1(answer, gold) for gold in golds)
    normalised = normalize_text(answer)
    return float(any(normalised == normalize_text(gold) for gold in golds))


def _words(text: str) -> list[str]:
    """Lowercase words for the whole-word containment test of `search_bonus`, articles dropped.

    Unlike `normalize_text`, punctuation separates words instead of being deleted, and a
    number keeps its decimals and drops its thousands commas ("1,000" is "1000", "1,2,3" is
    three words): deleting would glue tokens, so "97.5" would become "975" and contain the
    gold 975, and "Thimphu's" would become "thimphus" and no longer contain the gold Thimphu."""
    words = (match.group(0).replace(",", "") for match in _WORD.finditer(text.lower()))
    return [word for word in words if word not in _ARTICLES]


def contains_gold(text: str, golds: list[str]) -> bool:
    """Whether any gold's words occur in `text` as a contiguous run of whole words."""
    haystack = f" {' '.join(_words(text))} "
    return any((needle := " ".join(_words(gold))) and f" {needle} " in haystack for gold in golds)


def effective_search(completion: str, golds: list[str], tags: SearchTags) -> bool:
    """Whether some retrieved block of the transcript contains a gold answer (`contains_gold`)."""
    return any(contains_gold(block, golds) for block in retrieved_blocks(completion, tags))


def _rows(completions: list[str], answer: list[Any] | None) -> list[tuple[str, list[str] | None]]:
    answers = answer if answer is not None else [None] * len(completions)
    return [(completion, gold_answers(value)) for completion, value in zip(completions, answers)]


def answer_match(prompts: list[str], completions: list[str], answer: list[Any] | None = None, metric: Literal["em", "f1"] = "em", **kwargs: Any) -> list[float | None]:
    """Correctness: the transcript's LAST complete answer block against the golds.

    `metric="em"` (default): 1.0 when the normalised answer (lowercase, no punctuation, no
    a/an/the, single spaces; so "+975" equals "975") equals any normalised gold, else 0.0.
    `metric="f1"`: the best token F1 over the golds. The last answer counts, so answering
    many times gains nothing; an answer listing every candidate fails EM. No answer: 0.0."""
    if metric not in ("em", "f1"):
        raise ValueError(f"metric must be 'em' or 'f1', not {metric!r}")
    tags = search_tags(kwargs)
    return [None if golds is None else answer_score(last_answer(completion, tags), golds, metric) for completion, golds in _rows(completions, answer)]


def tag_order(prompts: list[str], completions: list[str], answer: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """Reasoning format: 1.0 when the transcript is `structure_valid` (think? (search
    observation think?)* answer, non-empty searches and answer, no text outside the tags,
    nothing after the answer, no corrective-note observation), else 0.0."""
    tags = search_tags(kwargs)
    return [None if golds is None else float(structure_valid(completion, tags)) for completion, golds in _rows(completions, answer)]


def search_bonus(prompts: list[str], completions: list[str], answer: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 for an effective search, else 0.0.

    A search is effective when the observation block the ENVIRONMENT returned for it
    contains a gold answer. Precisely: some block of `retrieved_blocks` (an observation
    block separated from a preceding non-empty search block by whitespace only) holds all
    the words of some gold as a contiguous run of whole words, both sides split into
    lowercase words with punctuation as a separator and articles dropped (`_words`). So
    "Thimphu's" contains "Thimphu", and "9750" or "97.5" does not contain "975".

    Only the environment writes directly after a search's closing tag (each turn's
    sampling stops there), so a `<context>` block the policy writes itself sits after text
    or a think block, never right after a search, and earns nothing however much gold it
    holds. The bonus does not depend on the answer: it rewards finding the evidence."""
    tags = search_tags(kwargs)
    return [None if golds is None else float(effective_search(completion, golds, tags)) for completion, golds in _rows(completions, answer)]


def search_r1_format(
    prompts: list[str],
    completions: list[str],
    answer: list[Any] | None = None,
    structure_format_score: float = 0.2,
    final_format_score: float = 0.1,
    retrieval_score: float = 0.0,
    **kwargs: Any,
) -> list[float | None]:
    """Search-R1's format-aware reward (`qa_em_format.py`), one number per transcript:

        correct answer, valid structure     1.0
        correct answer, invalid structure   1.0 - structure_format_score   (0.8)
        wrong answer,   valid structure     structure_format_score         (0.2)
        wrong answer,   invalid structure   final_format_score             (0.1)
        no answer,      valid structure     structure_format_score         (0.2)
        no answer,      invalid structure   0.0

    "Correct" is EM as in `answer_match`; "no answer" is no complete answer block or one
    that normalises to nothing (`<answer> ? </answer>`); "valid structure" is
    `structure_valid`. As in the reference, `retrieval_score` is added to the two
    valid-structure rows that are not correct when the search was effective
    (`search_bonus`'s definition)."""
    tags = search_tags(kwargs)
    out: list[float | None] = []
    for completion, golds in _rows(completions, answer):
        if golds is None:
            out.append(None)
            continue
        valid = structure_valid(completion, tags)
        given = last_answer(completion, tags)
        answered = given is not None and bool(normalize_text(given))
        if answered and answer_score(given, golds) == 1.0:
            out.append(1.0 if valid else 1.0 - structure_format_score)
        elif valid:
            out.append(structure_format_score + (retrieval_score if effective_search(completion, golds, tags) else 0.0))
        else:
            out.append(final_format_score if answered else 0.0)
    return out
