"""Batching: padded micro-batches, or packed rows whose examples cannot see each other.

A packed row concatenates several examples. Each gets its own position ids (restarting at 0)
and attention stays inside each example, so the result is exactly what the examples would
give on their own, without any padding compute. Batches carry both the example lengths
(used by `models.attention.segment_sdpa`) and an equivalent block-diagonal causal 4-D mask
for other attention implementations. (SDPA ignores position-id resets alone.)
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from brainforge.data.templates import IGNORE_INDEX, TokenizedExample

Batch = dict[str, torch.Tensor]


def pack_examples(examples: Sequence[TokenizedExample], max_length: int, seed: int) -> list[list[TokenizedExample]]:
    """Greedy first-fit packing of a shuffled order into rows of at most `max_length` tokens."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[list[TokenizedExample]] = []
    room: list[int] = []
    for index in order:
        example = examples[index]
        size = len(example.input_ids)
        for row, free in enumerate(room):
            if size <= free:
                rows[row].append(example)
                room[row] -= size
                break
        else:
            rows.append([example])
            room.append(max_length - size)
    return rows


def pad_collate(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-padded ids, labels (-100 on padding) and a 2-D attention mask."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def packed_collate(rows: Sequence[Sequence[TokenizedExample]], pad_id: int) -> Batch:
    """Packed rows with per-example position ids and a block-diagonal causal 4-D mask."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 marks padding
    lengths: list[list[int]] = []
    for r, row in enumerate(rows):
        lengths.append([len(e.input_ids) for e in row])
        offset = 0
        for s, example in enumerate(row):
            n = len(example.input_ids)
            ids[r, offset : offset + n] = torch.tensor(example.input_ids)
            labels[r, offset : offset + n] = torch.tensor(example.labels)
            # The first token would be predicted from the previous example: never a target.
            labels[r, offset] = IGNORE_INDEX
            positions[r, offset : offset + n] = torch.arange(n)
            segment[r, offset : offset + n] = s
            offset += n
        if offset < width:
            lengths[-1].append(width - offset)  # the padding tail attends only to itself
    same = segment[:, :, None] == segment[:, None, :]  # [B, T, T]
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = same & causal & (segment[:, :, None] >= 0)
    # Padding rows attend to themselves so softmax never sees an all-masked row.
    mask |= torch.eye(width, dtype=torch.bool)
    return {
        "input_ids": ids, "labels": labels, "position_ids": positions,
        "attention_mask": mask[:, None],  # for attention implementations without segment support
        "segment_lengths": lengths,       # for models.attention.segment_sdpa, which needs no mask
    }


class MicroBatchCollator:
    """Collates one optimizer step's examples into `accumulation` micro-batches.

    The training step needs every micro-batch of an accumulated step at once so it can
    normalise the loss by the labelled tokens of the whole step.
    """

    def __init__(self, micro_batch_size: int, pad_id: int, packed: bool, padding_free: bool = False):
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.packed = packed
        self.padding_free = padding_free

    def __call__(self, items: list) -> list[Batch]:
        size = self.micro_batch_size
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        if self.packed:  # items are already packed rows
            return [packed_collate(chunk, self.pad_id) for chunk in chunks]
        if self.padding_free:  # the micro-batch becomes one row, examples end to end
            return [packed_collate([chunk], self.pad_id) for chunk in chunks]
        return [pad_collate(chunk, self.pad_id) for chunk in chunks]
