"""Model loading: base model (optionally 4-bit), tokenizer, LoRA adapter.

QLoRA is LoRA plus a quantize flag: the same `attach_lora` runs on a bf16 base or on a
bitsandbytes NF4 base. We deliberately skip peft's `prepare_model_for_kbit_training`: it
casts embeddings and the output head to fp32, which on CPU turns the largest matmul of the
model (the 49k-vocab head) from an AMX bf16 kernel into a 6x slower fp32 one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from brainforge.config import LoraSettings, ModelConfig, QuantizationConfig
from brainforge.errors import ModelError
from brainforge.hardware import resolve_dtype
from brainforge.models.gguf import ensure_default_model, ensure_gguf_converted

log = logging.getLogger(__name__)

ADAPTER_META = "brainforge_adapter.json"
ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
_REPAIR = "copy the adapter folder again from its run (adapter/ or checkpoints/step-N/adapter/)"


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for `default`, GGUF files and folders; hub ids pass through."""
    if name_or_path == "default":
        return str(ensure_default_model())
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name_or_path: GGUF file not found: {path}")
        return str(ensure_gguf_converted(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return str(ensure_gguf_converted(ggufs[0]))
            raise ModelError(f"model.name_or_path: {path} has no config.json; it is not a Hugging Face model folder")
        return str(path)
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"model.name_or_path: {name_or_path} does not exist; give a model folder, a .gguf file, 'default', or a hub id")
    return name_or_path  # a hub id: transformers will try the cache, then the network


def load_tokenizer(model_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(f"could not load a tokenizer for '{model_path}': {exc}. Offline? Use a local folder or 'default'.") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_cfg: ModelConfig,
    dtype: torch.dtype,
    quantization: QuantizationConfig | None = None,
    model_path: str | None = None,
) -> Any:
    """The frozen base model, in `dtype` or 4-bit NF4 when quantization asks for it."""
    from transformers import AutoModelForCausalLM

    path = model_path or resolve_model_path(model_cfg.name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_cfg.trust_remote_code}
    if quantization is not None and quantization.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=resolve_dtype(quantization.bnb_4bit_compute_dtype),
            bnb_4bit_quant_type=quantization.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=quantization.bnb_4bit_use_double_quant,
        )
        kwargs["device_map"] = {"": _quantized_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"model.name_or_path: could not load '{model_cfg.name_or_path}': {exc}. Offline? Use a local folder or 'default'.") from exc
    model.config.use_cache = False
    return model


def attach_lora(
    model: Any,
    lora: LoraSettings,
    adapter_path: str | None = None,
    trainable: bool = True,
    gradient_checkpointing: bool = False,
) -> Any:
    """Wrap the base in a PEFT model: a fresh adapter, or an existing one to continue."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if adapter_path:
        return load_adapter(model, adapter_path, trainable=trainable)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        target_modules=lora.target_modules,
        lora_dropout=lora.lora_dropout,
        bias=lora.bias,
        task_type=lora.task_type,
    )
    return get_peft_model(model, config)


def load_adapter(model: Any, adapter_path: str | Path, trainable: bool = False) -> Any:
    """Load a saved adapter onto `model`, with a clear error when it does not fit."""
    from peft import PeftModel

    adapter_path = Path(adapter_path)
    adapter_config = check_adapter_folder(adapter_path)  # before PEFT, which would try the hub for missing files
    try:
        return PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        base = adapter_config.get("base_model_name_or_path")
        raise ModelError(
            f"{adapter_path}: this adapter does not match the base model (it was trained on {base!r}). "
            f"Load it with the base it was trained on. Details: {str(exc).splitlines()[0][:300]}"
        ) from exc


def resolve_adapter_dir(path: str | Path) -> Path:
    """The adapter folder of a run folder (`RUN/adapter`) or the adapter folder itself, checked."""
    path = Path(path)
    if (path / "adapter").is_dir():
        path = path / "adapter"
    check_adapter_folder(path)
    return path


def check_adapter_folder(adapter_path: str | Path) -> dict[str, Any]:
    """The adapter's `adapter_config.json`, after checking everything loading will need.

    PEFT reports a damaged adapter folder with a traceback, and one without weights as a
    hub id to download (a network attempt, then a confusing error). Here every file is
    checked first, cheaply (the weights' header and length, not their contents), so each
    problem is one line naming the file and the fix."""
    adapter_path = Path(adapter_path)
    if not adapter_path.is_dir():
        raise ModelError(f"adapter not found: {adapter_path} is not a folder; pass a run folder or its adapter/ folder")
    config_file = adapter_path / ADAPTER_CONFIG
    if not config_file.exists():
        raise ModelError(f"{adapter_path}: not a PEFT adapter folder (no {ADAPTER_CONFIG}); pass a run folder or its adapter/ folder")
    config = _read_json_object(config_file)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise ModelError(f"{config_file}: no 'peft_type' (e.g. \"LORA\"); the file is damaged or not a PEFT adapter config; {_REPAIR}")
    if peft_type == "LORA":
        rank = config.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ModelError(f"{config_file}: 'r' must be a positive integer (the LoRA rank), got {rank!r}; {_REPAIR}")
        if not isinstance(config.get("target_modules"), (str, list)):
            raise ModelError(f"{config_file}: no 'target_modules' list; the file is damaged; {_REPAIR}")
    meta_file = adapter_path / ADAPTER_META
    if meta_file.exists():
        meta = _read_json_object(meta_file)
        if not isinstance(meta.get("model"), str) or not meta["model"]:
            raise ModelError(f"{meta_file}: no 'model' (the base model the adapter was trained on); the file is damaged: "
                             f"delete it and pass --model BASE, or {_REPAIR}")
    _check_adapter_weights(adapter_path)
    return config


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); the file is damaged; {_REPAIR}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot be read as UTF-8 JSON ({exc}); {_REPAIR}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(value).__name__}; the file is damaged; {_REPAIR}")
    return value


def _check_adapter_weights(adapter_path: Path) -> None:
    """The weights file exists and, for safetensors, its header is whole and its length
    matches what the header promises (a truncated copy is caught here, not mid-load)."""
    weights = adapter_path / SAFETENSORS_WEIGHTS
    if not weights.exists():
        if (adapter_path / PICKLE_WEIGHTS).is_file() and (adapter_path / PICKLE_WEIGHTS).stat().st_size > 0:
            return
        raise ModelError(f"{adapter_path}: no adapter weights ({SAFETENSORS_WEIGHTS} is missing); the folder is incomplete: "
                         f"{_REPAIR}. (Nothing is downloaded for a local folder.)")
    size = weights.stat().st_size
    damaged = f"{weights}: the weights file is damaged or truncated"
    with weights.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelError(f"{damaged} ({size} bytes, shorter than a safetensors header); {_REPAIR}")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, 100_000_000):
            raise ModelError(f"{damaged} (header of {header_len:,} bytes in a {size:,}-byte file); {_REPAIR}")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{damaged} (unreadable header); {_REPAIR}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{damaged} (unreadable header); {_REPAIR}")
    try:
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (TypeError, ValueError, KeyError, IndexError):
        raise ModelError(f"{damaged} (unreadable header); {_REPAIR}") from None
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise ModelError(f"{damaged} ({size:,} bytes; its header describes {expected:,}); {_REPAIR}")


def adapter_base_model(adapter_path: str | Path) -> str:
    """The `model.name_or_path` a brainforge adapter was trained from."""
    config = check_adapter_folder(adapter_path)
    meta = Path(adapter_path) / ADAPTER_META
    if meta.exists():
        return str(_read_json_object(meta)["model"])
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and base:
        return base
    raise ModelError(f"{adapter_path}: cannot tell which base model this adapter belongs to; pass --model")


def _quantized_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"

