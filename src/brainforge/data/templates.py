"""Rendering conversations and marking which tokens are trained.

Every output format is a Jinja chat template: `chatml` is the tokenizer's own template (or a
plain ChatML one when it has none), the others are written here. The template used in
training is saved with the adapter, so inference renders prompts exactly as training did.

Loss masks come from character spans, not from guessing token boundaries: for each
assistant turn we render the conversation up to that turn with the generation prompt, and
the conversation including that turn; the difference is the assistant's text plus its
end-of-turn marker. The full rendering is tokenized once with offsets, and a token is
trained when it starts inside such a span.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Any

from brainforge.errors import DataError

IGNORE_INDEX = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ALPACA_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\\n\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ bos_token + '[INST] <<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'system' %}{{ bos_token + '[INST] ' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '[INST] ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'system' %}{{ '[INST] ' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A chat template together with the token that ends an assistant turn."""

    name: str
    template: str
    end_of_turn: str


def chat_format(output_format: str, tokenizer: Any) -> ChatFormat:
    if output_format == "chatml":
        template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
        vocab = tokenizer.get_vocab()
        end = "<|im_end|>" if "<|im_end|>" in vocab else tokenizer.eos_token
        return ChatFormat("chatml", template, end)
    templates = {"alpaca": ALPACA_TEMPLATE, "llama2": LLAMA2_TEMPLATE, "mistral": MISTRAL_TEMPLATE}
    return ChatFormat(output_format, templates[output_format], tokenizer.eos_token)


def render(tokenizer: Any, fmt: ChatFormat, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=fmt.template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_with_spans(tokenizer: Any, fmt: ChatFormat, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant turn."""
    _check_roles(messages, fmt)
    full = render(tokenizer, fmt, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, fmt, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, fmt, messages[: i + 1]).rstrip(" \n")
        if not through.startswith(before) or not full.startswith(through):
            raise DataError(
                f"the '{fmt.name}' chat template does not render conversations prefix-stably, so assistant "
                "tokens cannot be located; choose another datasets.output_format (e.g. alpaca)"
            )
        spans.append((len(before), len(through)))
    return full, spans


def writes_role_names(chat_template: str) -> bool:
    """Whether a template outputs each message's role name (ChatML, SmolLM2's own), so a
    `tool` turn renders as one; templates that only compare the role would drop it or
    render it as something else."""
    return bool(_WRITES_ROLE.search(chat_template))


_ROLE = r"message\[['\"]role['\"]\]"
_WRITES_ROLE = re.compile(rf"\+\s*{_ROLE}|{_ROLE}\s*\+|\{{\{{\s*{_ROLE}")
"""A template that outputs the role name (`'<|im_start|>' + message['role']`), not one that only compares it."""


def _check_roles(messages: list[dict[str, str]], fmt: ChatFormat) -> None:
    if not messages:
        raise DataError("a conversation has no messages")
    for index, message in enumerate(messages):
        if message.get("role") == "tool" and not writes_role_names(fmt.template):
            raise DataError(f"message {index} is a tool result, which the '{fmt.name}' chat template cannot render as its own "
                            "turn; use datasets.output_format: chatml, or put tool results into user turns")
        if message.get("role") not in {"system", "user", "assistant", "tool"}:
            raise DataError(f"message {index} has role {message.get('role')!r}; expected system, user, assistant or tool")
        if message["role"] == "system" and index != 0:
            raise DataError(f"message {index} is a system message; only the first message may be one")


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def tokenize_conversation(
    tokenizer: Any, fmt: ChatFormat, messages: list[dict[str, str]], max_length: int
) -> TokenizedExample:
    """Token ids and labels (-100 everywhere but assistant turns), cut to `max_length`."""
    text, spans = render_with_spans(tokenizer, fmt, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    span_iter = iter(spans)
    current = next(span_iter, None)
    for index, (start, _end) in enumerate(encoded["offset_mapping"]):
        while current is not None and start >= current[1]:
            current = next(span_iter, None)
        if current is None:
            break
        if start >= current[0]:
            labels[index] = ids[index]
    return TokenizedExample(ids[:max_length], labels[:max_length])
