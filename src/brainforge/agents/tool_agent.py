"""The default agent (`algorithm.agent.function: brainforge.agents.tool_agent:solve`): a plain
tool-calling loop written only against the OpenAI client API, so it is the same code a user
would run against any OpenAI-compatible server; training changes nothing in it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from brainforge.agents.tasks import task_reward
from brainforge.agents.tools import openai_tools, run_tool_call, select_tools

log = logging.getLogger(__name__)

MAX_TURNS = 4
MAX_TOKENS = 128
MODEL = "policy"
# One worked call per tool, in the text form the policy server tells the model to write
# (agents/chat_format.py), appended to the system prompt. Measured on the default 135M model
# (32 test tasks, greedy and at temperature 0.7): 0 tool calls and 0 successes with or
# without it; it is there so that a model that can follow an example sees the exact format.
EXAMPLES = {
    "calculator": ("What is 12 * 34?", {"expression": "12 * 34"}, "408", "408"),
    "read_file": ("What is the workers in configs/example.ini?", {"path": "configs/example.ini"},
                  "[service]\nname = example\nworkers = 4", "4"),
    "python": ("What is the sum of the digits of 2**10?", {"code": "print(sum(int(d) for d in str(2**10)))"}, "7", "7"),
}


def default_prompt() -> str:
    """The system prompt when none is given: `AgentSettings.system_prompt`'s default."""
    from brainforge.config import AgentSettings

    return AgentSettings.model_fields["system_prompt"].default


def example_text(tool_names: list[str]) -> str:
    """A worked example of calling the first of the task's tools that has one ("" if none)."""
    for name in tool_names:
        if name in EXAMPLES:
            question, arguments, result, answer = EXAMPLES[name]
            call = json.dumps({"name": name, "arguments": arguments})
            return (f"Example.\nUser: {question}\nAssistant: <tool_call>{call}</tool_call>\n"
                    f"Tool result: <tool_response>\n{result}\n</tool_response>\nAssistant: {answer}")
    return ""


def solve(task: dict[str, Any], client: Any, prompt: str | None = None) -> float:
    """Run one task to its final reply and return its reward (`tasks.task_reward`).

    Each turn is one chat.completions call with the task's tools; tool calls in the reply are
    run (errors come back to the model as text) and the loop continues; a reply without tool
    calls is final. A task still calling tools after MAX_TURNS scores 0. The system message is
    `prompt` (what APO optimises) followed by a worked example of the task's tool. Exceptions
    from the client propagate: the runner counts the rollout as failed."""
    names = list(task.get("tools") or [])
    tools = select_tools(names, root=task.get("root"), store=task.get("store"))
    system = "\n\n".join(part for part in (prompt if prompt is not None else default_prompt(), example_text(names)) if part)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": task["prompt"]},
    ]
    request_tools = openai_tools(tools) or None
    for _ in range(MAX_TURNS):
        extra = {"tools": request_tools} if request_tools else {}
        response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, **extra)
        message = response.choices[0].message
        calls = list(message.tool_calls or [])
        if not calls:
            return task_reward(message.content or "", task)
        call_dicts = [_call_dict(call, index) for index, call in enumerate(calls)]
        messages.append({"role": "assistant", "content": message.content or "", "tool_calls": call_dicts})
        for call in call_dicts:
            output = run_tool_call(tools, call)
            log.debug("tool %s(%s) -> %.200s", call["function"]["name"], call["function"]["arguments"], output)
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": output})
    return 0.0


def _call_dict(call: Any, index: int) -> dict[str, Any]:
    """An SDK tool call as the plain dict the next request sends back (arguments stay the
    exact string the server returned, so the model sees what it wrote)."""
    data = call.model_dump() if hasattr(call, "model_dump") else dict(call)
    function = data.get("function") or {}
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {})
    return {"id": data.get("id") or f"call_{index}", "type": "function",
            "function": {"name": function.get("name") or "", "arguments": arguments}}
