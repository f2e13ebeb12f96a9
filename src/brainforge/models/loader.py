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
    if not (adapter_path / "adapter_config.json").exists():
        raise ModelError(f"{adapter_path}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        return PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        base = json.loads((adapter_path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        raise ModelError(
            f"{adapter_path}: this adapter does not match the base model (it was trained on {base!r}). "
            f"Load it with the base it was trained on. Details: {str(exc).splitlines()[0][:300]}"
        ) from exc


def adapter_base_model(adapter_path: str | Path) -> str:
    """The `model.name_or_path` a brainforge adapter was trained from."""
    meta = Path(adapter_path) / ADAPTER_META
    if meta.exists():
        return json.loads(meta.read_text())["model"]
    config = Path(adapter_path) / "adapter_config.json"
    if config.exists():
        base = json.loads(config.read_text()).get("base_model_name_or_path")
        if base:
            return base
    raise ModelError(f"{adapter_path}: cannot tell which base model this adapter belongs to; pass --model")


def _quantized_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"

