"""The tool registry that the function-calling reward checks names against (the seed's
`tools.py`). Users add their own tools with `register_tool`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Tool] = {}


def register_tool(name: str, description: str, parameters: dict[str, Any] | None = None) -> Tool:
    tool = Tool(name, description, dict(parameters or {}))
    _REGISTRY[name] = tool
    return tool


def get_tool(name: str) -> Tool | None:
    return _REGISTRY.get(name) or _BUILTIN.get(name)


def tool_names() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTRY})


_BUILTIN: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("get_weather", "Current weather for a city", {"city": {"type": "string"}, "unit": {"type": "string"}}),
        Tool("calculator", "Evaluate an arithmetic expression", {"expression": {"type": "string"}}),
        Tool("search_web", "Search the web", {"query": {"type": "string"}}),
        Tool("send_email", "Send an email", {"to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}}),
        Tool("convert_currency", "Convert an amount between currencies", {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}}),
        Tool("search_knowledge", "Search the user's knowledge base", {"query": {"type": "string"}}),
        # The runnable built-in tools of `brainforge.agents.tools` (calculator is above).
        Tool("python", "Run a short Python program and return what it prints", {"code": {"type": "string"}}),
        Tool("read_file", "Read a text file under the working folder", {"path": {"type": "string"}}),
        Tool("memory_search", "Search the document store", {"query": {"type": "string"}, "top_k": {"type": "integer"}}),
    )
}
