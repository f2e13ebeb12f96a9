"""The seed's reward decision tree ("Reward Function Decision Tree" in DIAGRAMS.md).

Task type is detected from the prompt, in the diagram's order: mentions of code or python
make it a coding task; otherwise function_call or tool make it function calling; otherwise
it is chat. Each branch adds the diagram's increments, the sum is clamped to [-1, 1].

Coding (the code is the completion's fenced blocks, or the whole completion if it has none):
    syntax valid +0.3 / invalid -0.3; has a docstring +0.1; has type hints +0.1;
    code length 50-2000 chars +0.1, under 20 chars -0.2.
Function calling (the call is the first `<function_call>{...}</function_call>` or
`<tool_call>{...}</tool_call>` block, or the first JSON object in the completion; the OpenAI
layouts `{"tool_calls": [{"function": {...}}]}` and `{"function": {...}}` count as the call
inside them, and arguments given as a JSON string, as OpenAI sends them, are parsed):
    JSON valid +0.3 / invalid or absent -0.3 (string arguments that are not JSON are
    invalid JSON); has "name" and "arguments" +0.2;
    the named tool exists +0.2 / does not -0.2. "Exists" means registered in
    `rewards.tools` or declared in the prompt's own tool list.
Chat:
    length > 50 chars +0.1, < 10 chars -0.5; unique-word ratio > 0.7 +0.2, < 0.3 -0.3;
    keyword overlap with the prompt: +0.2 x the fraction of the prompt's keywords (words of
    3+ letters that are not stop words) that the answer repeats. The diagram leaves this
    box without a value; 0.2 keeps it as large as the largest other chat increment.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from brainforge.rewards.tools import get_tool

CODE_BLOCK = re.compile(r"```[ \t]*(?:[\w+-]+[ \t]*)?\n(.*?)```", re.DOTALL)  # linear: no two adjacent blank runs
CALL_TAGS = ("function_call", "tool_call")
WORD = re.compile(r"[a-zA-Z][a-zA-Z']+")
STOP_WORDS = frozenset(
    "the and for are but not you all any can her was one our out has have had him his how its may new now "
    "see two who did get let say she too use what when where which why with this that from they them then "
    "than there their these those will would could should into about your yours been were some such only "
    "also more most very just over does doing".split()
)


def detect_task(prompt: str) -> str:
    text = prompt.lower()
    if "code" in text or "python" in text:
        return "coding"
    if "function_call" in text or "tool" in text:
        return "function_calling"
    return "chat"


def seed_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """The decision-tree reward for each (prompt, completion) pair."""
    scorers = {"coding": coding_score, "function_calling": function_calling_score, "chat": chat_score}
    return [_clamp(scorers[detect_task(p)](p, c)) for p, c in zip(prompts, completions)]


def coding_score(prompt: str, completion: str) -> float:
    blocks = CODE_BLOCK.findall(completion)
    code = "\n".join(blocks) if blocks else completion
    score = 0.0
    try:
        tree = ast.parse(code)
    except SyntaxError:
        tree = None
    score += 0.3 if tree is not None else -0.3
    if tree is not None and _has_docstring(tree):
        score += 0.1
    if tree is not None and _has_type_hints(tree):
        score += 0.1
    length = len(code.strip())
    if 50 <= length <= 2000:
        score += 0.1
    elif length < 20:
        score -= 0.2
    return score


def _has_docstring(tree: ast.Module) -> bool:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return any(ast.get_docstring(node) for node in nodes)


def _has_type_hints(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            if node.returns is not None or any(a.annotation is not None for a in args):
                return True
        if isinstance(node, ast.AnnAssign):
            return True
    return False


def function_calling_score(prompt: str, completion: str) -> float:
    call = _parse_call(completion)
    if not isinstance(call, dict):
        return -0.3
    score = 0.3
    name = call.get("name")
    if isinstance(name, str) and "arguments" in call:
        score += 0.2
    if isinstance(name, str):
        score += 0.2 if (get_tool(name) is not None or name in _prompt_tools(prompt)) else -0.2
    return score


def _parse_call(completion: str) -> Any:
    block = _call_block(completion)
    candidates = [block] if block is not None else _json_objects(completion)
    for text in candidates:
        try:
            return _normalise_call(json.loads(text))
        except (json.JSONDecodeError, RecursionError):  # deep nesting is not a call either
            continue
    return None


def _call_block(text: str) -> str | None:
    """The body of the first complete `<function_call>` or `<tool_call>` block. Found with
    two `str.find`s per tag, linear in the text: a lazy regex rescans to the end from every
    unclosed opening tag, quadratic on a completion that repeats the tag."""
    found: tuple[int, str] | None = None
    for tag in CALL_TAGS:
        opening, closing = f"<{tag}>", f"</{tag}>"
        start = text.find(opening)
        if start < 0:
            continue
        end = text.find(closing, start + len(opening))
        if end >= 0 and (found is None or start < found[0]):
            found = (start, text[start + len(opening) : end])
    return None if found is None else found[1]


def _normalise_call(value: Any) -> Any:
    """The `{"name", "arguments"}` call inside the OpenAI layouts (a message's first
    `tool_calls` entry, or a bare `{"function": {...}}`), with string arguments parsed.
    Raises JSONDecodeError when the arguments string is not JSON."""
    if not isinstance(value, dict):
        return value
    calls = value.get("tool_calls")
    if isinstance(calls, list) and calls and isinstance(calls[0], dict):
        value = calls[0]
    if isinstance(value.get("function"), dict):
        value = value["function"]
    arguments = value.get("arguments")
    if isinstance(arguments, str):
        value = {**value, "arguments": json.loads(arguments)}
    return value


def _json_objects(text: str) -> list[str]:
    """Balanced {...} spans, outermost first."""
    spans, depth, start = [], 0, -1
    for index, char in enumerate(text):
        if char == "{":
            if depth == 0:
                start = index
            depth += 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                spans.append(text[start : index + 1])
    return spans


def _prompt_tools(prompt: str) -> set[str]:
    names = set()
    for span in _json_objects(prompt) + re.findall(r"\[.*\]", prompt, re.DOTALL):
        try:
            value = json.loads(span)
        except json.JSONDecodeError:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and isinstance(item.get("function"), dict):
                item = item["function"]  # the OpenAI tools layout
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                names.add(item["name"])
    return names


def chat_score(prompt: str, completion: str) -> float:
    text = completion.strip()
    score = 0.0
    if len(text) > 50:
        score += 0.1
    elif len(text) < 10:
        score -= 0.5
    words = [w.lower() for w in WORD.findall(text)]
    if words:
        unique_ratio = len(set(words)) / len(words)
        if unique_ratio > 0.7:
            score += 0.2
        elif unique_ratio < 0.3:
            score -= 0.3
    score += 0.2 * keyword_overlap(prompt, completion)
    return score


def keyword_overlap(prompt: str, completion: str) -> float:
    """Fraction of the prompt's keywords that appear in the completion (0 when none)."""
    keywords = {w.lower() for w in WORD.findall(prompt) if len(w) >= 3} - STOP_WORDS
    if not keywords:
        return 0.0
    answer = {w.lower() for w in WORD.findall(completion)}
    return len(keywords & answer) / len(keywords)


def _clamp(value: float) -> float:
    return round(max(-1.0, min(1.0, value)), 6)
