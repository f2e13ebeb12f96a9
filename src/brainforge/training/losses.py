"""Token-level losses over tensors.

`sum_token_nll` returns a *sum* and a token count rather than a mean, so callers can
normalise by the labelled tokens of a whole accumulated step (ALGORITHMS.md section 1: a
per-micro-batch mean would weight short examples more).

The output head runs only on positions that have a label. With a 49k vocabulary the head
and its log-softmax are the most expensive op per token in a 135M model, and prompt tokens
(often most of a sequence) need neither.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from brainforge.data.templates import IGNORE_INDEX
from brainforge.models.attention import uses_segment_attention


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer body and output head of a (PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def packed_hidden_states(model: Any, batch: dict[str, Any], device: torch.device | None = None) -> torch.Tensor:
    """Final hidden states [B, T, H] of a packed/padding-free batch (see data.collate):
    per-example attention through segment lengths when the model supports it, else the
    equivalent block-diagonal mask."""
    decoder, _ = decoder_and_head(model)
    move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
    inputs: dict[str, Any] = {"attention_mask": move(batch["attention_mask"])}
    if uses_segment_attention(decoder):
        inputs = {"segment_lengths": batch["segment_lengths"]}
    return decoder(input_ids=move(batch["input_ids"]), position_ids=move(batch["position_ids"]), use_cache=False, **inputs).last_hidden_state


def sum_token_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the labelled tokens, and their count."""
    decoder, head = decoder_and_head(model)
    inputs: dict[str, Any] = {"attention_mask": batch.get("attention_mask")}  # [B, T] or [B, 1, T, T]
    if batch.get("segment_lengths") is not None and uses_segment_attention(decoder):
        inputs = {"segment_lengths": batch["segment_lengths"]}  # per-example attention, no mask
    hidden = decoder(
        input_ids=batch["input_ids"],                      # [B, T]
        position_ids=batch.get("position_ids"),            # [B, T] or None
        use_cache=False,
        **inputs,
    ).last_hidden_state                                    # [B, T, H]
    targets = batch["labels"][:, 1:]                       # [B, T-1]: position t predicts t+1
    keep = targets != IGNORE_INDEX                         # [B, T-1]
    selected = hidden[:, :-1][keep]                        # [N, H]
    logits = head(selected).float()                        # [N, V]
    nll = F.cross_entropy(logits, targets[keep], reduction="sum")
    return nll, keep.sum()


def token_logps_and_entropies(head: Any, hidden: torch.Tensor, targets: torch.Tensor, row_index: torch.Tensor,
                              token_index: torch.Tensor, shape: tuple[int, int], temperature: float, grad: bool,
                              entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies [n, T] of completion tokens at the sampling temperature, from
    the hidden states that predict them (`hidden` [C, H], token c is row `row_index[c]`,
    position `token_index[c]`); 0 elsewhere. The head runs on those C positions only.
    Entropies carry gradient only with `entropy_grad` (an entropy bonus)."""
    device = hidden.device
    where = (row_index.to(device), token_index.to(device))
    with torch.set_grad_enabled(grad):
        logits = head(hidden).float() / temperature                                        # [C, V]
        logp_all = torch.log_softmax(logits, dim=-1)
        picked = logp_all.gather(1, targets.to(device)[:, None]).squeeze(1)                # [C]
        logps = torch.zeros(shape, device=device, dtype=picked.dtype).index_put(where, picked)
    with torch.set_grad_enabled(grad and entropy_grad):
        token_entropy = -(logp_all.exp() * logp_all).sum(-1)                               # [C]
        if not (grad and entropy_grad):
            token_entropy = token_entropy.detach()
        entropy = torch.zeros(shape, device=device, dtype=token_entropy.dtype).index_put(where, token_entropy)
    return logps, entropy
