"""Retrieval quality and speed on corpora nobody on this project wrote, stage by stage.

    python bench/retrieval.py                                          # code + docs, 500 queries per kind
    python bench/retrieval.py --corpora code docs --packages rich --queries 30   # a quick run
    python bench/retrieval.py --work W --reuse                         # same stores, no re-embedding

Corpora and queries (see bench/retrieval_corpora.py): `code` (installed packages' Python
source, docstrings kept; `docstring` and `name` queries), `code-blanked` (docstrings blanked;
`docstring` queries; the README's first table) and `docs` (the Python language reference that
ships with every Python; `heading` queries). Answers are known by construction and recorded as
chunk ids once each corpus is ingested into its own store under --work.

For every query one JSON line goes to `<work>/<corpus>.stages.jsonl`: the vector, BM25,
whole-chunk BM25 and name-BM25 lists (experiments; the product BM25 is over passages) (depth from the store's RetrievalConfig), each listed chunk's
best-passage cosine and token count, and the hybrid (reranker none) and default pipeline's
top 10. So fusion and rerank ideas can be scored offline, without the embedder:

    from bench.retrieval import evaluate_ranking, load_records
    records = load_records("W/code.stages.jsonl")
    evaluate_ranking(records, lambda r: [i for i, _ in r["bm25"]])   # {("code", "name"): {"mrr@10": ...}, ...}

Printed: one JSON line per (corpus, kind) with R@1/5/10 and MRR@10 of each stage and of the
default pipeline (`HybridRetriever(store).search(q, top_k=10)` with whatever RetrievalConfig
src/ defaults to), ingest throughput, query latency p50/p95 of the default pipeline (one query
thread), the machine and the command; then a Markdown table for the README; then whether the
default pipeline is at least as good as its best single stage on each (corpus, kind).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainforge.config import MemoryConfig, RetrievalConfig
from brainforge.errors import BrainforgeError
from brainforge.memory.bm25 import BM25Index
from brainforge.memory.fusion import reciprocal_rank_fusion
from brainforge.memory.embedder import Embedder
from brainforge.memory.retrieval import HybridRetriever
from brainforge.memory.store import MemoryStore, StoredChunk

if __package__:  # imported as bench.retrieval
    from .retrieval_corpora import (CORPORA, DEFAULT_DOC_PACKAGES, QUERY_KINDS, Corpus, Query, build_code_corpus,
                                    build_docs_corpus, chunk_index, package_root, sample_queries)
else:  # run as `python bench/retrieval.py`: bench/ is on sys.path
    from retrieval_corpora import (CORPORA, DEFAULT_DOC_PACKAGES, QUERY_KINDS, Corpus, Query, build_code_corpus,
                                   build_docs_corpus, chunk_index, package_root, sample_queries)

logger = logging.getLogger("bench.retrieval")

DEFAULT_PACKAGES = ["lightning", "datasets", "rich"]
DEPTH = 10  # R@10 / MRR@10, and how much of the hybrid and default lists a record keeps
STAGES = ("vector", "bm25", "bm25_chunks", "bm25_name", "hybrid", "default")
SINGLE_STAGES = ("vector", "bm25", "bm25_chunks")  # single stages (BM25 of whole chunks too): the default must not fall below the best
TABLE_STAGES = ("vector", "bm25_chunks", "bm25", "before", "hybrid", "default")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=["code", "docs"], choices=CORPORA)
    parser.add_argument("--packages", nargs="+", default=DEFAULT_PACKAGES, help="installed packages whose source is the code corpus")
    parser.add_argument("--doc-packages", nargs="+", default=list(DEFAULT_DOC_PACKAGES),
                        help="packages whose shipped .rst/.md files join the docs corpus if the language reference gives too few headings")
    parser.add_argument("--queries", type=int, default=500, help="queries per query kind")
    parser.add_argument("--work", type=Path, default=None, help="keep corpora, stores and stage caches here (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true",
                        help="keep the stores already in --work (quality and latency only; ingest is then not measured)")
    args = parser.parse_args(argv)
    if args.queries <= 0:
        parser.error("--queries must be positive")
    if args.reuse and args.work is None:
        parser.error("--reuse needs --work (the folder holding the stores to reuse)")
    return args


# ---------------------------------------------------------------------- evaluation (offline, from records)


def load_records(paths: str | Path | Iterable[str | Path]) -> list[dict]:
    """The stage records of one or more `<corpus>.stages.jsonl` files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records = []
    for path in paths:
        with open(path) as handle:
            records.extend(json.loads(line) for line in handle if line.strip())
    return records


def first_gold_rank(ranked: Sequence[str], gold: Iterable[str], depth: int = DEPTH) -> int | None:
    """1-based rank of the first gold chunk within `depth`, or None."""
    wanted = set(gold)
    return next((rank for rank, chunk_id in enumerate(ranked[:depth], start=1) if chunk_id in wanted), None)


def metrics(ranks: Sequence[int | None]) -> dict:
    n = len(ranks)
    return {
        "recall@1": sum(1 for r in ranks if r is not None and r <= 1) / n,
        "recall@5": sum(1 for r in ranks if r is not None and r <= 5) / n,
        "recall@10": sum(1 for r in ranks if r is not None and r <= 10) / n,
        "mrr@10": sum(1.0 / r for r in ranks if r is not None) / n,
        "queries": n,
    }


def evaluate_ranking(records: Iterable[dict], rank_fn: Callable[[dict], Sequence[str]]) -> dict[tuple[str, str], dict]:
    """R@1/R@5/R@10/MRR@10 per (corpus, kind) of the order `rank_fn(record)` gives (chunk ids,
    best first); e.g. `rank_fn=lambda r: [i for i, _ in r["bm25"]]` is the BM25 stage."""
    ranks: dict[tuple[str, str], list[int | None]] = {}
    for record in records:
        ranks.setdefault((record["corpus"], record["kind"]), []).append(first_gold_rank(list(rank_fn(record)), record["gold"]))
    return {key: metrics(values) for key, values in ranks.items()}


def before_ranker(record: dict) -> list[str]:
    """The pipeline before issue 10, replayed on the record: RRF (k 60) of the vector list and
    whole-chunk BM25, 20 candidates, then the `passages` reranker's cosine replacing the order
    (with today's pooled passage vectors)."""
    fused = reciprocal_rank_fusion({"vector": record["vector"], "bm25": record["bm25_chunks"]}, k=60)[:20]
    return [cid for cid, _ in sorted(fused, key=lambda pair: -record["passages"][pair[0]])]


def stage_ranker(stage: str) -> Callable[[dict], list[str]]:
    """The rank_fn of a stage stored in the records (score lists, or plain id lists)."""
    return lambda record: [item[0] if isinstance(item, list) else item for item in record[stage]]


def reciprocal_ranks(records: Sequence[dict], rank_fn: Callable[[dict], Sequence[str]]) -> list[float]:
    ranks = [first_gold_rank(list(rank_fn(r)), r["gold"]) for r in records]
    return [1.0 / r if r else 0.0 for r in ranks]


# ---------------------------------------------------------------------- stage lists


@dataclass
class ExperimentIndexes:
    """Two BM25 indexes the product does not use, built here to compare against it: over whole
    chunks (what the store indexed before it indexed passages) and over each chunk's definition
    name + header line only (a name field)."""

    chunks: BM25Index
    names: BM25Index

    @classmethod
    def build(cls, chunks: Sequence[StoredChunk]) -> "ExperimentIndexes":
        ids = [c.id for c in chunks]
        names = BM25Index.build(ids, [f"{c.name}\n{c.text.partition(chr(10))[0]}" for c in chunks])
        return cls(BM25Index.build(ids, [c.text for c in chunks]), names)

    def chunk_search(self, query: str, k: int) -> list[tuple[str, float]]:
        return self.chunks.search(query, k)

    def name_search(self, query: str, k: int) -> list[tuple[str, float]]:
        return self.names.search(query, k)


def forget_query_vectors(embedder: Embedder) -> None:
    """The embedder remembers recent query vectors; a timed query must embed its own, or the
    latency would leave out most of its cost."""
    getattr(embedder, "_recent_queries", {}).clear()


def _rounded(pairs: Iterable[tuple[str, float]]) -> list[list]:
    return [[chunk_id, round(float(score), 6)] for chunk_id, score in pairs]


def run_queries(corpus: str, store: MemoryStore, sample: Sequence[tuple[Query, list[str]]],
                experiments: ExperimentIndexes, tokens: dict[str, int], out) -> None:
    """Write one stage record per query to `out`."""
    config = store.config.retrieval
    default = HybridRetriever(store)
    hybrid = HybridRetriever(store, RetrievalConfig.model_validate({**config.model_dump(), "reranker": "none"}))
    for query, gold in sample:
        text = query.text
        result = default.search(text, top_k=DEPTH)
        query_vector = store.embedder.embed_query(text)
        lists = {
            "vector": store.vector_search(query_vector, config.vector_k),
            "bm25": store.bm25_search(text, config.bm25_k),
            "bm25_chunks": experiments.chunk_search(text, config.bm25_k),
            "bm25_name": experiments.name_search(text, config.bm25_k),
        }
        union = list(dict.fromkeys(cid for ranked in lists.values() for cid, _ in ranked))
        passages = {cid: round(float(np.max(np.asarray(store.passage_vectors(cid), dtype=np.float32) @ query_vector)), 6)
                    for cid in union}
        record = {"corpus": corpus, "kind": query.kind, "query": text, "gold": gold,
                  **{stage: _rounded(ranked) for stage, ranked in lists.items()},
                  "passages": passages, "chunk_tokens": {cid: tokens[cid] for cid in union},
                  "hybrid": [h.chunk.id for h in hybrid.search(text, top_k=DEPTH, rerank=False).hits],
                  "default": [h.chunk.id for h in result.hits]}
        out.write(json.dumps(record) + "\n")


def measure_latency(store: MemoryStore, texts: Sequence[str]) -> list[float]:
    """The default pipeline's wall time per query (ms), queries back to back, one warm-up
    first; separate from the record pass, whose extra indexes would disturb the caches."""
    default = HybridRetriever(store)
    default.search(texts[0], top_k=DEPTH)
    latencies = []
    for text in texts:
        forget_query_vectors(store.embedder)
        started = time.perf_counter()
        default.search(text, top_k=DEPTH)
        latencies.append((time.perf_counter() - started) * 1000.0)
    return latencies


# ---------------------------------------------------------------------- one corpus


def build(name: str, args: argparse.Namespace, work: Path) -> Corpus:
    target = work / name
    shutil.rmtree(target, ignore_errors=True)
    if name == "docs":
        return build_docs_corpus(target, args.doc_packages)
    return build_code_corpus(name, args.packages, target, blank_docstrings=name == "code-blanked")


def bench_corpus(name: str, args: argparse.Namespace, work: Path, embedder: Embedder, base: dict) -> list[dict]:
    corpus = build(name, args, work)
    for note in corpus.notes:
        logger.info("%s: %s", name, note)
    store = MemoryStore(MemoryConfig(store=str(work / f"store-{name}")), embedder)
    if not args.reuse:
        shutil.rmtree(store.root, ignore_errors=True)
    report = store.ingest([corpus.root])
    measured = report.chunks_added > 0 and not (args.reuse and report.chunks_added < report.chunks_total)
    chunks = store.committed_chunks()
    index = chunk_index((c.id, c.path, c.start_line, c.end_line) for c in chunks)
    tokens = dict(zip([c.id for c in chunks], embedder.count_tokens([c.text for c in chunks])))
    experiments = ExperimentIndexes.build(chunks)
    samples: dict[str, list[tuple[Query, list[str]]]] = {}
    dropped: dict[str, int] = {}
    for kind in QUERY_KINDS[name]:
        samples[kind], dropped[kind] = sample_queries(corpus.candidates[kind], index, args.queries, random.Random(f"{args.seed}:{kind}"))
    cache = work / f"{name}.stages.jsonl"
    with open(cache, "w") as out:
        for kind in samples:
            run_queries(name, store, samples[kind], experiments, tokens, out)
    latencies = measure_latency(store, [query.text for kind in samples for query, _ in samples[kind]])
    records = load_records(cache)
    figures = {stage: evaluate_ranking(records, stage_ranker(stage)) for stage in STAGES}
    figures["before"] = evaluate_ranking(records, before_ranker)
    rows = []
    for kind in samples:
        key = (name, kind)
        if key not in figures["default"]:
            logger.warning("%s/%s: no queries (no candidates with an answer in the store)", name, kind)
            continue
        chosen = [r for r in records if r["kind"] == kind]
        rows.append({
            **base, "corpus": name, "kind": kind, "queries": len(chosen), "candidates": len(corpus.candidates[kind]),
            "dropped_no_gold": dropped[kind], "chunks": len(chunks), "files": len(store.files()),
            "ingest_chunks_per_s": round(report.chunks_per_second, 1) if measured else None,
            "ingest_s": round(report.seconds, 1) if measured else None,
            "latency_ms": {"default_p50": round(percentile(latencies, 0.5), 1), "default_p95": round(percentile(latencies, 0.95), 1)},
            "retrieval": store.config.retrieval.model_dump(),
            "notes": corpus.notes, "stages_file": str(cache),
            **{stage: figures[stage][key] for stage in (*STAGES, "before")},
            "verdict": verdict(chosen),
        })
    return rows


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def verdict(records: Sequence[dict]) -> dict:
    """Default pipeline against its best single stage by MRR@10, with the standard error of
    the paired per-query difference (so "within noise" is a number, not a feeling)."""
    default = reciprocal_ranks(records, stage_ranker("default"))
    best_stage, best = max(((s, reciprocal_ranks(records, stage_ranker(s))) for s in SINGLE_STAGES),
                           key=lambda pair: (sum(pair[1]), pair[0] == "bm25"))
    differences = [d - b for d, b in zip(default, best)]
    n = len(differences)
    stderr = statistics.stdev(differences) / n ** 0.5 if n > 1 else float("nan")
    delta = sum(differences) / n
    return {"best_stage": best_stage, "delta_mrr@10": round(delta, 4), "stderr": round(stderr, 4),
            "default_ge_best": delta >= 0, "within_noise": abs(delta) <= 2 * stderr}


# ---------------------------------------------------------------------- report


def machine(embedder: Embedder) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "embedder_dtype": str(embedder.dtype).replace("torch.", "")}


def markdown(rows: Sequence[dict]) -> str:
    names = {"vector": "vector", "bm25": "BM25 (passages)", "bm25_chunks": "BM25 (whole chunks, before)",
             "before": "pipeline before (RRF, rerank replaces)", "hybrid": "hybrid (fusion, no rerank)",
             "default": "**default pipeline**"}
    lines = ["| corpus | queries | stage | R@1 | R@5 | R@10 | MRR@10 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for stage in TABLE_STAGES:
            m = row[stage]
            lines.append(f"| {row['corpus']} | {row['kind']} ({row['queries']}) | {names[stage]} | {m['recall@1']:.3f} | "
                         f"{m['recall@5']:.3f} | {m['recall@10']:.3f} | {m['mrr@10']:.3f} |")
    lines += ["", "| corpus | chunks | ingest | query p50 / p95 (default pipeline) |", "| --- | --- | --- | --- |"]
    seen = set()
    for row in rows:
        if row["corpus"] in seen:
            continue
        seen.add(row["corpus"])
        ingest = (f"{row['ingest_chunks_per_s']} chunks/s ({row['ingest_s'] / 60:.1f} min)"
                  if row["ingest_s"] is not None else "not measured (--reuse)")
        lat = row["latency_ms"]
        lines.append(f"| {row['corpus']} | {row['chunks']:,} | {ingest} | {lat['default_p50']:.0f} / {lat['default_p95']:.0f} ms |")
    return "\n".join(lines)


def verdict_line(rows: Sequence[dict]) -> str:
    parts = []
    for row in rows:
        v = row["verdict"]
        word = "yes" if v["default_ge_best"] else ("within noise" if v["within_noise"] else "NO")
        parts.append(f"{row['corpus']}/{row['kind']} {word} ({v['delta_mrr@10']:+.3f} MRR@10 vs {v['best_stage']}, "
                     f"stderr {v['stderr']:.3f})")
    return "default >= best single stage: " + "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="bf-retrieval-"))
    work.mkdir(parents=True, exist_ok=True)
    for package in args.packages if {"code", "code-blanked"} & set(args.corpora) else ():
        package_root(package)  # a mistyped name fails now, not after loading the embedder
    embedder = Embedder()
    base = {"bench": "retrieval", "machine": machine(embedder),
            "command": "python bench/retrieval.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows = []
    for name in dict.fromkeys(args.corpora):
        for row in bench_corpus(name, args, work, embedder, base):
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(markdown(rows))
    print(verdict_line(rows))


if __name__ == "__main__":
    try:
        main()
    except BrainforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
