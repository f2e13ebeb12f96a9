"""Serving throughput: `brainforge serve` vs `transformers serve`, same model, same clients.

    python bench/serve.py                              # 1, 4 and 16 concurrent clients
    python bench/serve.py --clients 1,16 --max-tokens 32 --tools brainforge

Each server runs as a child process on a loopback port, with the default model in the
dtype brainforge's `auto` picks on this CPU (bf16 with AMX / AVX512-bf16, else fp32), given
to both; the clients are threads of this process using the real `openai` client, each
sending chat requests back to back (`--requests-per-client`, at least `--min-requests` in all).
transformers' server is run as a user would start it (`transformers
serve MODEL_DIR`), which generates one request at a time, and, with `--tools` including
`transformers-cb`, with its `--continuous-batching` flag. Prints one JSON line per (tool,
clients): completion tokens per second (from the responses' `usage`), requests per second,
p50/p95 latency; then the ratios brainforge / transformers at each client count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _child import cpu_name, prepare_environment

QUESTIONS = [
    "Explain what a hash table is in two sentences.", "Write a haiku about the sea.", "What is the capital of France?",
    "Give three tips for writing clear code.", "Why is the sky blue?", "Describe a cat to someone who has never seen one.",
    "What does HTTP stand for?", "List four prime numbers.", "How do plants make food?", "Summarise the water cycle.",
    "What is recursion?", "Name three planets.", "Why do we sleep?", "What is a good breakfast?",
    "How does a bicycle stay upright?", "What is machine learning?",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--tools", default="brainforge,transformers")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--startup-timeout", type=float, default=900)
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(tool: str, model_dir: Path, port: int, store: Path, dtype: str) -> list[str]:
    if tool == "brainforge":
        return [sys.executable, "-m", "brainforge", "serve", "--model", "default", "--port", str(port), "--store", str(store),
                "--dtype", dtype]
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--dtype", dtype, "--log-level", "warning"]
    return command + (["--continuous-batching"] if tool == "transformers-cb" else [])


def wait_until_up(base: str, process: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(base + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server at {base} not up after {timeout:.0f} s")


def load(base: str, model: str, clients: int, total: int, args: argparse.Namespace) -> dict:
    import openai

    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def client_loop() -> None:
        client = openai.OpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=1800)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                reply = client.chat.completions.create(model=model, max_tokens=args.max_tokens, temperature=args.temperature,
                                                       messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}])
            except Exception as exc:  # counted, reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += reply.usage.completion_tokens if reply.usage else 0

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "completion_tokens": tokens[0], "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens[0] / seconds, 2), "requests_per_s": round(len(latencies) / seconds, 3),
            "latency_p50_s": round(statistics.median(ordered), 2) if ordered else None,
            "latency_p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2) if ordered else None}


def main() -> None:
    args = parse_args()
    prepare_environment(worker=False)
    from brainforge.models.gguf import ensure_default_model

    from brainforge.hardware import resolve_dtype

    model_dir = ensure_default_model()
    dtype = str(resolve_dtype("auto")).removeprefix("torch.")   # what brainforge picks here; both servers get it
    clients = [int(c) for c in args.clients.split(",")]
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "dtype": dtype}
    results: dict[tuple[str, int], dict] = {}
    for tool in args.tools.split(","):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as scratch:
            log = open(Path(scratch) / "server.log", "w")
            process = subprocess.Popen(server_command(tool, model_dir, port, Path(scratch) / "traces.sqlite", dtype),
                                       stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            try:
                wait_until_up(base, process, args.startup_timeout)
                model = "brainforge" if tool == "brainforge" else str(model_dir)
                load(base, model, 1, 1, args)  # warm-up: first-request costs (model load, allocations) are not throughput
                for count in clients:
                    total = max(count * args.requests_per_client, args.min_requests)
                    result = {"tool": tool, **load(base, model, count, total, args), "max_tokens": args.max_tokens,
                              "temperature": args.temperature, **machine}
                    results[(tool, count)] = result
                    print(json.dumps(result), flush=True)
            except Exception as exc:
                log.flush()
                tail = (Path(scratch) / "server.log").read_text()[-1500:]
                print(json.dumps({"tool": tool, "error": str(exc), "server_log": tail}), flush=True)
            finally:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                log.close()
    for baseline in ("transformers", "transformers-cb"):
        for count in clients:
            ours, theirs = results.get(("brainforge", count)), results.get((baseline, count))
            if ours and theirs and theirs["tokens_per_s"]:
                print(json.dumps({"ratio": f"brainforge/{baseline}", "clients": count,
                                  "tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
                                  "latency_p50": round(ours["latency_p50_s"] / theirs["latency_p50_s"], 2) if theirs["latency_p50_s"] else None}))
    single = results.get(("brainforge", 1))
    if single:
        for count in clients:
            ours = results.get(("brainforge", count))
            if ours and count > 1:
                print(json.dumps({"ratio": "brainforge batched / brainforge one client", "clients": count,
                                  "tokens_per_s": round(ours["tokens_per_s"] / single["tokens_per_s"], 2)}))


if __name__ == "__main__":
    main()
