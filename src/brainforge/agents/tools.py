"""The built-in tool environment: real tools an agent can call offline (the seed's `tools.py`
registry, made runnable).

A tool's input is whatever a policy under training wrote, so every tool treats its arguments
as hostile: the calculator evaluates a parsed arithmetic tree with bounded sizes (never
`eval`), Python runs in the kernel-isolated sandbox of `rewards.sandbox`, `read_file` only
reads regular text files under its root. Bad model output becomes an error *text* the model
can read and correct (`run_tool_call` never raises on it); a broken environment (no sandbox,
no memory store) is a `BrainforgeError`, raised when the tool is asked for.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import operator
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from brainforge.errors import BrainforgeError, MissingDependencyError, StoreError

log = logging.getLogger(__name__)

MAX_EXPRESSION_CHARS = 300
MAX_RESULT_BITS = 4096          # about 1,230 decimal digits: far past any task, far below a slow int
MAX_EXPONENT = 10_000
MAX_FILE_BYTES = 64_000
MAX_OUTPUT_CHARS = 2_000
PYTHON_TIMEOUT_S = 10.0
MAX_CODE_CHARS = 20_000
BUILTIN_NAMES = ("calculator", "python", "read_file", "memory_search")


@dataclass(frozen=True)
class AgentTool:
    """A tool an agent can call: its OpenAI function schema and the function that runs it.
    `run` receives the checked arguments and returns the text the model reads next."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any]], str]


# -- calculator -------------------------------------------------------------------------------
class CalculatorError(ValueError):
    """An expression the calculator refuses; the message is shown to the model."""


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}


def calculate(expression: str) -> int | float:
    """Evaluate arithmetic (+ - * / // % **, parentheses, unary minus) on int and float
    literals. Nothing else parses: no names, calls, attributes, strings or comprehensions, so
    `__import__('os')` is a refusal, not an import. Sizes are checked *before* each operation
    (9**9**9 would otherwise hold a core for hours), so a refusal is always quick."""
    if not isinstance(expression, str):
        raise CalculatorError("the expression must be a string such as \"12 * (3 + 4)\"")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is {len(expression)} characters long; at most {MAX_EXPRESSION_CHARS} are allowed")
    text = expression.replace("×", "*").replace("÷", "/").replace("−", "-").strip()
    if not text:
        raise CalculatorError("the expression is empty")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise CalculatorError(f"not an arithmetic expression ({type(exc).__name__})") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.BitXor):
            raise CalculatorError("^ is not a power here; write ** (2 ** 10)")
        function = _BINARY.get(type(node.op))
        if function is None:
            raise CalculatorError(f"operator {type(node.op).__name__} is not allowed; use + - * / // % **")
        left, right = _evaluate(node.left), _evaluate(node.right)
        _check_operation(node.op, left, right)
        try:
            return _check(function(left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("the result is too large") from None
    what = type(node.value).__name__ if isinstance(node, ast.Constant) else type(node).__name__
    raise CalculatorError(f"only numbers and + - * / // % ** with parentheses are allowed, not {what}")


def _bits(value: int | float) -> int:
    if isinstance(value, int):
        return abs(value).bit_length()
    return 0 if not math.isfinite(value) or value == 0 else max(0, math.frexp(value)[1])


def _check_operation(op: ast.operator, left: int | float, right: int | float) -> None:
    """Refuse an operation whose result would be too large, before computing it."""
    if isinstance(op, ast.Pow):
        if isinstance(right, int) and isinstance(left, int):
            if right < 0:
                return  # a float result, bounded by float range
            # (bits - 1) * exponent never exceeds the result's real size: refusing on it is exact enough
            if right > MAX_EXPONENT or (abs(left) > 1 and (_bits(left) - 1) * right > MAX_RESULT_BITS):
                raise CalculatorError(f"the result would be larger than {MAX_RESULT_BITS} bits")
        elif abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponents are limited to {MAX_EXPONENT}")
    elif isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
        if _bits(left) + _bits(right) > MAX_RESULT_BITS + 1:
            raise CalculatorError(f"the result would be larger than {MAX_RESULT_BITS} bits")


def _check(value: Any) -> int | float:
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_RESULT_BITS:
        raise CalculatorError(f"the result is larger than {MAX_RESULT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number")
    return value


def format_number(value: int | float) -> str:
    """Integers in full, whole floats without `.0` (6 / 3 = 2), other floats as Python prints them."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value) if isinstance(value, int) else repr(value)


def _run_calculator(arguments: dict[str, Any]) -> str:
    try:
        return format_number(calculate(arguments["expression"]))
    except CalculatorError as exc:
        return f"error: {exc}"


# -- python -------------------------------------------------------------------------------------
def _python_runner(timeout_s: float) -> Callable[[dict[str, Any]], str]:
    def run(arguments: dict[str, Any]) -> str:
        from brainforge.rewards.sandbox import SandboxLimits, run_python

        code = arguments["code"]
        if len(code) > MAX_CODE_CHARS:
            return f"error: the program is {len(code)} characters long; at most {MAX_CODE_CHARS} are allowed"
        limits = SandboxLimits(wall_seconds=timeout_s, cpu_seconds=max(1, math.ceil(timeout_s)), memory_mb=512,
                               max_processes=8, max_output_bytes=MAX_OUTPUT_CHARS * 4)
        result = run_python(code, limits)  # SandboxUnavailable is a BrainforgeError: it propagates
        parts = []
        if result.stdout:
            parts.append(result.stdout)
        if result.stderr:
            parts.append(f"stderr:\n{result.stderr}")
        if result.timed_out:
            parts.append(f"error: timed out after {timeout_s:g} s")
        elif result.returncode:
            parts.append(f"exit status {result.returncode}")
        text = "\n".join(part.rstrip("\n") for part in parts) or "(no output; print the result)"
        return _truncate(text)
    return run


def _truncate(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n[... {len(text) - limit} more characters]"


# -- read_file ----------------------------------------------------------------------------------
def read_file_under(root: Path, path: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The text of `path` (relative to `root`, or absolute inside it), or an error text.
    The check is on the fully resolved path, so `..`, absolute paths and symlinks all meet
    the same rule: the real file must lie under the real root. Only regular files are read
    (a FIFO or device would block or never end), up to `max_bytes`, and only text."""
    if not isinstance(path, str) or not path.strip():
        return "error: give a file path relative to the root, such as \"configs/service_1.ini\""
    if "\x00" in path:
        return "error: the path contains a NUL character"
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, path.strip()))
    if os.path.commonpath([real_root, real]) != real_root:
        return f"error: {path} is outside the folder this tool may read"
    shown = os.path.relpath(real, real_root)
    try:
        info = os.stat(real)
    except OSError:
        return f"error: no such file: {shown}"
    if stat.S_ISDIR(info.st_mode):
        names = sorted(os.listdir(real))[:50]
        return f"error: {shown} is a directory, not a file; it holds: {', '.join(names) or '(nothing)'}"
    if not stat.S_ISREG(info.st_mode):
        return f"error: {shown} is not a regular file"
    if info.st_size > max_bytes:
        return f"error: {shown} is {info.st_size} bytes; this tool reads files up to {max_bytes} bytes"
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return f"error: cannot open {shown} ({exc.strerror})"
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # swapped after the check
            return f"error: {shown} is not a regular file"
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        return f"error: {shown} is over {max_bytes} bytes; this tool reads files up to {max_bytes} bytes"
    if b"\x00" in data:
        return f"error: {shown} is a binary file"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return f"error: {shown} is a binary file (not UTF-8 text)"


# -- memory_search ------------------------------------------------------------------------------
def _memory_runner(store: str) -> Callable[[dict[str, Any]], str]:
    """Checks the store and the memory extra now (a config problem should stop a run before
    any rollout), opens the retriever on the first search (it loads an embedder)."""
    import importlib.util

    for package, module in (("chromadb", "chromadb"), ("bm25s", "bm25s")):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(package, "memory", "The memory_search tool")
    from brainforge.config import MemoryConfig
    from brainforge.memory.store import MemoryStore

    memory = MemoryConfig(store=str(store))
    if not MemoryStore(memory).exists():
        raise StoreError(f"memory_search: there is no memory store at {store}; build one with: brainforge ingest DOCS... --store {store}")
    retriever: list[Any] = []

    def run(arguments: dict[str, Any]) -> str:
        from brainforge.memory.retrieval import HybridRetriever

        query = arguments["query"]
        top_k = arguments.get("top_k", 3)
        if not query.strip():
            return "error: the query is empty"
        if not 1 <= top_k <= 10:
            return "error: top_k must be between 1 and 10"
        if not retriever:
            opened = MemoryStore(memory)
            opened.require_existing()
            retriever.append(HybridRetriever(opened, memory.retrieval))
        result = retriever[0].search(query[:1000], top_k)
        if not result.hits:
            return "no results"
        lines = [f"[{i}] ({Path(hit.chunk.path).name}) {' '.join(hit.chunk.text.split())}" for i, hit in enumerate(result.hits, 1)]
        return _truncate("\n".join(lines))
    return run


# -- the registry -------------------------------------------------------------------------------
def _string(description: str) -> dict[str, str]:
    return {"type": "string", "description": description}


def builtin_tools(root: Path | str | None = None, store: str | None = None,
                  python_timeout_s: float = PYTHON_TIMEOUT_S) -> dict[str, AgentTool]:
    """The built-in tools: calculator and python always, read_file when a `root` folder is
    given, memory_search when a memory `store` path is given (checked now)."""
    tools = [
        AgentTool("calculator", "Evaluate an arithmetic expression exactly (+ - * / // % ** and parentheses).",
                  {"type": "object", "properties": {"expression": _string("for example \"4821 * 377\"")},
                   "required": ["expression"]}, _run_calculator),
        AgentTool("python", "Run a short Python program and return what it prints (no network, no files outside /tmp).",
                  {"type": "object", "properties": {"code": _string("the program; print() the result")}, "required": ["code"]},
                  _python_runner(python_timeout_s)),
    ]
    if root is not None:
        folder = Path(root)
        if not folder.is_dir():
            raise BrainforgeError(f"read_file: the root {folder} is not a folder; give the folder the tool may read")
        tools.append(AgentTool("read_file", "Read a text file, by its path relative to the working folder.",
                               {"type": "object", "properties": {"path": _string("for example \"configs/service_1.ini\"")},
                                "required": ["path"]}, lambda arguments: read_file_under(folder, arguments["path"])))
    if store is not None:
        tools.append(AgentTool("memory_search", "Search the document store; returns the best matching passages.",
                               {"type": "object", "properties": {"query": _string("what to look for"),
                                                                 "top_k": {"type": "integer", "description": "passages to return (1-10)"}},
                                "required": ["query"]}, _memory_runner(store)))
    return {tool.name: tool for tool in tools}


def select_tools(names: Iterable[str], root: Path | str | None = None, store: str | None = None) -> dict[str, AgentTool]:
    """The built-in tools a task allows, by name; a name that cannot be provided is an error
    that says what is missing (a task file asking for read_file without a root, ...)."""
    wanted = list(names)
    unknown = [name for name in wanted if name not in BUILTIN_NAMES]
    if unknown:
        raise BrainforgeError(f"unknown built-in tool(s) {unknown}; the built-in tools are {list(BUILTIN_NAMES)}")
    if "read_file" in wanted and root is None:
        raise BrainforgeError("the tool read_file needs a root folder (the task's `root` column)")
    if "memory_search" in wanted and store is None:
        raise BrainforgeError("the tool memory_search needs a memory store (a path built with `brainforge ingest`)")
    available = builtin_tools(root if "read_file" in wanted else None, store if "memory_search" in wanted else None)
    return {name: available[name] for name in wanted}


def openai_tools(tools: Mapping[str, AgentTool] | Iterable[AgentTool]) -> list[dict[str, Any]]:
    """The `tools=` list of a chat.completions request."""
    items = tools.values() if isinstance(tools, Mapping) else tools
    return [{"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in items]


# -- running a call -----------------------------------------------------------------------------
_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                            "boolean": (bool,), "object": (dict,), "array": (list,)}


def parse_tool_call(tool_call: Any) -> tuple[str, dict[str, Any]]:
    """(name, arguments) of a call in the OpenAI layout (`{"function": {"name", "arguments"}}`,
    arguments a JSON string or a dict), the bare `{"name", "arguments"}` form, or an OpenAI SDK
    object. Raises ValueError with a message for the model when it is malformed."""
    if hasattr(tool_call, "model_dump"):
        tool_call = tool_call.model_dump()
    if not isinstance(tool_call, dict):
        raise ValueError("a tool call must be an object with a name and arguments")
    body = tool_call.get("function", tool_call)
    if not isinstance(body, dict):
        raise ValueError("\"function\" must be an object with a name and arguments")
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("the tool call has no tool name")
    arguments = body.get("arguments", {})
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"the arguments of {name} are not valid JSON; give a JSON object such as {{\"key\": \"value\"}}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments of {name} must be a JSON object, not {type(arguments).__name__}")
    return name, arguments


def check_arguments(tool: AgentTool, arguments: dict[str, Any]) -> str | None:
    """None when the arguments fit the tool's schema, else what is wrong (for the model)."""
    properties = tool.parameters.get("properties", {})
    expected = ", ".join(properties) or "none"
    extra = [key for key in arguments if key not in properties]
    if extra:
        return f"{tool.name} has no argument {', '.join(map(repr, extra))}; its arguments are: {expected}"
    missing = [key for key in tool.parameters.get("required", []) if key not in arguments]
    if missing:
        return f"{tool.name} needs the argument {', '.join(map(repr, missing))}; its arguments are: {expected}"
    for key, value in arguments.items():
        kind = properties[key].get("type")
        types = _JSON_TYPES.get(kind, (object,))
        if not isinstance(value, types) or (isinstance(value, bool) and kind != "boolean"):
            return f"the argument {key!r} of {tool.name} must be a {kind}"
    return None


def run_tool_call(tools: Mapping[str, AgentTool], tool_call: Any) -> str:
    """Run one call the model made and return the text it reads next. Bad model output
    (unknown tool, JSON that does not parse, wrong argument names or types, a tool that fails
    on its input) comes back as `error: ...` text; only a broken environment
    (`BrainforgeError`, e.g. no sandbox on this machine) raises."""
    try:
        name, arguments = parse_tool_call(tool_call)
    except ValueError as exc:
        return f"error: {exc}"
    tool = tools.get(name)
    if tool is None:
        return f"error: there is no tool named {name!r}; the tools are: {', '.join(tools) or 'none'}"
    problem = check_arguments(tool, arguments)
    if problem:
        return f"error: {problem}"
    try:
        return tool.run(arguments)
    except BrainforgeError:
        raise
    except Exception as exc:  # a tool failing on the model's input is an observation, not a crash
        log.debug("tool %s failed on %r", name, arguments, exc_info=True)
        return f"error: {name} failed ({type(exc).__name__}: {exc})"
