"""OpenAI chat requests to prompt token ids, and completions back to OpenAI tool calls.

The policy server takes requests in OpenAI's chat format (any agent framework speaks it)
but the model only knows its own chat template, which has no notion of tools. So every
message is first lowered to a plain `{"role", "content"}` turn, in the Hermes / Qwen text
form that small instruction-tuned models have seen most:

* the tool list and the way to call a tool go into the system message (one is created
  when the request has none);
* an assistant message's `tool_calls` become `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  lines after its text, exactly the form the model is told to write, so a trajectory
  re-sent by an agent renders the same text the model produced;
* `tool` messages become `tool` turns when the template writes any role it is given (ChatML,
  SmolLM2's own), otherwise a *user* turn holding `<tool_response>...</tool_response>` blocks
  (several results in a row share it), since such templates would drop or mis-render a tool
  role (see `tool_role_for`);

and the chat template (the one saved with the adapter) renders those turns. The reverse,
`parse_tool_calls`, turns the model's `<tool_call>` blocks back into OpenAI `tool_calls`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from brainforge.data.templates import writes_role_names
from brainforge.errors import BrainforgeError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(BrainforgeError):
    """A request the client can fix; the server answers it with OpenAI's error JSON
    `{"error": {"message", "type", "param", "code"}}` and `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


# ------------------------------------------------------------------------------ validation


def text_content(content: Any, param: str, *, allow_none: bool = False) -> str:
    """A message's content as one string: a string, or a list of text parts joined (what
    the OpenAI SDKs send for multi-part content). Images, audio and files are refused:
    the policy is a text model."""
    if content is None:
        if allow_none:
            return ""
        raise RequestError(f"{param} is missing; give the message's text", param=param)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for i, part in enumerate(content):
            where = f"{param}[{i}]"
            if not isinstance(part, dict):
                raise RequestError(f"{where} must be an object like {{\"type\": \"text\", \"text\": \"...\"}}", param=where)
            if part.get("type") != "text":
                raise RequestError(f"{where}: content part type {part.get('type')!r} is not supported; "
                                   "this server takes text parts only", param=where)
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.text must be a string", param=f"{where}.text")
            pieces.append(part["text"])
        return "".join(pieces)
    raise RequestError(f"{param} must be a string or a list of text parts, got {type(content).__name__}", param=param)


def validate_tools(tools: Any) -> list[ToolSpec]:
    """The request's `tools` (OpenAI layout) as specs; wrong shapes are a 400 naming the entry."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects", param="tools")
    specs = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise RequestError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": ...}}}}",
                               param=where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RequestError(f"{where}.function.name must be a non-empty string", param=f"{where}.function.name")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            raise RequestError(f"{where}.function.parameters must be a JSON schema object", param=f"{where}.function.parameters")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise RequestError(f"{where}.function.description must be a string", param=f"{where}.function.description")
        specs.append(ToolSpec(name, description, parameters))
    return specs


def _tool_call_text(call: Any, where: str) -> str:
    """One assistant `tool_calls` entry in the text form the model writes."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise RequestError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}", param=where)
    name = call["function"].get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.function.name must be a non-empty string", param=f"{where}.function.name")
    arguments: Any = call["function"].get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # rendered as the string it is: the model sees what it (or the agent) wrote
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}{TOOL_CALL_CLOSE}"


def tool_instructions(tools: list[ToolSpec], tool_choice: Any = None) -> str:
    """The system-message text that lists the tools and says how to call one."""
    listing = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False)
        for t in tools)
    text = ("You can call tools. The available tools are:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call a tool, write exactly\n"
            f"{TOOL_CALL_OPEN}{{\"name\": \"<tool name>\", \"arguments\": {{<arguments as JSON>}}}}{TOOL_CALL_CLOSE}\n"
            "and stop; the result comes back in the next turn. "
            "When you have the answer, reply in plain text.")
    if tool_choice == "required":
        text += "\nYou must call a tool."
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        text += f"\nYou must call the tool {tool_choice['function'].get('name')!r}."
    return text


def tool_role_for(chat_template: str) -> str:
    """Where tool results go: their own `tool` turn when the template writes any role name
    it is given (ChatML and SmolLM2's own do), else a user turn in <tool_response> tags.

    Why not always the user turn: measured with the default 135M model and three worked
    examples in the conversation, a result shown as a user turn made it answer with a
    `<tool_response>` of its own in about 40% of samples instead of calling the tool; as a
    `tool` turn it called the tool in 24 of 24."""
    return "tool" if writes_role_names(chat_template) else "user"


def lower_messages(messages: Any, tools: list[ToolSpec], tool_choice: Any = None, tool_role: str = "tool") -> list[dict[str, str]]:
    """OpenAI messages (+ tools) as plain `{"role", "content"}` turns any chat template
    renders (module docstring). `developer` is treated as `system`; tool results become
    `tool` turns, or with `tool_role="user"` a user turn of <tool_response> blocks."""
    if not isinstance(messages, list):
        raise RequestError("messages must be a list of message objects", param="messages")
    if not messages:
        raise RequestError("messages is empty; give at least one message", param="messages")
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role {role!r} is not one of {', '.join(ROLES)}", param=f"{where}.role")
        if role == "assistant":
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise RequestError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
            text = text_content(message.get("content"), f"{where}.content", allow_none=True)
            parts = [text] if text else []
            parts += [_tool_call_text(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls)]
            turns.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool" and tool_role == "tool":
            turns.append({"role": "tool", "content": text_content(message.get("content"), f"{where}.content")})
        elif role == "tool":
            block = f"<tool_response>\n{text_content(message.get('content'), f'{where}.content')}\n</tool_response>"
            if i > 0 and messages[i - 1].get("role") == "tool":  # results of one turn's calls share a user turn
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block})
        else:
            turns.append({"role": "system" if role == "developer" else role,
                          "content": text_content(message.get("content"), f"{where}.content")})
    if tools:
        instructions = tool_instructions(tools, tool_choice)
        if turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{instructions}".lstrip()}
        else:
            turns.insert(0, {"role": "system", "content": instructions})
    return turns


def encode_prompt(tokenizer: Any, chat_template: str, messages: Any, tools: list[ToolSpec],
                  tool_choice: Any = None) -> list[int]:
    """Prompt token ids of a request: lowered turns, rendered with `chat_template` and the
    assistant generation prompt, tokenised without extra special tokens (the template
    writes its own)."""
    turns = lower_messages(messages, tools, tool_choice, tool_role_for(chat_template))
    try:
        text = tokenizer.apply_chat_template(turns, chat_template=chat_template, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template's own raise_exception (e.g. roles must alternate) is the client's to fix
        raise RequestError(f"messages: the model's chat template refused them: {exc}", param="messages") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------ parsing


_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL)


def _as_call(body: str) -> dict[str, Any] | None:
    """An OpenAI tool call from one block's body, or None when it is not a valid call."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments already as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a completion. Each `<tool_call>` block holding a JSON object
    with a `name` (and an object of `arguments`) becomes an OpenAI tool call, arguments as a
    JSON string; a block that is not valid stays in the content as written, so the agent
    (and the reward) see what the model did. A last block cut off before its close tag
    counts when its JSON is complete. Content is None when only tool calls remain."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    position = 0
    for match in _BLOCK.finditer(text):
        call = _as_call(match.group(1).strip())
        if call is None:
            continue
        kept.append(text[position:match.start()])
        position = match.end()
        calls.append(call)
    kept.append(text[position:])
    content = "".join(kept).strip() if calls else text
    return (content or None) if calls else content, calls
