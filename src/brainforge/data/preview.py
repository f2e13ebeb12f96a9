"""`brainforge data preview`: see what the model will be trained on.

Trained tokens are shown between ⟦ and ⟧. The check covers every example, not just the
ones shown: an example that trains no token, or never trains the end-of-turn token, is an
error, because the first teaches nothing and the second teaches the model never to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from brainforge.config import BrainforgeConfig
from brainforge.data.sources import mix_sources
from brainforge.data.templates import IGNORE_INDEX, chat_format, tokenize_conversation
from brainforge.errors import DataError


@dataclass
class PreviewExample:
    source: str
    marked_text: str
    num_tokens: int
    num_trained: int


def preview(config: BrainforgeConfig, tokenizer: Any, count: int = 3) -> list[PreviewExample]:
    fmt = chat_format(config.datasets.output_format, tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(fmt.end_of_turn)
    mixed = mix_sources(config.sources(), config.data.system_prompt, config.training.seed, config.datasets.stopping_strategy)
    shown: list[PreviewExample] = []
    problems: list[str] = []
    conversations = list(mixed["messages"])
    if config.memory.enabled:
        from brainforge.memory.assistant import augment_with_memory

        conversations = augment_with_memory(conversations[:count], config.memory) + conversations[count:]
    for index, (messages, source) in enumerate(zip(conversations, mixed["source"])):
        example = tokenize_conversation(tokenizer, fmt, messages, config.data.max_seq_length)
        if example.num_trained == 0:
            problems.append(f"example {index} ({source}) trains no token")
        elif eot_id not in [label for label in example.labels if label != IGNORE_INDEX]:
            problems.append(f"example {index} ({source}) never trains the end-of-turn token {fmt.end_of_turn!r}")
        if len(shown) < count:
            shown.append(PreviewExample(source, mark_trained(tokenizer, example.input_ids, example.labels), len(example.input_ids), example.num_trained))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(
            f"{len(problems)} of {len(mixed)} examples would train badly: " + "; ".join(problems[:5]) + more
            + f". Check datasets.output_format, data.max_seq_length ({config.data.max_seq_length}) and the assistant turns."
        )
    return shown


def mark_trained(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """Decode `ids`, wrapping each run of trained tokens in ⟦ ⟧."""
    pieces: list[str] = []
    run: list[int] = []
    trained = False
    for token, label in zip(ids, labels):
        is_trained = label != IGNORE_INDEX
        if is_trained != trained and run:
            text = tokenizer.decode(run)
            pieces.append(f"⟦{text}⟧" if trained else text)
            run = []
        trained = is_trained
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"⟦{text}⟧" if trained else text)
    return "".join(pieces)
