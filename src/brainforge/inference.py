"""Loading a base + adapter (or a merged folder) for generation, and generating.

Prompts are rendered with the chat template saved beside the adapter, the one used in
training, so the model sees at inference exactly the format it learnt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from brainforge.config import ModelConfig
from brainforge.errors import ModelError
from brainforge.generation.engine import chat_stop_ids
from brainforge.hardware import resolve_dtype
from brainforge.models.loader import adapter_base_model, check_adapter_folder, load_adapter, load_base_model, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any

    def generate(
        self,
        prompts: list[str] | list[list[dict[str, str]]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        system_prompt: str | None = None,
    ) -> list[str]:
        """Greedy when temperature is 0; one batched call, left-padded."""
        conversations = [_as_messages(p, system_prompt) for p in prompts]
        texts = [
            self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations
        ]
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {k: v.to(self.model.device) for k, v in encoded.items()}
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            output = self.model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=chat_stop_ids(self.tokenizer),
                use_cache=True,
                **sampling,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]


def _as_messages(prompt: str | list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def load_chat_model(
    adapter: str | Path | None = None,
    model: str | None = None,
    dtype: str = "auto",
) -> ChatModel:
    """Base model (`model`, or the one the adapter was trained on) plus optional adapter."""
    if adapter is None and model is None:
        model = "default"
    if adapter is not None:
        adapter = Path(adapter)
        if (adapter / "adapter").is_dir():  # a run folder was given
            adapter = adapter / "adapter"
        if not adapter.is_dir():
            raise ModelError(f"adapter not found: {adapter}")
        check_adapter_folder(adapter)  # before the base model loads: a damaged folder fails in a second
        model = model or adapter_base_model(adapter)
    assert model is not None
    path = resolve_model_path(model)
    base = load_base_model(ModelConfig(name_or_path=model), resolve_dtype(dtype), model_path=path)
    base.config.use_cache = True
    tokenizer = load_tokenizer(str(adapter) if adapter is not None else path)
    loaded = load_adapter(base, adapter) if adapter is not None else base
    loaded.eval()
    return ChatModel(loaded, tokenizer)
