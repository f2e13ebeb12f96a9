"""One formatter per source type: a dataset row becomes a list of chat messages.

Each formatter declares its fields and their default column names; a source's `columns`
maps those fields onto the dataset's own column names. Function calls are written as one
`<function_call>{"name": ..., "arguments": {...}}</function_call>` block per call, the
format the function-calling reward parses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from brainforge.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant", "tool")  # tool: an agent trajectory's tool results (brainforge traces export)
TEXT_FIELDS = ("prompt", "response", "system", "instruction", "input", "output", "query")
"""Fields that must hold text. A list, mapping or boolean there is refused rather than
trained as its Python repr (`['a', 'b']`); numbers are refused too, except from CSV files,
where the reader types a column of digits as numbers."""


@dataclass(frozen=True)
class Formatter:
    fields: dict[str, str]
    """Field name -> default column name."""
    required: tuple[str, ...]
    """Fields that must be present (after mapping) in every row."""
    build: Callable[[dict[str, Any]], list[Message]]
    """Turns the mapped row into messages."""


def _instruction_messages(row: dict[str, Any]) -> list[Message]:
    prompt = str(row["instruction"]).strip()
    extra = row.get("input")
    if extra is not None and str(extra).strip():
        prompt = f"{prompt}\n\n{str(extra).strip()}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"]).strip()}]


def _chat_messages(row: dict[str, Any]) -> list[Message]:
    messages = row.get("messages")
    if messages is not None:
        if isinstance(messages, str):
            messages = _as_json(messages, "messages")
        return _checked_messages(messages)
    if row.get("prompt") is None or row.get("response") is None:
        raise KeyError("prompt")
    out: list[Message] = []
    if row.get("system"):
        out.append({"role": "system", "content": str(row["system"])})
    out.append({"role": "user", "content": str(row["prompt"]).strip()})
    out.append({"role": "assistant", "content": str(row["response"]).strip()})
    return out


def _checked_messages(messages: Any) -> list[Message]:
    """A `messages` value as a list of {role, content} with known roles and text content."""
    if not isinstance(messages, list):
        raise ValueError(f"field 'messages' must be a list of {{role, content}} objects, got {type(messages).__name__}")
    out: list[Message] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content', got {_short(message)}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"messages[{index}] has role {_short(role)}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be text, got {type(content).__name__} {_short(content)}")
        out.append({"role": role, "content": content})
    return out


def check_row(row: dict[str, Any], mapping: dict[str, str], allow_numbers: bool = False) -> None:
    """Check the types of a raw row's mapped fields (text fields hold text, `messages` is a
    list of {role, content}) without formatting it; raises ValueError naming the field."""
    check_field_types({field: row.get(column) for field, column in mapping.items()}, allow_numbers)


def check_field_types(row: dict[str, Any], allow_numbers: bool = False) -> None:
    """Refuse a text field holding a list, mapping, boolean (or number, see TEXT_FIELDS),
    and a `messages` value that is not a list of {role, content} with known roles."""
    messages = row.get("messages")
    if messages is not None and not isinstance(messages, str):
        _checked_messages(messages)
    for field in TEXT_FIELDS:
        value = row.get(field)
        if value is None or isinstance(value, str):
            continue
        if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            continue
        raise ValueError(f"field '{field}' must be text, got {type(value).__name__} {_short(value)}; "
                         "write it as a JSON string (join a list into one text first)")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def format_function_call(call: dict[str, Any]) -> str:
    return "<function_call>" + json.dumps({"name": call["name"], "arguments": call.get("arguments", {})}) + "</function_call>"


def _function_calling_messages(row: dict[str, Any]) -> list[Message]:
    tools = _as_json(row["tools"], "tools")
    answers = _as_json(row["answers"], "answers")
    if isinstance(answers, dict):
        answers = [answers]
    system = (
        "You can call these tools. To call one, reply with "
        '<function_call>{"name": ..., "arguments": {...}}</function_call>.\n'
        f"Tools: {json.dumps(tools)}"
    )
    reply = "\n".join(format_function_call(call) for call in answers)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": str(row["query"]).strip()},
        {"role": "assistant", "content": reply},
    ]


def _as_json(value: Any, field: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"field '{field}' is not valid JSON: {exc}") from exc
    return value


FORMATTERS: dict[str, Formatter] = {
    "chat": Formatter({"messages": "messages", "prompt": "prompt", "response": "response", "system": "system"}, (), _chat_messages),
    "coding": Formatter({"instruction": "instruction", "input": "input", "output": "output"}, ("instruction", "output"), _instruction_messages),
    "language": Formatter({"instruction": "instruction", "input": "input", "output": "output"}, ("instruction", "output"), _instruction_messages),
    "function_calling": Formatter({"query": "query", "tools": "tools", "answers": "answers"}, ("query", "tools", "answers"), _function_calling_messages),
}


def column_map(source_type: str, overrides: dict[str, str], source_label: str) -> dict[str, str]:
    formatter = FORMATTERS[source_type]
    unknown = set(overrides) - set(formatter.fields)
    if unknown:
        raise DataError(
            f"source {source_label}: columns has unknown field(s) {sorted(unknown)} for type '{source_type}'; "
            f"valid fields: {sorted(formatter.fields)}"
        )
    return {**formatter.fields, **overrides}


def check_columns(source_type: str, mapping: dict[str, str], available: list[str], source_label: str) -> None:
    formatter = FORMATTERS[source_type]
    required = list(formatter.required)
    if source_type == "chat" and mapping["messages"] not in available:
        required = ["prompt", "response"]
    missing = [f"{field} (column '{mapping[field]}')" for field in required if mapping[field] not in available]
    if missing:
        raise DataError(
            f"source {source_label}: missing column(s) {', '.join(missing)} for type '{source_type}'. "
            f"The dataset has columns {available}; map them with columns: {{field: column_name}}"
            + (" (chat needs a 'messages' column or 'prompt' + 'response')" if source_type == "chat" else "")
        )


def to_messages(
    row: dict[str, Any], source_type: str, mapping: dict[str, str], system_prompt: str | None, allow_numbers: bool = False
) -> list[Message]:
    """The row as chat messages; raises ValueError/KeyError/TypeError naming the bad field
    (the caller adds the file and row)."""
    mapped = {field: row.get(column) for field, column in mapping.items()}
    check_field_types(mapped, allow_numbers)
    messages = FORMATTERS[source_type].build(mapped)
    if system_prompt and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages
