"""BM25 over chunk texts with bm25s, tokenised for code as well as prose.

Identifiers are split the way people ask about them: `load_base_model` and `loadBaseModel`
both yield `load`, `base`, `model` (plus the whole identifier), so a question in words finds
the function. The index is rebuilt from all texts when the store changes: bm25s indexes 10k
chunks in about half a second here, which is cheaper than being clever about updates.

The store indexes each chunk's 8-line passages (`chunk-id#n`) and a chunk scores as its best
passage: a question matches a few lines, and a long chunk's other lines only dilute BM25's
length-normalised score. Measured on bench/retrieval.py: MRR@10 +0.008 to +0.015 over
whole-chunk BM25 on every query kind (README). Indexes of whole chunks (older stores) work too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path


from brainforge.errors import MissingDependencyError

PASSAGE_SEPARATOR = "#"  # index row id = chunk id + "#" + passage number; chunk ids are hex
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
STOPWORDS = frozenset(
    "a an and are as at be by for from has have how i in is it its of on or that the this to was what when "
    "where which who why will with do does did can you your we our self".split()
)


def split_identifier(name: str) -> list[str]:
    """`load_base_model` / `loadBaseModel` / `HTTPServer` -> lower-case words."""
    return [part.lower() for word in re.split(r"[^0-9A-Za-z]+", name) for part in _CAMEL.findall(word)]


def tokenize(text: str) -> list[str]:
    """Lower-cased words; snake_case and camelCase identifiers also split into their parts."""
    tokens: list[str] = []
    for identifier in re.findall(r"[A-Za-z0-9_]+", text):
        parts = split_identifier(identifier)
        whole = identifier.strip("_").lower()
        if len(parts) > 1 and whole:
            tokens.append(whole)
        tokens.extend(parts)
    return [_singular(token) for token in tokens if token not in STOPWORDS]


def _singular(word: str) -> str:
    """A light plural stemmer: `models` and `model` should meet; `class` and `status` stay."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise MissingDependencyError("bm25s", "memory", "BM25 search") from None
    return bm25s


class BM25Index:
    """A bm25s index plus the chunk id of each row."""

    def __init__(self, ids: list[str], retriever: object | None) -> None:
        self.ids = ids
        self.retriever = retriever

    @classmethod
    def build(cls, ids: Sequence[str], texts: Sequence[str]) -> "BM25Index":
        if not ids:
            return cls([], None)
        bm25s = _bm25s()
        retriever = bm25s.BM25()
        retriever.index([tokenize(text) or ["\x00"] for text in texts], show_progress=False)
        return cls(list(ids), retriever)

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        terms = tokenize(query)
        if self.retriever is None or not terms:
            return []
        # bm25s only scores terms it has seen; unknown words must not make it raise
        known = [t for t in terms if t in self.retriever.vocab_dict]  # type: ignore[attr-defined]
        if not known:
            return []
        depth = min(3 * k, len(self.ids))  # a chunk has ~3 passages: one pass is usually enough
        while True:  # rows are passages: look deeper until k distinct chunks (or everything) are in
            rows, scores = self.retriever.retrieve([known], k=depth, show_progress=False, n_threads=1)  # type: ignore[attr-defined]
            best: dict[str, float] = {}
            for row, score in zip(rows[0], scores[0]):
                if score > 0:  # best first, so a chunk's first row is its best passage
                    best.setdefault(self.ids[int(row)].partition(PASSAGE_SEPARATOR)[0], float(score))
            if len(best) >= k or depth >= len(self.ids) or scores[0][-1] <= 0:
                return list(best.items())[:k]
            depth = min(len(self.ids), depth * 4)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ids.json").write_text(json.dumps(self.ids))
        if self.retriever is not None:
            self.retriever.save(str(folder), show_progress=False)  # type: ignore[attr-defined]

    @classmethod
    def load(cls, folder: Path) -> "BM25Index":
        ids = json.loads((folder / "ids.json").read_text())
        if not ids:
            return cls([], None)
        retriever = _bm25s().BM25.load(str(folder), show_progress=False, mmap=False)
        return cls(ids, retriever)
