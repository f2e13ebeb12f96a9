"""The tag language of reasoning with search: parse what the model asked for, and what a
transcript contains.

A transcript (everything after the prompt) alternates the policy's text and the
environment's observations:

    <think>...</think> <search>query</search>
    <context>[1] ... [2] ... [3] ...</context>          <- inserted by the environment
    <think>...</think> <answer>Thimphu</answer>

The rollout loop (rollout.py) reads the *first* complete action of each turn; the rewards
(rewards/search_r1.py) read the whole transcript: the *last* answer, the order of the tags,
and the observation blocks that follow a search. Tag names are configurable (Search-R1 itself
calls the observation `<information>`); parsing and rewards take the same `SearchTags`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal


@dataclass(frozen=True)
class SearchTags:
    think: str = "think"
    search: str = "search"
    observation: str = "context"
    answer: str = "answer"

    def open(self, name: str) -> str:
        return f"<{name}>"

    def close(self, name: str) -> str:
        return f"</{name}>"

    @cached_property
    def _block(self) -> re.Pattern[str]:
        names = "|".join(re.escape(n) for n in (self.think, self.search, self.observation, self.answer))
        return re.compile(rf"<({names})>(.*?)</\1>", re.DOTALL)

    @cached_property
    def _opening(self) -> re.Pattern[str]:
        return re.compile(rf"<({re.escape(self.search)}|{re.escape(self.answer)})>")


@dataclass(frozen=True)
class Action:
    kind: Literal["search", "answer", "invalid"]
    content: str = ""
    """The query or the answer, stripped; empty for an invalid action."""
    reason: str = ""
    """Why the action is invalid (shown to the model in the corrective observation)."""


def parse_action(text: str, tags: SearchTags = SearchTags()) -> Action:
    """The first action of one turn's text: the earliest opened `<search>` or `<answer>`
    block outside a complete think block. An opened but unclosed block, or an empty query
    or answer, is invalid; so is text with neither. (The turn's sampler stops at
    `</search>` / `</answer>`, so anything after the first action's closing tag is never
    there to be misread.)

    A tag merely mentioned inside a closed `<think>` block ("I should <search> it") is not
    an action: the rewards read the transcript with `blocks`, which treats a think block as
    opaque, and the rollout must see the same actions the rewards score."""
    thoughts = [(start, end) for name, _, start, end in blocks(text, tags) if name == tags.think]
    opened = next((m for m in tags._opening.finditer(text) if not any(start <= m.start() < end for start, end in thoughts)), None)
    if opened is None:
        return Action("invalid", reason=f"no {tags.open(tags.search)} or {tags.open(tags.answer)} block")
    name = opened.group(1)
    end = text.find(tags.close(name), opened.end())
    if end < 0:
        return Action("invalid", reason=f"{tags.open(name)} was not closed with {tags.close(name)}")
    content = text[opened.end():end].strip()
    if not content:
        return Action("invalid", reason=f"empty {tags.open(name)} block")
    return Action("search" if name == tags.search else "answer", content)


def blocks(text: str, tags: SearchTags = SearchTags()) -> list[tuple[str, str, int, int]]:
    """Every complete tag block in order: (tag name, content, start, end)."""
    return [(m.group(1), m.group(2), m.start(), m.end()) for m in tags._block.finditer(text)]


def last_answer(text: str, tags: SearchTags = SearchTags()) -> str | None:
    """The content of the last complete answer block, or None."""
    answers = [content for name, content, _, _ in blocks(text, tags) if name == tags.answer]
    return answers[-1].strip() if answers else None


def search_queries(text: str, tags: SearchTags = SearchTags()) -> list[str]:
    return [content.strip() for name, content, _, _ in blocks(text, tags) if name == tags.search]


def retrieved_blocks(text: str, tags: SearchTags = SearchTags()) -> list[str]:
    """Observation blocks that directly follow a non-empty search block (only whitespace
    between).

    Only these can be the environment's: a turn's sampling stops at the search's closing
    tag, so the policy never writes right after one. An observation tag the policy writes
    anywhere else (to fake retrieved text) is not returned. An empty search is an invalid
    action, so what follows it is the corrective note, not retrieved text."""
    found = blocks(text, tags)
    out = []
    for previous, current in zip(found, found[1:]):
        if (previous[0] == tags.search and previous[1].strip() and current[0] == tags.observation
                and not text[previous[3]:current[2]].strip()):
            out.append(current[1])
    return out


def structure_valid(text: str, tags: SearchTags = SearchTags()) -> bool:
    """The tags come in a legal order and nothing but whitespace lies outside them:
    think? (search observation think?)* answer, and nothing after the answer. Every search
    and the answer are non-empty: `parse_action` calls an empty one invalid, and the
    corrective note the rollout puts after it must not pass for a retrieval."""
    found = blocks(text, tags)
    if any(name in (tags.search, tags.answer) and not content.strip() for name, content, _, _ in found):
        return False
    position = 0
    for _, _, start, end in found:
        if text[position:start].strip():
            return False
        position = end
    if text[position:].strip():
        return False
    sequence = "".join({tags.think: "t", tags.search: "s", tags.observation: "o", tags.answer: "a"}[name] for name, *_ in found)
    return re.fullmatch(r"t?(sot?)*a", sequence) is not None


def without_observations(text: str, tags: SearchTags = SearchTags()) -> str:
    """The transcript with its observation blocks cut out: what the policy itself wrote."""
    kept, position = [], 0
    for name, _, start, end in blocks(text, tags):
        if name == tags.observation:
            kept.append(text[position:start])
            position = end
    return "".join(kept) + text[position:]
