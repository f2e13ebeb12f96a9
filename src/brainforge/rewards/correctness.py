"""Verifiable correctness rewards: the answer column of the dataset is the truth.

Each returns 1.0 for a correct completion and 0.0 otherwise, and None for rows that carry
no answer (so a mixed batch can combine tasks with and without references).
"""

from __future__ import annotations

import re
import string
from typing import Any

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_answer(completion: str) -> str:
    """The last <answer>...</answer> span if there is one, else the whole completion."""
    spans = ANSWER_TAG.findall(completion)
    return spans[-1] if spans else completion


def exact_match(prompts: list[str], completions: list[str], answer: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """1 when the (tagged or whole) answer equals the reference after normalisation."""
    answers = answer or [None] * len(completions)
    return [None if ref is None else float(normalize_text(extract_answer(c)) == normalize_text(str(ref))) for c, ref in zip(completions, answers)]


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def last_number_match(prompts: list[str], completions: list[str], answer: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """1 when the last number in the (tagged or whole) answer equals the numeric reference.

    Lenient on format on purpose: a small model that answers "The sum is 12." is right,
    and a reward that also demanded tags would start at 0 for every sample and teach
    nothing (see README: choosing tasks that can show learning)."""
    answers = answer or [None] * len(completions)
    out: list[float | None] = []
    for completion, ref in zip(completions, answers):
        if ref is None:
            out.append(None)
            continue
        want = last_number(str(ref))
        got = last_number(extract_answer(completion))
        out.append(float(want is not None and got is not None and abs(want - got) < 1e-9))
    return out


def math_verify_match(prompts: list[str], completions: list[str], answer: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """1 when `math-verify` finds the completion's final answer equal to the reference
    (handles LaTeX, fractions, equivalent expressions)."""
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        from brainforge.errors import MissingDependencyError

        raise MissingDependencyError("math-verify", "rl", "the math_verify reward") from exc
    answers = answer or [None] * len(completions)
    out: list[float | None] = []
    for completion, ref in zip(completions, answers):
        if ref is None:
            out.append(None)
            continue
        gold = parse(str(ref) if str(ref).startswith("$") else f"${ref}$")
        try:
            out.append(float(verify(gold, parse(extract_answer(completion)))))
        except Exception:  # math-verify raises on unparsable input: that is a wrong answer
            out.append(0.0)
    return out


def answer_format(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """Partial credit for answering inside <answer></answer> tags (0.5 for the tags, 0.5
    more when the tagged part is short, i.e. an answer rather than the whole reasoning)."""
    out = []
    for completion in completions:
        spans = ANSWER_TAG.findall(completion)
        out.append(0.0 if not spans else (1.0 if len(spans[-1].strip()) <= 40 else 0.5))
    return out
