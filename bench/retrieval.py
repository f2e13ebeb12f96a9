"""Retrieval quality and speed on a real corpus nobody on this project wrote.

    python bench/retrieval.py                                  # default corpus, 200 queries
    python bench/retrieval.py --packages rich --queries 50     # a quick run

Corpus: the Python source of installed libraries (default: lightning, datasets and rich,
about 10k chunks), copied with every docstring blanked out (line numbers kept).
Queries, known by construction: the first sentence of a documented function's docstring; the
answer is the chunk that contains that function's `def` line. So a query never matches its
answer by copying it, and the answer is known without anyone labelling anything.

Measured, for function-level (`smart`) and fixed-size (`lines`) chunking with the same token
budget: Recall@1/5/10 and MRR@10 for vector only, BM25 only, hybrid (RRF) and hybrid + rerank
(`--reranker`, default the `passages` reranker); ingest throughput; query latency p50/p95
without and with rerank (one query thread). Prints one JSON line per chunking strategy, then
a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from brainforge.config import MemoryConfig, RetrievalConfig
from brainforge.memory.embedder import Embedder
from brainforge.memory.fusion import reciprocal_rank_fusion
from brainforge.memory.rerank import build_reranker
from brainforge.memory.retrieval import HybridRetriever
from brainforge.memory.store import MemoryStore

DEFAULT_PACKAGES = ["lightning", "datasets", "rich"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", nargs="+", default=DEFAULT_PACKAGES, help="installed packages whose source is the corpus")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--strategies", nargs="+", default=["smart", "lines"], choices=["smart", "lines"])
    parser.add_argument("--reranker", default="passages", help="passages, or a CrossEncoder folder / hub id")
    parser.add_argument("--rerank-queries", type=int, default=None, help="rerank only the first N queries (it is slow here)")
    parser.add_argument("--work", type=Path, default=None, help="keep corpus and stores here (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true",
                        help="keep the stores already in --work (quality and latency only; ingest figures then are not measured)")
    return parser.parse_args()


# ---------------------------------------------------------------------- corpus and queries


def build_corpus(packages: list[str], target: Path, rng: random.Random, count: int) -> list[dict]:
    """Copy each package's .py files with docstrings blanked; return queries with their answers."""
    candidates: list[dict] = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"package {package!r} is not installed")
        source_root = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(source_root.rglob("*.py")):
            relative = Path(package) / path.relative_to(source_root)
            text = path.read_text(encoding="utf-8", errors="replace")
            try:
                tree = ast.parse(text)
            except SyntaxError:
                continue
            lines = text.splitlines()
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = _docstring_node(node)
                if doc is None:
                    continue
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    sentence = _first_sentence(doc.value.value)
                    if sentence:
                        candidates.append({"query": sentence, "path": str(relative), "line": node.lineno, "name": node.name})
                for row in range(doc.lineno - 1, doc.end_lineno):
                    lines[row] = ""
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text("\n".join(lines) + "\n")
    counts: dict[str, int] = {}
    for c in candidates:
        counts[c["query"]] = counts.get(c["query"], 0) + 1
    unique = [c for c in candidates if counts[c["query"]] == 1]  # an ambiguous query has no single answer
    rng.shuffle(unique)
    return unique[:count]


def _docstring_node(node: ast.AST):
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        return body[0]
    return None


def _first_sentence(doc: str) -> str | None:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s", text)[0].strip()
    words = sentence.split()
    if len(words) < 6 or len(words) > 40 or sentence.lower().startswith(("see ", "args", "overrid", "deprecated", "alias", "same as")):
        return None
    return sentence


# ---------------------------------------------------------------------- evaluation


def first_correct_rank(ranked_ids: list[str], store: MemoryStore, query: dict, depth: int = 10) -> int | None:
    for rank, chunk_id in enumerate(ranked_ids[:depth], start=1):
        chunk = store.chunk(chunk_id)
        if chunk.path == query["path"] and chunk.start_line <= query["line"] <= chunk.end_line:
            return rank
    return None


def metrics(ranks: list[int | None]) -> dict:
    n = len(ranks)
    return {
        "recall@1": sum(1 for r in ranks if r is not None and r <= 1) / n,
        "recall@5": sum(1 for r in ranks if r is not None and r <= 5) / n,
        "recall@10": sum(1 for r in ranks if r is not None and r <= 10) / n,
        "mrr@10": sum(1.0 / r for r in ranks if r is not None) / n,
        "queries": n,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def evaluate(store: MemoryStore, queries: list[dict], reranker_spec: str, rerank_queries: int) -> dict:
    config = store.config.retrieval
    hybrid = HybridRetriever(store, RetrievalConfig(**{**config.model_dump(), "reranker": "none"}))
    reranker = build_reranker(reranker_spec, store.embedder, store)
    ranks: dict[str, list] = {"vector": [], "bm25": [], "hybrid": [], "hybrid+rerank": [], "hybrid (rerank subset)": []}
    latency_plain: list[float] = []
    latency_rerank: list[float] = []
    store.refresh()
    for index, query in enumerate(queries):
        text = query["query"]
        started = time.perf_counter()
        result = hybrid.search(text, top_k=config.recall_n)
        latency_plain.append((time.perf_counter() - started) * 1000)
        vector = store.vector_search(store.embedder.embed_query(text), config.vector_k)
        bm25 = store.bm25_search(text, config.bm25_k)
        ranks["vector"].append(first_correct_rank([c for c, _ in vector], store, query))
        ranks["bm25"].append(first_correct_rank([c for c, _ in bm25], store, query))
        fused = [h.chunk.id for h in result.hits]
        assert fused[:10] == [c for c, _ in reciprocal_rank_fusion({"vector": vector, "bm25": bm25}, k=config.rrf_k)][:10]
        ranks["hybrid"].append(first_correct_rank(fused, store, query))
        if index < rerank_queries:
            started = time.perf_counter()
            scores = reranker.scores(text, [h.chunk.text for h in result.hits], [h.chunk.id for h in result.hits])
            order = [h.chunk.id for _, h in sorted(zip(scores, result.hits), key=lambda p: -p[0])]
            latency_rerank.append(latency_plain[-1] + (time.perf_counter() - started) * 1000)
            ranks["hybrid+rerank"].append(first_correct_rank(order, store, query))
            ranks["hybrid (rerank subset)"].append(ranks["hybrid"][-1])
    if len(ranks["hybrid+rerank"]) == len(queries):
        del ranks["hybrid (rerank subset)"]  # the same as "hybrid"
    out = {name: metrics(values) for name, values in ranks.items() if values}
    out["latency_ms"] = {
        "hybrid_p50": percentile(latency_plain, 0.5), "hybrid_p95": percentile(latency_plain, 0.95),
        "rerank_p50": percentile(latency_rerank, 0.5) if latency_rerank else None,
        "rerank_p95": percentile(latency_rerank, 0.95) if latency_rerank else None,
    }
    return out


def main() -> None:
    args = parse_args()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="bf-retrieval-"))
    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    queries = build_corpus(args.packages, corpus, rng, args.queries)
    rerank_queries = min(args.rerank_queries or len(queries), len(queries))
    embedder = Embedder()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
               "embedder_dtype": str(embedder.dtype).replace("torch.", "")}
    rows = []
    for strategy in args.strategies:
        config = MemoryConfig(store=str(work / f"store-{strategy}"), chunking={"strategy": strategy})
        store = MemoryStore(config, embedder)
        if not args.reuse:
            shutil.rmtree(config.store, ignore_errors=True)
        report = store.ingest([corpus / p for p in args.packages])
        if args.reuse and report.chunks_added == 0:
            report.seconds = 0.0  # nothing was embedded: no ingest figure
        result = {
            "bench": "retrieval", "chunking": strategy, "corpus": "+".join(args.packages), "files": report.files_ingested,
            "chunks": report.chunks_total, "ingest_chunks_per_s": round(report.chunks_per_second, 1),
            "ingest_s": round(report.seconds, 1), "reranker": args.reranker, "machine": machine,
            "command": "python bench/retrieval.py " + " ".join(sys.argv[1:]),
            **evaluate(store, queries, args.reranker, rerank_queries),
        }
        print(json.dumps(result), flush=True)
        rows.append(result)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| chunking | ranker | R@1 | R@5 | R@10 | MRR@10 | queries |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for ranker in ["vector", "bm25", "hybrid", "hybrid (rerank subset)", "hybrid+rerank"]:
            if ranker in row:
                m = row[ranker]
                lines.append(f"| {row['chunking']} | {ranker} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | "
                             f"{m['recall@10']:.3f} | {m['mrr@10']:.3f} | {m['queries']} |")
    lines.append("")
    lines.append("| chunking | chunks | ingest chunks/s | hybrid p50 / p95 ms | with rerank p50 / p95 ms |")
    lines.append("|---|---|---|---|---|")
    for row in rows:
        lat = row["latency_ms"]
        rerank = f"{lat['rerank_p50']:.0f} / {lat['rerank_p95']:.0f}" if lat["rerank_p50"] is not None else "-"
        lines.append(f"| {row['chunking']} | {row['chunks']} | {row['ingest_chunks_per_s']} | "
                     f"{lat['hybrid_p50']:.1f} / {lat['hybrid_p95']:.1f} | {rerank} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
