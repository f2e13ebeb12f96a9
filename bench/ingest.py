"""Ingest embedding throughput: today's way against the way it was, on the same chunks.

    python bench/ingest.py                       # rich's source, every chunk
    python bench/ingest.py --packages rich --limit 500

Almost all of an ingest is the embedder's forward passes (profiled: >95%), so this times
exactly that part, on the chunks a real ingest of the corpus makes, in one process:

- `separate` (before issue 10): each chunk embedded, then each of its 8-line passages
  embedded again as its own text, for the `passages` reranker;
- `pooled` (now): one forward pass per chunk; the passage vectors are mean-pooled from the
  same token states (`Embedder.embed_with_spans`).

Prints one JSON line: chunks, passages, seconds and chunks/s of each, the ratio, the
machine (CPU model name) and the command. Run it on an idle machine: both arms share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from brainforge.memory.chunking import Chunker, ChunkingConfig, detect_language
from brainforge.memory.embedder import Embedder
from brainforge.memory.store import embed_chunks, split_passages

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _child import cpu_name  # noqa: E402
from retrieval_corpora import package_root  # noqa: E402


def corpus_chunks(packages: list[str], embedder: Embedder, limit: int | None) -> list[str]:
    chunker = Chunker(embedder.count_tokens, ChunkingConfig())
    texts: list[str] = []
    for package in packages:
        root = package_root(package)
        for path in sorted(root.rglob("*.py")):
            display = f"{package}/{path.relative_to(root)}"
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.extend(chunk.text for chunk in chunker.chunk(display, text, detect_language(display)))
    return texts[:limit] if limit else texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", nargs="+", default=["rich"])
    parser.add_argument("--limit", type=int, default=None, help="embed only the first N chunks")
    args = parser.parse_args()
    embedder = Embedder()
    texts = corpus_chunks(args.packages, embedder, args.limit)
    embedder.embed_documents(texts[:16])  # warm-up: first-call allocations are not throughput

    started = time.perf_counter()
    embedder.embed_documents(texts)
    passages = [p for text in texts for p in split_passages(text) if len(split_passages(text)) > 1]
    embedder.embed_documents(passages)
    separate = time.perf_counter() - started

    started = time.perf_counter()
    embed_chunks(embedder, texts)
    pooled = time.perf_counter() - started

    print(json.dumps({
        "bench": "ingest_embedding", "corpus": "+".join(args.packages), "chunks": len(texts),
        "passages_embedded_separately": len(passages),
        "separate_s": round(separate, 1), "separate_chunks_per_s": round(len(texts) / separate, 2),
        "pooled_s": round(pooled, 1), "pooled_chunks_per_s": round(len(texts) / pooled, 2),
        "speedup": round(separate / pooled, 2), "embedder_dtype": str(embedder.dtype).replace("torch.", ""),
        "threads": embedder.config.ingest_threads or os.cpu_count(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "command": "python bench/ingest.py " + " ".join(sys.argv[1:]),
    }))


if __name__ == "__main__":
    main()
