"""Does a query look like code? Then its exact words are the evidence, and BM25 leads.

A person who types `load_base_model`, `HybridRetriever.search` or `"connection refused"` wants
the text that contains exactly that; an embedder reads such strings as a blur of word pieces.
The rule is deliberately narrow: plain words (`load base model`, a question in English) are
left to the fusion's own weights, because the benchmark shows both rankers help there.
"""

from __future__ import annotations

import re

_IDENTIFIER_SNAKE = re.compile(r"\b_*[A-Za-z][A-Za-z0-9]*(?:_+[A-Za-z0-9]+)+_*\b")  # load_base_model, MAX_TOKENS
_IDENTIFIER_CAMEL = re.compile(r"\b[A-Za-z]*[a-z][0-9]*[A-Z][A-Za-z0-9]*\b")  # loadBaseModel, HybridRetriever
_CALL = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\(")  # search(, os.path.join(
_SCOPE = re.compile(r"[A-Za-z0-9_]+::[A-Za-z_]\w*|\w+->\w+")  # Vec::new, ptr->next
_QUOTED = re.compile(r"\"[^\"\n]+\"|(?<![A-Za-z0-9])'[^'\n]+'(?![A-Za-z0-9])|`[^`\n]+`")  # not the ' in it's


def lexical_signals(query: str) -> list[str]:
    """Why `query` reads as code or an exact phrase (empty: it does not)."""
    signals = []
    for name, pattern in (("quoted", _QUOTED), ("snake_case", _IDENTIFIER_SNAKE), ("camelCase", _IDENTIFIER_CAMEL),
                          ("call", _CALL), ("scope", _SCOPE)):
        match = pattern.search(query)
        if match:
            signals.append(f"{name} {match.group(0)!r}")
    dotted = _dotted_name(query)
    if dotted:
        signals.append(f"dotted {dotted!r}")
    return signals


def _dotted_name(query: str) -> str | None:
    """`torch.nn.Linear`, `config.yaml`, `os.path`: a dot between two name characters (a full stop
    ends a sentence with a space or the end after it, so `done.` or `e.g. this` do not count
    unless the parts are names longer than one letter)."""
    for match in re.finditer(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+", query):
        parts = match.group(0).split(".")
        if all(len(part) > 1 for part in parts):
            return match.group(0)
    return None


def fusion_weights(query: str, weights: dict[str, float], lexical_boost: float) -> tuple[dict[str, float], list[str]]:
    """The weights for this query, and the signals that changed them."""
    signals = lexical_signals(query) if lexical_boost != 1.0 and weights.get("bm25", 0) > 0 else []
    if not signals:
        return dict(weights), []
    adapted = dict(weights)
    adapted["bm25"] = weights["bm25"] * lexical_boost
    return adapted, signals
