"""The seed's reward decision tree, every branch against hand-computed values."""

import pytest

from brainforge.rewards.seed import chat_score, coding_score, detect_task, function_calling_score, keyword_overlap, seed_reward
from brainforge.rewards.tools import register_tool

GOOD_CODE = '''```python
def square(x: float) -> float:
    """Return the square of x."""
    return x * x
```'''


@pytest.mark.parametrize("prompt, task", [
    ("Write Python to sort a list", "coding"),
    ("Fix this code please", "coding"),
    ("Use a tool to get the weather", "function_calling"),
    ("Reply with a function_call", "function_calling"),
    ("Tell me about Paris", "chat"),
])
def test_task_detection(prompt, task):
    assert detect_task(prompt) == task


def test_coding_branch_values():
    # valid +0.3, docstring +0.1, hints +0.1, length 50-2000 +0.1
    assert coding_score("", GOOD_CODE) == pytest.approx(0.6)
    # valid +0.3, no docstring, no hints, 26 chars (neither band)
    assert coding_score("", "def f(x):\n    return x * 2") == pytest.approx(0.3)
    # invalid -0.3, 12 chars < 20: -0.2
    assert coding_score("", "def f(:\n  x") == pytest.approx(-0.5)
    # invalid -0.3, long enough +0.1
    assert coding_score("", "def broken(:\n" + "    x = 1\n" * 10) == pytest.approx(-0.2)


def test_function_calling_branch_values():
    call = '<function_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</function_call>'
    assert function_calling_score("", call) == pytest.approx(0.7)          # +0.3 +0.2 +0.2
    unknown = '<function_call>{"name": "teleport", "arguments": {}}</function_call>'
    assert function_calling_score("", unknown) == pytest.approx(0.3)       # +0.3 +0.2 -0.2
    no_args = '{"name": "calculator"}'
    assert function_calling_score("", no_args) == pytest.approx(0.5)       # +0.3 +0.2 (exists)
    assert function_calling_score("", "<function_call>{oops}</function_call>") == pytest.approx(-0.3)
    assert function_calling_score("", "no call at all") == pytest.approx(-0.3)


def test_tool_registry_and_prompt_tools_count_as_existing():
    call = '<function_call>{"name": "book_flight", "arguments": {}}</function_call>'
    prompt_with_tools = 'Tools: [{"name": "book_flight", "description": "Book a flight"}]'
    assert function_calling_score(prompt_with_tools, call) == pytest.approx(0.7)
    register_tool("lookup_order", "Find an order by id")
    assert function_calling_score("", call.replace("book_flight", "lookup_order")) == pytest.approx(0.7)


def test_chat_branch_values():
    prompt = "Tell me about Paris"   # keywords: tell, paris
    answer = "Paris is the capital of France, known for its museums, cafes and the Eiffel Tower."
    # > 50 chars +0.1, unique ratio 15/15 > 0.7 +0.2, overlap 1/2 (paris) -> +0.1
    assert keyword_overlap(prompt, answer) == pytest.approx(0.5)
    assert chat_score(prompt, answer) == pytest.approx(0.4)
    # < 10 chars -0.5, unique 1.0 +0.2, no overlap
    assert chat_score(prompt, "Okay.") == pytest.approx(-0.3)
    # repetitive: 60 chars +0.1, unique ratio 1/12 < 0.3 -0.3
    assert chat_score("hello", "spam " * 12) == pytest.approx(-0.2)


def test_seed_reward_routes_and_clamps():
    rewards = seed_reward(["Write python code", "Use a tool", "Hi"], [GOOD_CODE, "nothing", "Okay."])
    assert rewards == pytest.approx([0.6, -0.3, -0.3])
    assert all(-1 <= r <= 1 for r in seed_reward(["x"], ["a" * 5]))


def test_a_fence_followed_by_blanks_does_not_stall_the_reward():
    """The code-block pattern once had two adjacent blank runs: quadratic backtracking on a fence
    followed by many spaces (200k spaces took minutes). A policy under RL finds such inputs."""
    import time

    from brainforge.rewards.seed import CODE_BLOCK

    started = time.process_time()
    assert CODE_BLOCK.findall("```" + " " * 200_000) == []
    assert time.process_time() - started < 5  # linear: ~0.03 s; the old pattern needed ~100 s
    assert CODE_BLOCK.findall("```python \nx = 1\n``` ```\ny\n```") == ["x = 1\n", "y\n"]


# -- the OpenAI tool_calls layout (issue 12): arguments arrive as a JSON *string* ----------------
def _openai_call(name, arguments):
    import json

    return json.dumps({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}]})


def test_openai_tool_calls_layout_scores_like_the_native_form():
    # valid JSON +0.3, name + arguments +0.2, tool exists +0.2 (the diagram's values)
    assert function_calling_score("", _openai_call("get_weather", '{"city": "Oslo"}')) == pytest.approx(0.7)
    # unknown tool: +0.3 +0.2 -0.2
    assert function_calling_score("", _openai_call("teleport", "{}")) == pytest.approx(0.3)
    # the built-in agent tools are known to the registry
    assert function_calling_score("", _openai_call("read_file", '{"path": "a.txt"}')) == pytest.approx(0.7)


def test_a_bare_function_object_with_string_arguments():
    bare = '{"function": {"name": "calculator", "arguments": "{\\"expression\\": \\"2 * 3\\"}"}}'
    assert function_calling_score("", bare) == pytest.approx(0.7)


def test_string_arguments_that_are_not_json_are_json_invalid():
    assert function_calling_score("", _openai_call("get_weather", "city=Oslo")) == pytest.approx(-0.3)
    bare = '<function_call>{"name": "calculator", "arguments": "2 * (3"}</function_call>'
    assert function_calling_score("", bare) == pytest.approx(-0.3)


def test_tool_call_blocks_as_the_policy_server_prompts_them():
    call = 'Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "4821 * 377"}}</tool_call>'
    assert function_calling_score("", call) == pytest.approx(0.7)
    assert function_calling_score("", "<tool_call>{not json}</tool_call> {\"a\": 1}") == pytest.approx(-0.3)


def test_tools_declared_in_the_openai_layout_in_the_prompt_count_as_existing():
    prompt = 'Use a tool. Tools: [{"type": "function", "function": {"name": "book_flight", "parameters": {}}}]'
    assert function_calling_score(prompt, _openai_call("book_flight", "{}")) == pytest.approx(0.7)


def test_repeated_unclosed_call_tags_do_not_stall_the_reward():
    """A lazy `<tag>(.*?)</tag>` regex rescans to the end from every unclosed opening tag:
    20,000 of them took about a minute. The block is now found in linear time."""
    import time

    started = time.process_time()
    for tag in ("<tool_call>", "<function_call>"):
        assert function_calling_score("", tag * 20_000) == pytest.approx(-0.3)
    assert time.process_time() - started < 5
    # the first complete block wins, whichever tag it uses
    both = '<tool_call>{"name": "calculator", "arguments": {}}</tool_call><function_call>{oops}</function_call>'
    assert function_calling_score("", both) == pytest.approx(0.7)
    unclosed_first = '<function_call> <tool_call>{"name": "calculator", "arguments": {}}</tool_call>'
    assert function_calling_score("", unclosed_first) == pytest.approx(0.7)


def test_deeply_nested_json_is_invalid_not_a_crash():
    """json.loads raises RecursionError (not JSONDecodeError) on deep nesting; the reward
    raised with it, which stops training on one completion."""
    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    assert function_calling_score("", deep) == pytest.approx(-0.3)
    nested_args = _openai_call("calculator", "[" * 5000 + "]" * 5000)
    assert function_calling_score("", nested_args) == pytest.approx(-0.3)
