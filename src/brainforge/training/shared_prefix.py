"""Completion log-probs of rows whose prompts begin with the same tokens, computing that
common beginning once.

An agent's LLM calls all start with the same system prompt and worked examples (about 600
tokens for the default tool agent) followed by a short task-specific part and a short
completion. Laid end to end (the padding-free path), the shared beginning is computed once
per call and dominates the loss pass: ~27 calls x ~700 tokens, of which ~600 are the same
in every row. Here the decoder runs the common prefix once, with gradient, as a KV cache;
every row's own tokens then attend to that cache. The log-probs are the same function of
the weights (tested against the padding-free path, gradients included): the adapter's
effect on the prefix keys and values gets the sum of every row's gradient through them.
"""

from __future__ import annotations

from typing import Any

import torch

from brainforge.training.losses import decoder_and_head, token_logps_and_entropies


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    if not sequences:
        return 0
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for other in sequences[1:]:
        i = 0
        while i < length and other[i] == first[i]:
            i += 1
        length = i
    return length


def prefix_groups(prompts: list[list[int]], min_shared: int) -> list[tuple[list[int], int]]:
    """Rows grouped so that each group's prompts share at least `min_shared` leading tokens:
    (row indices, shared length to compute once, less than every prompt in the group; 0 for
    a row alone or a group that shares too little).

    Sorted prompts put rows with long common beginnings next to each other, and the common
    prefix of a run of sorted sequences is the smallest common prefix of neighbours, so one
    pass that cuts wherever neighbours share fewer than `min_shared` tokens finds the groups."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    groups: list[list[int]] = []
    for position, row in enumerate(order):
        if position and common_prefix_length([prompts[order[position - 1]], prompts[row]]) >= min_shared:
            groups[-1].append(row)
        else:
            groups.append([row])
    result = []
    for group in groups:
        members = [prompts[i] for i in group]
        shared = min(common_prefix_length(members), min(len(p) for p in members) - 1)
        result.append((sorted(group), shared if len(group) > 1 and shared >= min_shared else 0))
    return result


def supports_shared_prefix(model: Any) -> bool:
    """A KV cache with gradient needs use_cache in training, which transformers turns off
    under gradient checkpointing."""
    decoder, _ = decoder_and_head(model)
    return not any(getattr(module, "gradient_checkpointing", False) is True for module in decoder.modules())


def shared_prefix_completion_logps(
    model: Any,
    prompts: list[list[int]],        # n prompts, all starting with the same prefix_length tokens
    completion: torch.Tensor,        # [n, T] right-padded
    lengths: list[int],              # [n] completion lengths
    prefix_length: int,              # < every prompt's length
    temperature: float,
    pad_id: int,
    device: torch.device,
    grad: bool,
    entropy_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [n, T], entropies [n, T]) of the completion tokens, 0 on padding; as
    `GRPOModule.completion_logps` returns them."""
    from transformers import DynamicCache

    n, T = completion.shape
    P = prefix_length
    assert 0 < P < min(len(p) for p in prompts), "every prompt needs a token after the shared prefix"
    suffixes = [p[P:] + completion[i, : lengths[i]].tolist() for i, p in enumerate(prompts)]
    S = max(len(s) for s in suffixes)
    suffix_ids = torch.full((n, S), pad_id, dtype=torch.long)
    attention = torch.zeros((n, P + S), dtype=torch.long)
    attention[:, :P] = 1
    for i, s in enumerate(suffixes):
        suffix_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, P : P + len(s)] = 1
    # Suffix position predicting completion token t of row i: its prompt's suffix length - 1 + t.
    row_index = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths))          # [C]
    token_index = torch.cat([torch.arange(c) for c in lengths])                           # [C]
    source = torch.tensor([len(p) - P for p in prompts])[row_index] - 1 + token_index     # [C]
    targets = completion[row_index, token_index]                                          # [C]

    decoder, head = decoder_and_head(model)
    prefix = torch.tensor([prompts[0][:P]], dtype=torch.long, device=device)              # [1, P]
    with torch.set_grad_enabled(grad):
        cache = DynamicCache()
        decoder(input_ids=prefix, position_ids=torch.arange(P, device=device)[None], cache=cache, use_cache=True)
        cache.batch_repeat_interleave(n)                                                  # [n, KVH, P, D] per layer
        positions = (P + torch.arange(S, device=device))[None].expand(n, S)
        hidden = decoder(input_ids=suffix_ids.to(device), position_ids=positions, attention_mask=attention.to(device),
                         cache=cache, use_cache=True).last_hidden_state                  # [n, S, H]
        hidden = hidden[row_index.to(device), source.to(device)]                          # [C, H]
    return token_logps_and_entropies(head, hidden, targets, row_index, token_index, (n, T), temperature, grad, entropy_grad)
