"""`brainforge memory tune`: fine-tune the embedder on pairs mined from the store's own chunks.

A general-purpose embedder has never seen the user's code or docs. Their corpus labels itself,
though: a docstring says what the code under it does, a heading names the section under it, a
function's name is a short description of its body. Each gives a (query-like anchor, target
chunk) pair. Training with in-batch negatives (MultipleNegativesRankingLoss) pulls each anchor
towards its chunk and away from the other chunks in the batch.

Pairs are split by TARGET chunk, so the held-out figures measure finding chunks the tuning
never saw as positives, with anchors it never saw either; they are measured by exact vector
search over the whole store, before (the store's current vectors) and after (the re-embedded
store). The tuned model is saved inside the store and committed together with the new vectors
(see `MemoryStore.adopt_tuned_embedder`).
"""

from __future__ import annotations

import ast
import hashlib
import logging
import re
import shutil
import tempfile
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainforge.config import MemoryConfig, TuneSettings
from brainforge.errors import MissingDependencyError, StoreError
from brainforge.memory.bm25 import split_identifier
from brainforge.memory.chunking import rst_title
from brainforge.memory.embedder import DEFAULT_EMBEDDER_ID, default_embedder_path, torch_threads
from brainforge.memory.store import TUNED_PREFIX, MemoryStore, StoredChunk

logger = logging.getLogger(__name__)

KINDS = ("docstring", "heading", "identifier")
MIN_TRAIN, MIN_HELD_OUT = 20, 5
_DOCSTRING_KINDS = {"function", "method", "class", "type"}
_IDENTIFIER_KINDS = {"function", "method", "class"}
_PROSE_LANGUAGES = {"markdown", "text", "lines"}
_PART = re.compile(r"\(part (\d+)/\d+\)")
_DEFINITION_LINE = re.compile(r"^\s*(async\s+def|def|class)\s")
_COMMENT_LINE = re.compile(r"^\s*(///?|#(?![!\[]|include|define|if|endif|pragma)|/\*\*?|\*/?|--)")
_MARKDOWN_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
PAIRS_HELP = ("pairs come from documented definitions in code (a docstring or a comment right above them), Markdown "
              "sections under headings, and definitions with multi-word names (load_base_model)")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainingPair:
    """A query-like `anchor` and the `positive` text of the chunk `target_id` it should find."""

    anchor: str
    positive: str
    kind: str  # docstring, heading or identifier
    target_id: str


@dataclass(frozen=True)
class RetrievalFigures:
    """Held-out anchors searched over the whole store, scored by where their target chunk lands."""

    recall_at_1: float
    recall_at_10: float
    mrr_at_10: float
    queries: int


@dataclass
class TuneReport:
    pairs_by_kind: Counter = field(default_factory=Counter)  # mined (unambiguous) pairs, per kind
    pairs_used: int = 0  # after the max_pairs sample
    train_pairs: int = 0
    held_out_pairs: int = 0
    dropped_anchor_overlap: int = 0  # training pairs dropped because their anchor is also held out
    chunks: int = 0
    base_embedder: str = ""
    before: RetrievalFigures | None = None
    after: RetrievalFigures | None = None
    embedder_folder: Path | None = None
    train_seconds: float = 0.0
    reembed_seconds: float = 0.0
    seconds: float = 0.0


# ---------------------------------------------------------------------- mining


def first_sentence(text: str) -> str:
    """The first sentence of a docstring or comment, on one line."""
    paragraph = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    flat = " ".join(paragraph.split())
    return _SENTENCE_END.split(flat, maxsplit=1)[0] if flat else ""


def _header_and_body(chunk: StoredChunk) -> tuple[str, list[str]]:
    header, _, body = chunk.text.partition("\n")
    return header, body.split("\n")


def _is_later_part(header: str) -> bool:
    match = _PART.search(header)
    return bool(match) and match.group(1) != "1"


def _python_docstring(lines: list[str]) -> tuple[str, int, int] | None:
    """(docstring, first line, last line) of the first definition, 0-based in `lines`."""
    try:
        tree = ast.parse(textwrap.dedent("\n".join(lines)))
    except (SyntaxError, ValueError):
        return None
    definition = next((node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))), None)
    if definition is None or not definition.body:
        return None
    first = definition.body[0]
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)):
        return None
    end = first.end_lineno if first.end_lineno is not None else first.lineno
    return first.value.value, first.lineno - 1, end - 1


def _leading_comment(lines: list[str]) -> tuple[str, int, int] | None:
    """The comment block that opens the chunk (the chunker keeps it with its definition)."""
    end = -1
    for index, line in enumerate(lines):
        if line.strip() and _COMMENT_LINE.match(line):
            end = index
        elif line.strip() or end >= 0:
            break
    if end < 0:
        return None
    start = next(i for i, line in enumerate(lines) if line.strip())
    text = "\n".join(re.sub(r"^\s*(///?|#+|/\*\*?|\*/|\*|--)\s?", "", line).rstrip().removesuffix("*/") for line in lines[start:end + 1])
    return text, start, end


def _docstring_pair(chunk: StoredChunk) -> TrainingPair | None:
    if chunk.kind not in _DOCSTRING_KINDS or chunk.language in _PROSE_LANGUAGES:
        return None
    header, lines = _header_and_body(chunk)
    if _is_later_part(header):
        return None
    found = _python_docstring(lines) if chunk.language == "python" else None
    found = found or _leading_comment(lines)
    if found is None:
        return None
    text, start, end = found
    if _DEFINITION_LINE.match(lines[start]):
        return None  # `def f(): """doc"""` on one line: removing the docstring would remove the code
    anchor = first_sentence(text)
    if not 6 <= len(anchor.split()) <= 40:
        return None
    rest = lines[:start] + lines[end + 1:]
    if not any(line.strip() for line in rest):
        return None
    return TrainingPair(anchor, header + "\n" + "\n".join(rest), "docstring", chunk.id)


def _heading_pair(chunk: StoredChunk) -> TrainingPair | None:
    header, lines = _header_and_body(chunk)
    if chunk.language not in {"markdown", "restructuredtext"} or chunk.kind != "section" or not header.startswith("# Section: "):
        return None  # a merged run of small sections has no one heading
    found = _markdown_title(lines) if chunk.language == "markdown" else _rst_title(lines, 0)
    if found is None:
        return None  # a later part of a long section, or text before the first heading
    title, body_start = found
    rest = "\n".join(lines[body_start:]).strip()
    if not title or not rest:
        return None
    return TrainingPair(title, rest, "heading", chunk.id)


def _rst_title(lines: list[str], index: int) -> tuple[str, int] | None:
    """A reST section chunk opens with its title (under- or over-and-underlined), as the chunker found it."""
    found = rst_title(lines, index) if lines else None
    return (found[3], found[1] + 1) if found and found[0] == index else None


def _markdown_title(lines: list[str]) -> tuple[str, int] | None:
    match = _MARKDOWN_HEADING.match(lines[0]) if lines else None
    return (match.group(1).strip(), 1) if match else None


def _identifier_pair(chunk: StoredChunk) -> TrainingPair | None:
    if chunk.kind not in _IDENTIFIER_KINDS or chunk.language in _PROSE_LANGUAGES or not chunk.name or "," in chunk.name:
        return None
    header, _ = _header_and_body(chunk)
    if _is_later_part(header):
        return None
    words = split_identifier(chunk.name)
    if len(words) < 2:
        return None
    return TrainingPair(" ".join(words), chunk.text, "identifier", chunk.id)


_MINERS = {"docstring": _docstring_pair, "heading": _heading_pair, "identifier": _identifier_pair}


def _anchor_key(anchor: str) -> str:
    return " ".join(anchor.lower().split())


def mine_pairs(chunks: Iterable[StoredChunk], kinds: Sequence[str] = KINDS) -> list[TrainingPair]:
    """Every unambiguous pair of the given kinds, in a deterministic order (target, kind, anchor).

    An anchor that would point at several chunks (two `get_name` methods, two "Usage" headings)
    is dropped: either answer would be right, so it teaches nothing and would score as a miss."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown pair kinds {sorted(unknown)}; use {', '.join(KINDS)}")
    pairs = [pair for chunk in chunks for kind in kinds if (pair := _MINERS[kind](chunk)) is not None]
    targets: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        targets[_anchor_key(pair.anchor)].add(pair.target_id)
    unique = {(p.target_id, p.kind, p.anchor): p for p in pairs if len(targets[_anchor_key(p.anchor)]) == 1}
    return [unique[key] for key in sorted(unique)]


# ---------------------------------------------------------------------- split


def _unit_hash(*parts: object) -> float:
    digest = hashlib.sha1("\0".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_pairs(pairs: Sequence[TrainingPair], held_out: float, seed: int) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """(train, held out), split by target chunk: every pair of a held-out chunk is held out, and a
    training pair whose anchor or positive text also occurs held out is dropped, so the held-out
    figures never reward memorising. Deterministic in (pairs, held_out, seed)."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be between 0 and 1, got {held_out}")
    held = [p for p in pairs if _unit_hash(seed, p.target_id) < held_out]
    held_anchors = {_anchor_key(p.anchor) for p in held}
    held_targets = {p.target_id for p in held}
    held_positives = {p.positive for p in held}
    train = [p for p in pairs if p.target_id not in held_targets
             and _anchor_key(p.anchor) not in held_anchors and p.positive not in held_positives]
    return train, held


def sample_pairs(pairs: Sequence[TrainingPair], limit: int, seed: int) -> list[TrainingPair]:
    """At most `limit` pairs, a deterministic sample by seed, in the input order."""
    if len(pairs) <= limit:
        return list(pairs)
    keep = set(sorted(range(len(pairs)), key=lambda i: _unit_hash(seed, "sample", pairs[i].target_id, pairs[i].anchor))[:limit])
    return [pair for i, pair in enumerate(pairs) if i in keep]


# ---------------------------------------------------------------------- evaluation


def retrieval_figures(query_vectors: np.ndarray, targets: Sequence[str], ids: Sequence[str],
                      vectors: np.ndarray) -> RetrievalFigures:
    """R@1, R@10 and MRR@10 of each query's target among ALL chunks, by exact cosine search."""
    if not len(targets):
        return RetrievalFigures(0.0, 0.0, 0.0, 0)
    position = {cid: i for i, cid in enumerate(ids)}
    scores = query_vectors @ vectors.T
    reciprocal, at_1, at_10 = 0.0, 0, 0
    for row, target in enumerate(targets):
        own = scores[row, position[target]]
        rank = 1 + int(np.sum(scores[row] > own))  # ties count in the target's favour
        at_1 += rank == 1
        at_10 += rank <= 10
        reciprocal += 1.0 / rank if rank <= 10 else 0.0
    count = len(targets)
    return RetrievalFigures(at_1 / count, at_10 / count, reciprocal / count, count)


def _evaluate(store: MemoryStore, held: Sequence[TrainingPair], ids: Sequence[str]) -> RetrievalFigures:
    queries = store.embedder.embed_queries([p.anchor for p in held])
    return retrieval_figures(queries, [p.target_id for p in held], ids, store.chunk_vectors(ids))


# ---------------------------------------------------------------------- tuning


def _base_model_path(store: MemoryStore) -> Path:
    """Where the store's current embedder is; tuning starts from it."""
    model_id = store.embedder.model_id
    if model_id == DEFAULT_EMBEDDER_ID:
        return default_embedder_path()
    if model_id.startswith(TUNED_PREFIX):
        return store.root / model_id[len(TUNED_PREFIX):]
    raise StoreError(f"{store.root} was built with embedder {model_id}; `brainforge memory tune` tunes the default "
                     "embedder (or a store it tuned before): rebuild the store with memory.embedder.name_or_path: default")


def _train(base: Path, train: Sequence[TrainingPair], settings: TuneSettings, threads: int | None,
           show_progress: bool) -> object:
    """sentence-transformers' own training loop, on CPU in float32; returns the trained model."""
    try:
        import torch
        from datasets import Dataset
        from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.training_args import BatchSamplers
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "sentence-transformers", "memory", "Embedder tuning") from None
    model = SentenceTransformer(str(base), device="cpu", model_kwargs={"dtype": torch.float32})
    dataset = Dataset.from_dict({"anchor": [p.anchor for p in train], "positive": [p.positive for p in train]})
    steps = max(1, -(-len(train) // settings.batch_size) * settings.epochs)
    scratch = Path(tempfile.mkdtemp(prefix="brainforge-tune-"))
    try:
        args = SentenceTransformerTrainingArguments(
            output_dir=str(scratch), num_train_epochs=settings.epochs, per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate, warmup_steps=max(1, steps // 10), seed=settings.seed, data_seed=settings.seed,
            use_cpu=True, bf16=False, fp16=False, save_strategy="no", report_to="none",
            logging_steps=max(1, steps // 10), disable_tqdm=not show_progress, dataloader_num_workers=0,
            # Two pairs of one chunk in a batch would make its positive a "negative" of the other.
            batch_sampler=BatchSamplers.NO_DUPLICATES)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                             loss=MultipleNegativesRankingLoss(model))
        with torch_threads(threads):
            trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    model.eval()
    return model


def tune_embedder(store: MemoryStore, config: TuneSettings, progress: Progress | None = None) -> TuneReport:
    """Mine pairs, split them, measure, train, save the tuned embedder in the store and
    re-embed the store with it (committed atomically), then measure again."""
    started = time.perf_counter()
    say = progress or (lambda message: logger.info("%s", message))
    store.require_existing()
    chunks = store.committed_chunks()
    if not chunks:
        raise StoreError(f"{store.root}: the store is empty; ingest files first with `brainforge ingest PATH...`")
    report = TuneReport(chunks=len(chunks), base_embedder=store.embedder.model_id)
    base = _base_model_path(store)
    pairs = mine_pairs(chunks, config.kinds)
    report.pairs_by_kind = Counter(p.kind for p in pairs)
    pairs = sample_pairs(pairs, config.max_pairs, config.seed)
    report.pairs_used = len(pairs)
    train, held = split_pairs(pairs, config.held_out, config.seed)
    report.train_pairs, report.held_out_pairs = len(train), len(held)
    report.dropped_anchor_overlap = len(pairs) - len(train) - len(held)
    if len(train) < MIN_TRAIN or len(held) < MIN_HELD_OUT:
        mined = ", ".join(f"{report.pairs_by_kind[k]} {k}" for k in config.kinds)
        raise StoreError(f"{store.root}: too few pairs to tune on: {len(train)} for training and {len(held)} held out "
                         f"(need >= {MIN_TRAIN} and >= {MIN_HELD_OUT}; mined {mined} from {len(chunks)} chunks); "
                         f"{PAIRS_HELP}: ingest more such files, or change --held-out")
    ids = [c.id for c in chunks]
    say(f"pairs: {len(train)} training, {len(held)} held out; measuring the current embedder on the held-out pairs")
    report.before = _evaluate(store, held, ids)
    say(f"training {config.epochs} epoch(s) from {report.base_embedder} on CPU (float32)")
    train_started = time.perf_counter()
    model = _train(base, train, config, store.config.embedder.ingest_threads, show_progress=progress is not None)
    report.train_seconds = time.perf_counter() - train_started
    say(f"re-embedding {len(chunks)} chunks with the tuned embedder")
    reembed_started = time.perf_counter()
    folder = store.adopt_tuned_embedder(lambda path: model.save(str(path)))  # type: ignore[attr-defined]
    report.reembed_seconds = time.perf_counter() - reembed_started
    report.embedder_folder = store.root / folder
    report.after = _evaluate(store, held, ids)
    report.seconds = time.perf_counter() - started
    return report


def load_and_tune(memory: MemoryConfig, progress: Progress | None = None) -> TuneReport:
    """The CLI's entry: open the store the config names and tune it."""
    return tune_embedder(MemoryStore(memory), memory.tune, progress)
