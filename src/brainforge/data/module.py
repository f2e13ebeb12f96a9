"""From config to tokenized train/validation examples, and the Lightning DataModule."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from brainforge.config import BrainforgeConfig
from brainforge.data.collate import MicroBatchCollator, pack_examples
from brainforge.data.sources import mix_sources
from brainforge.data.templates import ChatFormat, TokenizedExample, chat_format, tokenize_conversation
from brainforge.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    val: list[TokenizedExample]
    fmt: ChatFormat
    conversations: list[list[dict[str, str]]] = field(repr=False, default_factory=list)
    """The training conversations, aligned with `train` (for previews)."""
    stats: dict[str, int] = field(default_factory=dict)


def prepare_sft_data(config: BrainforgeConfig, tokenizer: Any) -> PreparedData:
    """Load, mix, format, split and tokenize; fail loudly when nothing would be learned."""
    fmt = chat_format(config.datasets.output_format, tokenizer)
    mixed = mix_sources(
        config.sources(), config.data.system_prompt, config.training.seed, config.datasets.stopping_strategy
    )
    conversations: list[list[dict[str, str]]] = list(mixed["messages"])
    if config.memory.enabled:
        from brainforge.memory.assistant import augment_with_memory

        conversations = augment_with_memory(conversations, config.memory)
    n_val = int(len(conversations) * config.data.val_split)
    if config.data.val_split > 0 and n_val == 0 and len(conversations) >= 2:
        n_val = 1
    val_conv, train_conv = conversations[:n_val], conversations[n_val:]
    eot_id = tokenizer.convert_tokens_to_ids(fmt.end_of_turn)
    train, kept, stats = _tokenize_all(train_conv, tokenizer, fmt, config.data.max_seq_length, eot_id)
    if not train:
        raise DataError(
            f"no training example has a trained token after tokenization (max_seq_length={config.data.max_seq_length}). "
            "Raise data.max_seq_length or check that examples contain assistant answers."
        )
    if stats["with_end_of_turn"] == 0:
        raise DataError(
            f"no training example trains the end-of-turn token {fmt.end_of_turn!r}: the model would never learn to stop. "
            "Raise data.max_seq_length or check the chat template."
        )
    val, _, _ = _tokenize_all(val_conv, tokenizer, fmt, config.data.max_seq_length, eot_id)
    stats.update(val_examples=len(val))
    log.info(
        "data: %d train / %d val examples, %d trained tokens, %d dropped with no trained token, %d cut by max_seq_length",
        len(train), len(val), stats["trained_tokens"], stats["dropped_no_labels"], stats["truncated"],
    )
    return PreparedData(train=train, val=val, fmt=fmt, conversations=kept, stats=stats)


def _tokenize_all(
    conversations: list[list[dict[str, str]]], tokenizer: Any, fmt: ChatFormat, max_length: int, eot_id: int
) -> tuple[list[TokenizedExample], list[list[dict[str, str]]], dict[str, int]]:
    examples: list[TokenizedExample] = []
    kept: list[list[dict[str, str]]] = []
    stats = {"dropped_no_labels": 0, "truncated": 0, "trained_tokens": 0, "with_end_of_turn": 0}
    for messages in conversations:
        full = tokenize_conversation(tokenizer, fmt, messages, max_length=10**9)
        if len(full.input_ids) > max_length:
            stats["truncated"] += 1
        example = TokenizedExample(full.input_ids[:max_length], full.labels[:max_length])
        if example.num_trained == 0:
            stats["dropped_no_labels"] += 1
            continue
        if eot_id in example.labels:
            stats["with_end_of_turn"] += 1
        stats["trained_tokens"] += example.num_trained
        examples.append(example)
        kept.append(messages)
    return examples, kept, stats


class SFTDataModule(L.LightningDataModule):
    """Serves one optimizer step's worth of micro-batches per training batch."""

    def __init__(self, data: PreparedData, config: BrainforgeConfig, pad_id: int):
        super().__init__()
        self.data = data
        self.config = config
        self.pad_id = pad_id
        packing = config.data.packing
        max_len = config.data.max_seq_length
        seed = config.training.seed
        self.train_items: list = pack_examples(data.train, max_len, seed) if packing else list(data.train)
        self.val_items: list = pack_examples(data.val, max_len, seed) if packing else list(data.val)

    @property
    def examples_per_step(self) -> int:
        return self.config.training.per_device_batch_size * self.config.training.gradient_accumulation_steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_items,
            batch_size=self.examples_per_step,
            shuffle=True,
            collate_fn=self._collator(),
            num_workers=self.config.data.num_workers,
        )

    def _collator(self) -> MicroBatchCollator:
        data = self.config.data
        return MicroBatchCollator(self.config.training.per_device_batch_size, self.pad_id, data.packing, data.padding_free)

    def val_dataloader(self) -> DataLoader:
        training = self.config.training
        return DataLoader(
            self.val_items,
            batch_size=training.per_device_batch_size,
            shuffle=False,
            collate_fn=self._collator(),
            num_workers=self.config.data.num_workers,
        )
