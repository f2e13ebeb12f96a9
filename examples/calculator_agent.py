"""A calculator agent written against the plain `openai` client, and nothing else.

It is the code a user runs against any OpenAI-compatible server, and the code brainforge
trains unchanged: `algorithm.agent.function: examples/calculator_agent.py:solve` makes the
trainer call `solve(task, client, prompt)` with a client pointed at its policy server.
No brainforge imports on purpose.

    python examples/calculator_agent.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import random
import re
import sys

from openai import OpenAI

SYSTEM_PROMPT = ("You are a careful assistant with a calculator. For any arithmetic, call the calculator tool, "
                 "read its result, then reply with just the number.")
TOOLS = [{
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression exactly (+ - * / // % ** and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}]
# Two worked examples shown as earlier turns of the conversation. The default 135M model told
# about the tool in words alone did not call it (this agent without them: reward 0 on all 32
# rollouts of a 2-step agent_grpo run, so nothing to learn from); with them, 41% of its
# rollouts at temperature 0.7 were right. A large hosted model does not need them.
EXAMPLE_TURNS = []
for _index, (_question, _expression, _result) in enumerate([("What is 123 * 456?", "123 * 456", "56088"),
                                                            ("What is 98765 / 5?", "98765 / 5", "19753")]):
    EXAMPLE_TURNS += [
        {"role": "user", "content": f"{_question} Reply with just the number."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": f"example_{_index}", "type": "function", "function": {
            "name": "calculator", "arguments": json.dumps({"expression": _expression})}}]},
        {"role": "tool", "tool_call_id": f"example_{_index}", "content": _result},
        {"role": "assistant", "content": _result},
    ]
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def calculator(expression: str) -> str:
    """Arithmetic on number literals only (a parsed tree, never eval); errors as text."""
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 2 ** 64):
                raise ValueError("the result would be too large")  # 9**9**9 would hold a core for hours
            return _OPS[type(node.op)](left, right)
        raise ValueError("only numbers and + - * / // % ** are allowed")

    try:
        if len(expression) > 200:
            raise ValueError("expression too long")
        result = value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as exc:
        return f"error: {exc}"
    return str(int(result)) if isinstance(result, float) and result.is_integer() else str(result)


def run_call(call) -> str:
    """One tool call from the model; anything malformed becomes an error text."""
    if call.function.name != "calculator":
        return f"error: unknown tool {call.function.name!r}"
    try:
        arguments = json.loads(call.function.arguments or "{}")
        return calculator(str(arguments["expression"]))
    except (json.JSONDecodeError, KeyError, TypeError):
        return 'error: call calculator with {"expression": "..."}'


def reward(reply: str, answer: str) -> float:
    """1.0 when the reply's last number is the answer (commas and a trailing .0 allowed)."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", reply or "")
    if not numbers:
        return 0.0
    try:
        return 1.0 if float(numbers[-1].replace(",", "")) == float(answer) else 0.0
    except ValueError:
        return 0.0


def solve(task: dict, client: OpenAI, prompt: str | None = None) -> float:
    """Answer `task["prompt"]` with the calculator; return the reward against `task["answer"]`."""
    messages = [{"role": "system", "content": prompt or SYSTEM_PROMPT}, *EXAMPLE_TURNS,
                {"role": "user", "content": task["prompt"]}]
    for _ in range(4):
        reply = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=192).choices[0].message
        if not reply.tool_calls:
            return reward(reply.content or "", str(task["answer"]))
        messages.append({"role": "assistant", "content": reply.content or "",
                         "tool_calls": [{"id": c.id, "type": "function",
                                         "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                        for c in reply.tool_calls]})
        for call in reply.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": run_call(call)})
    return 0.0


def example_tasks(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    tasks = []
    for _ in range(count):
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        tasks.append({"prompt": f"What is {a} * {b}? Reply with just the number.", "answer": str(a * b)})
    return tasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="an OpenAI-compatible endpoint")
    parser.add_argument("--api-key", default="none", help="the server's key, if it checks one")
    parser.add_argument("--tasks", type=int, default=8, help="how many multiplication tasks to run")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    rewards = []
    for task in example_tasks(args.tasks):
        rewards.append(solve(task, client))
        print(f"{task['prompt']}  -> reward {rewards[-1]:.0f}")
    print(f"success: {sum(rewards):.0f}/{len(rewards)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
