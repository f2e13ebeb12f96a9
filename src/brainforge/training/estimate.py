"""Peak memory of a training run, estimated from the config before anything loads.

A run that cannot fit used to start anyway: `peft.lora.r=100000` validated, then tried to
allocate ~120 GB and died (or took the machine down with it). Here the model's shape is
read from its `config.json` or GGUF header (no weights), and the peak is the sum of:

- weights: every parameter in the base dtype (QLoRA: linear layers at ~4.5 bits);
- adapter, gradients, optimizer: LoRA parameters `r * (in + out)` per targeted linear
  layer, trained in fp32: 4 bytes each for weights and gradients, 8 for AdamW's moments;
- activations of one micro-batch (`per_device_batch_size * max_seq_length` tokens; see
  `_ACTIVATION_TERMS` for what each layer keeps for the backward pass), plus the fp32
  logits and log-softmax of the output head; with gradient checkpointing only each
  layer's input is kept;
- GRPO: the generation batch's KV cache and logits (prompts_per_step * num_generations
  sequences of prompt + completion), the loss pass over `micro_batch_size` of them, and a
  reference adapter when one is loaded; the phases run one after another, so the largest
  one counts;
- runtime: the Python process with torch and its libraries (~0.8 GB RSS on CPU).

tests/test_bad_input.py checks the estimate against the peak RSS of real training steps.
The run is refused when the estimate exceeds the memory available (psutil's available
RAM, or free device memory on a GPU), with the breakdown and what to lower.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainforge.config import BrainforgeConfig
from brainforge.errors import ConfigError

log = logging.getLogger(__name__)

GB = 1024**3
RUNTIME_BYTES_CPU = int(0.8 * GB)
"""RSS of a process that has imported torch, transformers and lightning (measured ~0.6-0.8 GB)."""
RUNTIME_BYTES_GPU = int(0.6 * GB)
"""The CUDA context and allocator slack on the device."""
QLORA_BYTES_PER_PARAM = 0.5 + 4 / 64 + 0.01
"""NF4: 4 bits per weight plus an fp32 scale per 64-weight block (double quant makes it less)."""
_ACTIVATION_TERMS = "20 * hidden + 4 * kv_dim + 5 * intermediate + r per targeted linear layer"
"""Elements per token and layer saved for the backward pass: the residual stream, the RMS
norms' fp32 intermediates, q/k/v and their rotary copies, attention output and projection,
the MLP intermediates (gate, up, activation, product), each LoRA A output (with dropout, a
dropped-out copy of each adapter input too). The coefficients were fitted to the peak RSS
of LoRA steps of Llama models (hidden 256-512, intermediate 512-2048, 4-16 layers): the
per-layer term measured 21.5k elements per token at hidden 512 / intermediate 2048, and
did not depend on sequence length (SDPA keeps no attention matrix)."""
GRPO_PROMPT_TOKENS = 256
"""Prompt length assumed for GRPO (capped by data.max_seq_length): prompts are questions,
not documents; with memory.enabled the retrieved context makes them up to 1024."""
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a decoder-only transformer."""

    source: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    def linear_parameters(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears().values())

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = (2 * self.layers + 1) * self.hidden
        return embeddings + self.linear_parameters() + norms


@dataclass
class MemoryEstimate:
    terms: dict[str, int]
    """Bytes per component, in the order shown."""
    peak: int
    where: str
    """`RAM` or the device, e.g. `cuda:0 memory`."""
    available: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak <= self.available

    def summary(self) -> str:
        """One line: the peak, what is available, and the breakdown."""
        parts = ", ".join(f"{name} {_gb(size)}" for name, size in self.terms.items())
        room = f" of {_gb(self.available)} available {self.where}" if self.available is not None else f" ({self.where})"
        notes = f" [{'; '.join(self.notes)}]" if self.notes else ""
        return f"estimated peak memory {_gb(self.peak)}{room}: {parts}{notes}"


def _gb(size: int | float) -> str:
    return f"{size / GB:.2f} GB" if size < 100 * GB else f"{size / GB:,.0f} GB"


# ----------------------------------------------------------------------------- model shape


def model_shape(name_or_path: str) -> ModelShape | None:
    """The shape of `model.name_or_path` from its config.json or GGUF header, or None where
    it cannot be read without the network (a hub id that is not cached)."""
    from brainforge.models.gguf import COMPLETE_MARKER, DEFAULT_MODEL_NAME, cache_root, default_gguf_path

    if name_or_path == "default":
        converted = cache_root() / "models" / DEFAULT_MODEL_NAME
        if (converted / COMPLETE_MARKER).exists() and (converted / "config.json").is_file():
            return shape_from_config_json(converted / "config.json")
        return shape_from_gguf(default_gguf_path())
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return shape_from_gguf(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return shape_from_config_json(path / "config.json")
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return shape_from_gguf(ggufs[0])
    return None


def shape_from_config_json(path: Path) -> ModelShape | None:
    """Llama-style fields (llama, mistral, qwen2, smollm, ...); None for other layouts."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the model's config.json ({exc}); the model folder is damaged") from None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return ModelShape(
            source=str(path), vocab=int(config["vocab_size"]), hidden=hidden,
            intermediate=int(config["intermediate_size"]), layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        log.warning("%s: not a llama-style config (no hidden_size/intermediate_size/num_hidden_layers/...); "
                    "no memory estimate", path)
        return None


def shape_from_gguf(path: Path) -> ModelShape | None:
    from brainforge.models.gguf_metadata import read_gguf_metadata

    meta = read_gguf_metadata(path)
    arch = meta.values.get("general.architecture")
    values = meta.values
    try:
        hidden, heads = int(values[f"{arch}.embedding_length"]), int(values[f"{arch}.attention.head_count"])
        vocab = values.get(f"{arch}.vocab_size") or meta.array_lengths["tokenizer.ggml.tokens"]
        return ModelShape(
            source=str(path), vocab=int(vocab), hidden=hidden, intermediate=int(values[f"{arch}.feed_forward_length"]),
            layers=int(values[f"{arch}.block_count"]), heads=heads,
            kv_heads=int(values.get(f"{arch}.attention.head_count_kv") or heads),
            head_dim=int(values.get(f"{arch}.attention.key_length") or hidden // heads),
            tied_embeddings="output.weight" not in meta.tensor_names,
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        log.warning("%s: GGUF header lacks the %s shape keys; no memory estimate", path, arch)
        return None


# ----------------------------------------------------------------------------- estimate


def lora_settings(config: BrainforgeConfig) -> tuple[int, Any]:
    """(r, target_modules) of the adapter to be trained: an adapter to continue wins."""
    if config.model.adapter_path:
        from brainforge.models.loader import check_adapter_folder

        adapter = check_adapter_folder(config.model.adapter_path)
        return int(adapter["r"]), adapter.get("target_modules") or "all-linear"
    return config.peft.lora.r, config.peft.lora.target_modules


def lora_parameters(shape: ModelShape, r: int, target_modules: Any, notes: list[str] | None = None) -> int:
    """`r * (in + out)` for every targeted linear layer (`all-linear` skips the output head, as PEFT does)."""
    linears = shape.linears()
    if target_modules == "all-linear":
        names = list(linears)
    else:
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        names = [name for name in linears if any(_names(t, name) for t in wanted)]
        unknown = [t for t in wanted if not any(_names(t, name) for name in linears) and t != "lm_head"]
        if unknown and notes is not None:
            notes.append(f"target modules {unknown} not sized")
        if "lm_head" in wanted:
            return shape.layers * sum(r * sum(linears[n]) for n in names) + r * (shape.hidden + shape.vocab)
    return shape.layers * sum(r * sum(linears[name]) for name in names)


def estimate_memory(config: BrainforgeConfig, shape: ModelShape, weight_bytes: int, on_gpu: bool = False) -> MemoryEstimate:
    """The breakdown for `config` on a model of `shape` whose weights are `weight_bytes` wide (2 or 4)."""
    notes: list[str] = []
    r, targets = lora_settings(config)
    lora = lora_parameters(shape, r, targets, notes)
    terms: dict[str, int] = {}
    if config.peft.quantization.load_in_4bit:
        quantized = shape.linear_parameters()
        terms["weights"] = int(quantized * QLORA_BYTES_PER_PARAM + (shape.parameters() - quantized) * weight_bytes)
    else:
        terms["weights"] = shape.parameters() * weight_bytes
    terms["adapter"] = lora * 4
    terms["gradients"] = lora * 4
    terms["optimizer"] = lora * 8
    per_token_layer = (20 * shape.hidden + 4 * shape.kv_heads * shape.head_dim + 5 * shape.intermediate
                       + r * _targeted_count(shape, targets))
    if config.peft.lora.lora_dropout > 0:
        per_token_layer += 3 * shape.hidden + shape.intermediate  # a dropped-out copy of each adapter input

    def activations(tokens: int, labelled: int) -> int:
        if config.training.gradient_checkpointing:
            kept = tokens * shape.hidden * shape.layers + tokens * per_token_layer
        else:
            kept = tokens * per_token_layer * shape.layers
        return kept * weight_bytes + labelled * shape.vocab * (weight_bytes + 8)  # + logits, fp32 copy, log-softmax

    training = config.training
    if config.algorithm.is_rl:
        settings = config.algorithm.grpo
        sequences = settings.prompts_per_step * settings.num_generations
        prompt = min(config.data.max_seq_length, 1024 if config.memory.enabled else GRPO_PROMPT_TOKENS)
        # search_r1: a completion is the whole multi-turn transcript, observations included
        completion = config.algorithm.search.max_total_tokens if config.algorithm.name == "search_r1" else settings.max_new_tokens
        length = prompt + completion
        micro = settings.micro_batch_size or sequences
        kv_cache = 2 * shape.layers * shape.kv_heads * shape.head_dim * sequences * length * weight_bytes
        generation = kv_cache + sequences * shape.vocab * 4 * 2
        completions = micro * completion
        phases = {"generation (KV cache)": generation, "activations": activations(micro * length, completions),
                  "reference pass": completions * shape.vocab * (weight_bytes + 4) if settings.beta > 0 else 0}
        largest = max(phases, key=lambda name: phases[name])
        terms[largest] = phases[largest]
        notes.append(f"GRPO phases run one at a time; largest counted: {largest} "
                     f"({', '.join(f'{k} {_gb(v)}' for k, v in phases.items())}); prompts assumed up to {prompt} tokens")
        if settings.reference_adapter:
            from brainforge.models.loader import check_adapter_folder

            reference = check_adapter_folder(settings.reference_adapter)
            terms["reference adapter"] = lora_parameters(shape, int(reference["r"]), reference.get("target_modules") or "all-linear") * weight_bytes
    else:
        tokens = training.per_device_batch_size * config.data.max_seq_length  # every row full: an upper bound
        terms["activations"] = activations(tokens, tokens)
    terms["runtime"] = RUNTIME_BYTES_GPU if on_gpu else RUNTIME_BYTES_CPU
    processes = _processes_per_machine(config) if not on_gpu else 1
    peak = sum(terms.values()) * processes
    if processes > 1:
        notes.append(f"x{processes} processes on this machine")
    where = "GPU memory (per device)" if on_gpu else "RAM"
    return MemoryEstimate(terms, peak, where, notes=notes)


def _targeted_count(shape: ModelShape, targets: Any) -> int:
    if targets == "all-linear":
        return len(shape.linears())
    wanted = [targets] if isinstance(targets, str) else list(targets)
    return sum(1 for name in shape.linears() if any(_names(t, name) for t in wanted))


def _names(target: str, module: str) -> bool:
    """PEFT's rule for a target_modules entry: the module's name, or a dotted path ending in it."""
    return target == module or target.endswith(f".{module}")


def _processes_per_machine(config: BrainforgeConfig) -> int:
    devices = config.hardware.devices
    return devices if isinstance(devices, int) and config.hardware.strategy != "auto" else 1


# ----------------------------------------------------------------------------- check


def uses_gpu(config: BrainforgeConfig) -> bool:
    import torch

    accelerator = config.hardware.accelerator
    if accelerator in {"gpu", "cuda"}:
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def available_bytes(on_gpu: bool) -> int:
    """Free device memory (smallest over the visible GPUs), else available RAM."""
    if on_gpu:
        import torch

        if torch.cuda.is_available():
            return min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(config: BrainforgeConfig, available: int | None = None) -> MemoryEstimate | None:
    """The estimate for `config`, refused with a `ConfigError` when it cannot fit in
    `available` bytes (default: what this machine has free now). None when the model's
    shape cannot be read offline (a hub id): then nothing is refused."""
    from brainforge.hardware import resolve_dtype

    shape = model_shape(config.model.name_or_path)
    if shape is None:
        log.info("memory estimate skipped: no local config for model %s", config.model.name_or_path)
        return None
    on_gpu = uses_gpu(config)
    weight_bytes = resolve_dtype(config.model.dtype, config.training.precision).itemsize
    estimate = estimate_memory(config, shape, weight_bytes, on_gpu)
    estimate.available = available if available is not None else available_bytes(on_gpu)
    if not estimate.fits:
        raise ConfigError(f"this run cannot fit: {estimate.summary()}. Fix: {_advice(config, estimate)}")
    return estimate


def _advice(config: BrainforgeConfig, estimate: MemoryEstimate) -> str:
    """What to lower, largest term first."""
    tips = {
        "weights": "set peft.quantization.load_in_4bit: true (QLoRA) or use a smaller model",
        "adapter": f"lower peft.lora.r (now {config.peft.lora.r}) or target fewer modules (peft.lora.target_modules)",
        "activations": (f"lower training.per_device_batch_size (now {config.training.per_device_batch_size}) or "
                        f"data.max_seq_length (now {config.data.max_seq_length}), or set training.gradient_checkpointing: true"),
        "generation (KV cache)": "lower algorithm.grpo.prompts_per_step, num_generations or max_new_tokens",
        "reference pass": "set algorithm.grpo.micro_batch_size lower",
    }
    tips["gradients"] = tips["optimizer"] = tips["adapter"]
    if config.algorithm.is_rl:
        tips["activations"] = "set algorithm.grpo.micro_batch_size lower, or lower max_new_tokens / data.max_seq_length"
    ordered = sorted((size, name) for name, size in estimate.terms.items() if name in tips)
    seen: list[str] = []
    for _, name in reversed(ordered):
        if tips[name] not in seen:
            seen.append(tips[name])
    return "; ".join(seen[:2]) or "use a machine with more memory"
