"""Attention that stays inside each example of a packed row, without a T x T mask.

A padding-free or packed row holds several examples end to end. The generic way to keep
them apart is a dense block-diagonal mask, which makes attention cost grow with the square
of the whole row (15% of a CPU training step of the default model at ~365 tokens). Here each
example's span gets its own causal SDPA call instead, so the cost is the sum of the
squares of the example lengths and the causal kernel can skip the upper triangle.

Registered with transformers' AttentionInterface under `SEGMENT_ATTENTION` when a model is
set up for training (not at import). Calls that carry no `segment_lengths` (generation,
padded batches) fall through to the standard SDPA path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

SEGMENT_ATTENTION = "brainforge_segments"


def segment_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,   # [B, H, T, D]
    key: torch.Tensor,     # [B, KVH, T, D]
    value: torch.Tensor,   # [B, KVH, T, D]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segment_lengths: list[list[int]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if segment_lengths is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rows = []
    for row, lengths in enumerate(segment_lengths):
        pieces = []
        start = 0
        for length in lengths:
            end = start + length
            pieces.append(
                F.scaled_dot_product_attention(
                    query[row : row + 1, :, start:end],    # [1, H, L, D]
                    key[row : row + 1, :, start:end],      # [1, KVH, L, D]
                    value[row : row + 1, :, start:end],
                    is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=True,
                )
            )
            start = end
        rows.append(torch.cat(pieces, dim=2))              # [1, H, T, D]
    output = torch.cat(rows, dim=0)                        # [B, H, T, D]
    return output.transpose(1, 2).contiguous(), None       # [B, T, H, D]


def enable_segment_attention(model: Any) -> bool:
    """Switch a transformers model that uses SDPA to `segment_sdpa`; False if it cannot."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", SEGMENT_ATTENTION):
        return False
    AttentionInterface.register(SEGMENT_ATTENTION, segment_sdpa)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SEGMENT_ATTENTION)
    return True


def uses_segment_attention(model: Any) -> bool:
    return getattr(model.config, "_attn_implementation", None) == SEGMENT_ATTENTION
