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
# Worked examples per tool, given to the model as earlier turns of the conversation (a user
# question, the assistant's tool call, the tool's result, the assistant's answer), in the text
# form the policy server tells the model to write (agents/chat_format.py). Why turns and not a
# description in the system prompt: measured with the default 135M model on calculator
# questions (24 samples at temperature 0.7), it called the tool 0 times with the description
# alone and 24 times after three worked turns with the results shown as tool turns.
_SERVICE = "# Settings of the {name} service\n[service]\nname = {name}\nhost = 10.0.3.7\nport = {port}\nworkers = 8\ntimeout_s = {timeout}\nrelease = {release}\n"
EXAMPLES: dict[str, list[tuple[str, dict[str, str], str, str]]] = {
    "calculator": [
        ("What is 123 * 456? Use the calculator tool. Reply with just the number.", {"expression": "123 * 456"}, "56088", "56088"),
        ("What is 98765 / 5? Use the calculator tool. Reply with just the number.", {"expression": "98765 / 5"}, "19753", "19753"),
        ("What is 3021 - 47 * 12? Use the calculator tool. Reply with just the number.", {"expression": "3021 - 47 * 12"}, "2457", "2457"),
    ],
    "read_file": [
        ("What is the port in configs/example_a.ini? Use the read_file tool. Reply with just the number.",
         {"path": "configs/example_a.ini"}, _SERVICE.format(name="demo-a", port=8080, timeout=30, release="AB12-CD34"), "8080"),
        ("What is the timeout_s in configs/example_b.ini? Use the read_file tool. Reply with just the number.",
         {"path": "configs/example_b.ini"}, _SERVICE.format(name="demo-b", port=5121, timeout=120, release="QR7Z-XY2P"), "120"),
        ("What is the release in configs/example_c.ini? Use the read_file tool. Reply with just the release code.",
         {"path": "configs/example_c.ini"}, _SERVICE.format(name="demo-c", port=2390, timeout=45, release="MN3K-7TWV"), "MN3K-7TWV"),
    ],
    "python": [
        ("What is the sum of the digits of 2**10? Use the python tool and print the result. Reply with just the number.",
         {"code": "print(sum(int(d) for d in str(2**10)))"}, "7", "7"),
        ("How many prime numbers are there below 50? Use the python tool and print the result. Reply with just the number.",
         {"code": "print(sum(1 for n in range(2, 50) if all(n % d for d in range(2, int(n ** 0.5) + 1))))"}, "15", "15"),
        ("What is the sum of the digits of 3**20? Use the python tool and print the result. Reply with just the number.",
         {"code": "print(sum(int(d) for d in str(3**20)))"}, "45", "45"),
    ],
}


def example_turns(tool_names: list[str]) -> list[dict[str, Any]]:
    """Worked examples of the task's tools as OpenAI messages (empty for tools without any)."""
    turns: list[dict[str, Any]] = []
    for name in tool_names:
        for index, (question, arguments, result, answer) in enumerate(EXAMPLES.get(name, [])):
            call_id = f"call_example_{name}_{index}"
            turns += [{"role": "user", "content": question},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
                      {"role": "tool", "tool_call_id": call_id, "content": result},
                      {"role": "assistant", "content": answer}]
    return turns


def default_prompt() -> str:
    """The system prompt when none is given: `AgentSettings.system_prompt`'s default."""
    from brainforge.config import AgentSettings

    return AgentSettings.model_fields["system_prompt"].default


def solve(task: dict[str, Any], client: Any, prompt: str | None = None) -> float:
    """Run one task to its final reply and return its reward (`tasks.task_reward`).

    Each turn is one chat.completions call with the task's tools; tool calls in the reply are
    run (errors come back to the model as text) and the loop continues; a reply without tool
    calls is final. A task still calling tools after MAX_TURNS scores 0. The system message is
    `prompt` (what APO optimises); worked examples of the task's tools come before the task as
    earlier turns (`example_turns`). Exceptions
    from the client propagate: the runner counts the rollout as failed."""
    names = list(task.get("tools") or [])
    tools = select_tools(names, root=task.get("root"), store=task.get("store"))
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": prompt if prompt is not None else default_prompt()},
        *example_turns(names),
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
