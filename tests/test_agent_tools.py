"""The built-in agent tools against hostile input: what a policy under RL writes is treated
as an attack (calculator injection and size bombs, read_file escapes, python that hangs or
writes outside its sandbox), and bad calls come back as text, never as an exception."""

import json
import os
import time

import pytest

from brainforge.agents import tools as agent_tools
from brainforge.agents.tools import (AgentTool, builtin_tools, calculate, openai_tools, read_file_under, run_tool_call,
                                     select_tools)
from brainforge.errors import BrainforgeError, MissingDependencyError, StoreError


def call(name, arguments):
    """A tool call in the OpenAI layout, arguments as the JSON string the server returns."""
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


@pytest.fixture
def tools(tmp_path):
    root = tmp_path / "root"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "a.ini").write_text("port = 8080\n")
    return builtin_tools(root=root, python_timeout_s=20)


# -- calculator -----------------------------------------------------------------------------------
@pytest.mark.parametrize("expression, expected", [
    ("4821 * 377", "1817517"), ("1817517 / 377", "4821"), ("7 / 2", "3.5"), ("-(3 + 4) * 2", "-14"),
    ("17 // 5", "3"), ("17 % 5", "2"), ("2 ** 10", "1024"), ("4821 × 377", "1817517"), ("2 ** -1", "0.5"),
])
def test_calculator_computes(tools, expression, expected):
    assert run_tool_call(tools, call("calculator", {"expression": expression})) == expected


@pytest.mark.parametrize("expression", [
    "__import__('os').system('touch /tmp/pwned')",   # a call
    "(1).__class__.__bases__",                       # attribute access
    "x + 1",                                         # a name
    "'a' * 10",                                      # a string
    "[1] * 10**9",                                   # a list
    "lambda: 1",
    "1 if 1 else 2",
    "2 < 3",
    "True + 1",
    "1 << 100000",                                   # shifts are not arithmetic here
    "2 ^ 10",                                        # xor, not power: told to write **
    "1 / 0",
    "(-8) ** 0.5",                                   # complex
    "1e308 * 10",                                    # inf
    "",
])
def test_calculator_refuses_anything_but_arithmetic(tools, expression):
    assert run_tool_call(tools, call("calculator", {"expression": expression})).startswith("error: ")


@pytest.mark.parametrize("expression", [
    "9**9**9", "2**10**10", "10**100000", "(10**1000)**1000", "10**4000 * 10**4000", "99999**99999",
    "1" * 290 + "**9999",
])
def test_calculator_size_bombs_are_refused_quickly(expression):
    started = time.process_time()
    with pytest.raises(agent_tools.CalculatorError, match="larger than|exponents"):
        calculate(expression)
    assert time.process_time() - started < 1.0  # refused before computing: 9**9**9 alone takes hours


def test_calculator_refuses_huge_and_deeply_nested_input(tools):
    assert "characters long" in run_tool_call(tools, call("calculator", {"expression": "1" * 1_000_000}))
    assert run_tool_call(tools, call("calculator", {"expression": "(" * 140 + "1" + ")" * 140})) == "1"
    assert run_tool_call(tools, call("calculator", {"expression": "-" * 299 + "1"})) == "-1"
    assert run_tool_call(tools, call("calculator", {"expression": "(" * 150 + ")" * 150})).startswith("error: ")


# -- read_file --------------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "a.ini").write_text("port = 8080\n")
    (tmp_path / "secret.txt").write_text("the secret\n")
    return root


def test_read_file_reads_relative_and_absolute_paths_inside_the_root(tree):
    assert read_file_under(tree, "configs/a.ini") == "port = 8080\n"
    assert read_file_under(tree, str(tree / "configs" / "a.ini")) == "port = 8080\n"
    assert read_file_under(tree, "configs/../configs/./a.ini") == "port = 8080\n"


@pytest.mark.parametrize("path", ["../secret.txt", "configs/../../secret.txt", "/etc/passwd", "/proc/self/environ",
                                  "/proc/self/cwd/secret.txt", "../" * 30 + "etc/passwd", "~/.netrc"])
def test_read_file_refuses_paths_outside_the_root(tree, path):
    output = read_file_under(tree, path)
    assert output.startswith("error: ")
    assert "the secret" not in output and "root:" not in output


def test_read_file_refuses_symlinks_that_lead_outside(tree):
    (tree / "link.txt").symlink_to(tree.parent / "secret.txt")
    (tree / "linkdir").symlink_to(tree.parent)
    (tree / "inside.txt").symlink_to(tree / "configs" / "a.ini")
    assert "outside" in read_file_under(tree, "link.txt")
    assert "outside" in read_file_under(tree, "linkdir/secret.txt")
    assert read_file_under(tree, "inside.txt") == "port = 8080\n"  # a link that stays inside is fine


def test_read_file_refuses_directories_big_binary_and_special_files(tree):
    assert "is a directory" in read_file_under(tree, "configs") and "a.ini" in read_file_under(tree, "configs")
    (tree / "big.txt").write_text("x" * 100)
    assert "bytes" in read_file_under(tree, "big.txt", max_bytes=50)
    (tree / "blob.bin").write_bytes(b"ELF\x00\x01\x02")
    assert "binary" in read_file_under(tree, "blob.bin")
    (tree / "latin.txt").write_bytes(b"caf\xe9")
    assert "binary" in read_file_under(tree, "latin.txt")
    os.mkfifo(tree / "pipe")
    started = time.monotonic()
    assert "not a regular file" in read_file_under(tree, "pipe")  # opening a FIFO would block forever
    assert time.monotonic() - started < 5
    assert "no such file" in read_file_under(tree, "configs/missing.ini")
    assert read_file_under(tree, "a\x00b").startswith("error: ")
    assert read_file_under(tree, "x" * 5000).startswith("error: ")


def test_read_file_needs_a_folder_as_root(tmp_path):
    with pytest.raises(BrainforgeError, match="not a folder"):
        builtin_tools(root=tmp_path / "missing")


# -- python -----------------------------------------------------------------------------------------
def test_python_runs_prints_and_reports_errors(tools):
    assert run_tool_call(tools, call("python", {"code": "print(sum(int(d) for d in str(2**100)))"})).strip() == "115"
    failed = run_tool_call(tools, call("python", {"code": "raise ValueError('boom')"}))
    assert "ValueError: boom" in failed and "exit status 1" in failed
    assert "no output" in run_tool_call(tools, call("python", {"code": "x = 1"}))
    assert "characters long" in run_tool_call(tools, call("python", {"code": "#" * 10_000_000}))


def test_python_infinite_loop_times_out(tmp_path):
    quick = builtin_tools(python_timeout_s=2)
    started = time.monotonic()
    output = run_tool_call(quick, call("python", {"code": "while True:\n    pass"}))
    assert "timed out" in output
    assert time.monotonic() - started < 60


def test_python_cannot_write_outside_its_sandbox_and_output_is_truncated(tools, tmp_path):
    target = tmp_path / "escaped.txt"
    code = (f"import os\ntry:\n    open({str(target)!r}, 'w').write('x')\n    print('wrote')\n"
            f"except OSError as e:\n    print('refused', type(e).__name__)\nprint('y' * 100000)")
    output = run_tool_call(tools, call("python", {"code": code}))
    assert not target.exists()
    assert "refused" in output
    assert len(output) < agent_tools.MAX_OUTPUT_CHARS + 100 and "more characters" in output


# -- run_tool_call on malformed calls -------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"function": {"name": "teleport", "arguments": "{}"}}, "no tool named 'teleport'"),
    ({"function": {"name": "calculator", "arguments": "{\"expression\": "}}, "not valid JSON"),
    ({"function": {"name": "calculator", "arguments": "[1, 2]"}}, "must be a JSON object"),
    ({"function": {"name": "calculator", "arguments": {"expr": "1+1"}}}, "no argument 'expr'"),
    ({"function": {"name": "calculator", "arguments": {}}}, "needs the argument 'expression'"),
    ({"function": {"name": "calculator", "arguments": {"expression": 12}}}, "must be a string"),
    ({"function": {"name": "read_file", "arguments": {"path": ["a"]}}}, "must be a string"),
    ({"function": {"arguments": "{}"}}, "no tool name"),
    ({"function": "calculator"}, "must be an object"),
    ("calculator(1+1)", "must be an object"),
    (None, "must be an object"),
    ({"function": {"name": "calculator", "arguments": "[" * 100_000}}, "not valid JSON"),
])
def test_bad_calls_come_back_as_error_text(tools, bad, message):
    output = run_tool_call(tools, bad)
    assert output.startswith("error: ") and message in output


def test_call_layouts_dict_arguments_bare_form_and_sdk_objects(tools):
    from openai.types.chat import ChatCompletionMessageToolCall

    assert run_tool_call(tools, {"function": {"name": "calculator", "arguments": {"expression": "6*7"}}}) == "42"
    assert run_tool_call(tools, {"name": "calculator", "arguments": {"expression": "6*7"}}) == "42"
    sdk = ChatCompletionMessageToolCall(id="c1", type="function",
                                        function={"name": "read_file", "arguments": '{"path": "configs/a.ini"}'})
    assert run_tool_call(tools, sdk) == "port = 8080\n"


def test_a_tool_that_raises_is_an_observation_but_a_broken_environment_raises():
    def crash(arguments):
        raise KeyError("oops")

    def broken(arguments):
        raise BrainforgeError("no sandbox here")

    tools = {"crash": AgentTool("crash", "", {"type": "object", "properties": {}}, crash),
             "broken": AgentTool("broken", "", {"type": "object", "properties": {}}, broken)}
    assert "crash failed (KeyError" in run_tool_call(tools, call("crash", {}))
    with pytest.raises(BrainforgeError, match="no sandbox"):
        run_tool_call(tools, call("broken", {}))


# -- selection, schema and registry ---------------------------------------------------------------
def test_select_tools_names_what_is_missing(tmp_path, monkeypatch):
    assert list(select_tools(["calculator", "python"])) == ["calculator", "python"]
    with pytest.raises(BrainforgeError, match="read_file needs a root"):
        select_tools(["read_file"])
    with pytest.raises(BrainforgeError, match="memory_search needs a memory store"):
        select_tools(["memory_search"])
    with pytest.raises(BrainforgeError, match="unknown built-in tool"):
        select_tools(["shell"])
    with pytest.raises(StoreError, match="brainforge ingest"):
        select_tools(["memory_search"], store=str(tmp_path / "nostore"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "chromadb" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"brainforge\[memory\]"):
        select_tools(["memory_search"], store=str(tmp_path))


def test_memory_search_returns_top_k_passages(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from brainforge.memory import retrieval

    seen = {}

    class FakeRetriever:
        def __init__(self, store, config):
            seen["store"] = store.root

        def search(self, query, top_k):
            seen["query"] = (query, top_k)
            chunk = SimpleNamespace(path="/docs/guide.md", text="guide.md:1\nThe port is\n 8080.")
            return SimpleNamespace(hits=[SimpleNamespace(chunk=chunk)] * top_k)

    monkeypatch.setattr(retrieval, "HybridRetriever", FakeRetriever)
    tools = select_tools(["memory_search"], store=str(tmp_path))
    output = run_tool_call(tools, call("memory_search", {"query": "port", "top_k": 2}))
    assert output.count("(guide.md)") == 2 and "The port is 8080." in output
    assert seen["query"] == ("port", 2)
    assert run_tool_call(tools, call("memory_search", {"query": "port", "top_k": 50})).startswith("error: top_k")


def test_openai_layout_and_the_seed_registry_know_every_builtin_tool(tmp_path):
    from brainforge.rewards.tools import get_tool

    available = builtin_tools(root=tmp_path)
    listed = openai_tools(available)
    assert [t["function"]["name"] for t in listed] == ["calculator", "python", "read_file"]
    assert all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object" for t in listed)
    for name in agent_tools.BUILTIN_NAMES:
        registered = get_tool(name)
        assert registered is not None, name
    for tool in available.values():
        assert set(get_tool(tool.name).parameters) == set(tool.parameters["properties"])
