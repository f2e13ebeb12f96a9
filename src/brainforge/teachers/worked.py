"""Programmatic teachers: correct worked solutions for built-in task families, offline.

LUFFY needs off-policy traces for the questions it trains on; for arithmetic-style
reasoning-gym tasks a program can write them, so a user sees guidance help the default
model with nothing downloaded. Each family parses the question text with anchored regexes
(linear time: every repeated part is separated by a fixed delimiter), computes every step
with Python integers, and writes it out in a short regular form (see `column`) ending in
"Answer: <number>" -- the `last_number` reward reads the last number of the reply.

A question a family cannot read gives None, never a guess. As a last guard, when the
prompt carries an `answer` column the solution must agree with it; a disagreement means the
parse misread the question, so the prompt is reported as unsolved (and logged).

Families and the reasoning-gym tasks they cover are listed in `FAMILIES`. Tasks checked and
left out: `power_function` (float answers to 3 significant figures in e-notation, which
`last_number` misreads), `prime_factorization` and `base_conversion` (solvable, but the
answer is a product "2 × 2 × 3" or a string with letter digits, not one number, so
`last_number` cannot score it), `count_bits` (solvable by repeated halving, but ~31 halvings
for the default range run past the generation budget; a candidate for a next family).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

from brainforge.data.prompts import PromptExample
from brainforge.data.traces import Trace
from brainforge.errors import ConfigError
from brainforge.rewards.correctness import last_number
from brainforge.teachers.column import column_add, column_multiply, column_subtract

log = logging.getLogger(__name__)

FAMILIES: dict[str, str] = {
    "arithmetic": "reasoning_gym basic_arithmetic with 2 terms and operators +, -, * (any digits, negative "
                  "operands, parentheses, any whitespace and format_style; not /): column method",
    "chain_sum": "reasoning_gym chain_sum (any number of terms, + and -, allow_negation too): column method, "
                 "one step per term, left to right",
    "products": "reasoning_gym products (any number of factors, allow_negation too): long multiplication, "
                "one step per factor",
    "gcd": "reasoning_gym gcd (two or more numbers): Euclid's algorithm",
    "lcm": "reasoning_gym lcm (two or more numbers): Euclid's algorithm for the GCD, then LCM = a / GCD * b",
}

MAX_DIGITS = 20
"""Longer operands are not a reasoning-gym question; their solution would not fit any budget."""

Steps = tuple[list[str], int]

_NUMBER = re.compile(r"-?\d+")
_INTEGER_ANSWER = re.compile(r"\s*(-?\d+)\s*")

# basic_arithmetic: "Calculate E." (format_style simple) or "What is E?" / "Solve E." /
# "Compute E." / "Evaluate: E." (natural); E is two terms inside any number of "( )" or
# "-( )" wrappers ("-( ( 8 + -5 ) )"), with the whitespace style single, no_space or random.
_ARITHMETIC = re.compile(r"(?:Calculate|Solve|Compute|Evaluate:) (?P<dot>[-+*/() \d]+)\.|What is (?P<ask>[-+*/() \d]+)\?")
_TWO_TERMS = re.compile(r" *(?P<open>(?:-?\( *)*)(?P<x>-?\d+) *(?P<op>[-+*]) *(?P<y>-?\d+)(?P<close>(?: *\))*) *")
_CHAIN_SUM = re.compile(r"State the final answer to the following arithmetic problem: (?P<e>[-+ \d]+) =")
_PRODUCTS = re.compile(r"Solve the following multiplication: (?P<e>[-* \d]+)\. Give only the result as your final answer\.")
_GCD = re.compile(r"Find the Greatest Common Divisor \(GCD\) of these numbers: (?P<n>[\d, ]+)\. Give only the GCD as your final answer\.")
_LCM = re.compile(r"Find the Least Common Multiple \(LCM\) of these numbers: (?P<n>[\d, ]+)")


def _number(text: str) -> int | None:
    """An integer token, or None when it is not one or too long to be a question's operand."""
    if not _NUMBER.fullmatch(text) or len(text.lstrip("-")) > MAX_DIGITS:
        return None
    return int(text)


def _operand(number: int) -> str:
    """A right-hand operand as written in a step: "12-(-5)", not "12--5"."""
    return f"({number})" if number < 0 else str(number)


def add_or_subtract(x: int, op: str, y: int) -> Steps:
    """x + y or x - y for signed integers: restate as one unsigned column operation
    (possibly negated), e.g. "347-958=-(958-347)", then write that operation out."""
    addend = y if op == "+" else -y
    if x >= 0 and addend >= 0:
        column_op, a, b, sign = "+", x, addend, 1
    elif x < 0 and addend < 0:
        column_op, a, b, sign = "+", -x, -addend, -1
    elif x >= 0:
        column_op, a, b, sign = ("-", x, -addend, 1) if x >= -addend else ("-", -addend, x, -1)
    else:
        column_op, a, b, sign = ("-", addend, -x, 1) if addend >= -x else ("-", -x, addend, -1)
    unsigned = f"{a}{column_op}{b}"
    restated = unsigned if sign > 0 else f"-({unsigned})"
    stated = f"{x}{op}{_operand(y)}"
    lines = [] if restated == stated else [f"{stated}={restated}"]
    steps, value = column_add([a, b]) if column_op == "+" else column_subtract(a, b)
    return lines + steps, sign * value


def multiply(x: int, y: int) -> Steps:
    """x * y for signed integers: restate with the sign outside and the shorter number as the
    multiplier ("-6*47=-(47*6)"), then long multiplication."""
    negative = (x < 0) != (y < 0) and x != 0 and y != 0
    a, b = abs(x), abs(y)
    if len(str(b)) > len(str(a)):
        a, b = b, a
    unsigned = f"{a}*{b}"
    restated = f"-({unsigned})" if negative else unsigned
    stated = f"{x}*{_operand(y)}"
    lines = [] if restated == stated else [f"{stated}={restated}"]
    steps, value = column_multiply(a, b)
    return lines + steps, -value if negative else value


def _binary(x: int, op: str, y: int) -> Steps:
    return multiply(x, y) if op == "*" else add_or_subtract(x, op, y)


def _chain(terms: list[int], ops: list[str]) -> Steps:
    """Left to right, one written step per operator; a single step needs no header."""
    if len(ops) == 1:
        return _binary(terms[0], ops[0], terms[1])
    lines: list[str] = []
    total = terms[0]
    for op, term in zip(ops, terms[1:]):
        steps, value = _binary(total, op, term)
        lines.append(f"{total}{op}{_operand(term)}:")
        lines.extend(steps)
        lines.append(f"{total}{op}{_operand(term)}={value}")
        total = value
    return lines, total


def _split_expression(expression: str, operators: str) -> tuple[list[int], list[str]] | None:
    """Terms and operators of "a op b op c" written with single spaces (chain_sum, products)."""
    parts = expression.split(" ")
    if len(parts) < 3 or len(parts) % 2 == 0:
        return None
    terms = [_number(part) for part in parts[0::2]]
    ops = parts[1::2]
    if any(t is None for t in terms) or any(op not in operators or len(op) != 1 for op in ops):
        return None
    return [t for t in terms if t is not None], ops


def _split_numbers(listing: str) -> list[int] | None:
    """The positive numbers of "a, b, c" (gcd, lcm)."""
    numbers = [_number(part) for part in listing.split(", ")]
    if len(numbers) < 2 or any(n is None or n <= 0 for n in numbers):
        return None
    return [n for n in numbers if n is not None]


def solve_arithmetic(question: str) -> Steps | None:
    match = _ARITHMETIC.fullmatch(question)
    if not match:
        return None
    expression = match.group("dot") if match.group("dot") is not None else match.group("ask")
    found = _TWO_TERMS.fullmatch(expression)
    if not found or found.group("open").count("(") != found.group("close").count(")"):
        return None
    x, y = _number(found.group("x")), _number(found.group("y"))
    if x is None or y is None:
        return None
    lines, value = _binary(x, found.group("op"), y)
    # Wrappers apply innermost first; "( )" changes nothing, each "-( )" negates.
    for wrapper in reversed(found.group("open").replace(" ", "").split("(")[:-1]):
        if wrapper == "-":
            lines.append(f"-({value})={-value}")
            value = -value
    return lines, value


def solve_chain_sum(question: str) -> Steps | None:
    match = _CHAIN_SUM.fullmatch(question)
    parsed = _split_expression(match.group("e"), "+-") if match else None
    return _chain(*parsed) if parsed else None


def solve_products(question: str) -> Steps | None:
    match = _PRODUCTS.fullmatch(question)
    parsed = _split_expression(match.group("e"), "*") if match else None
    return _chain(*parsed) if parsed else None


def euclid(a: int, b: int) -> Steps:
    """GCD of positive integers by Euclid's algorithm, one "a=q*b+r" line per division."""
    a, b = max(a, b), min(a, b)
    lines: list[str] = []
    while b:
        lines.append(f"{a}={a // b}*{b}+{a % b}")
        a, b = b, a % b
    return lines, a


def solve_gcd(question: str) -> Steps | None:
    match = _GCD.fullmatch(question)
    numbers = _split_numbers(match.group("n")) if match else None
    if not numbers:
        return None
    lines: list[str] = []
    result = numbers[0]
    for number in numbers[1:]:
        steps, divisor = euclid(result, number)
        lines.extend(steps)
        lines.append(f"GCD({result},{number})={divisor}")
        result = divisor
    return lines, result


def solve_lcm(question: str) -> Steps | None:
    match = _LCM.fullmatch(question)
    numbers = _split_numbers(match.group("n")) if match else None
    if not numbers:
        return None
    lines: list[str] = []
    result = numbers[0]
    for number in numbers[1:]:
        steps, divisor = euclid(result, number)
        lines.extend(steps)
        lines.append(f"GCD({result},{number})={divisor}")
        multiple = result // divisor * number
        lines.append(f"LCM({result},{number})={result}/{divisor}*{number}={result // divisor}*{number}={multiple}")
        result = multiple
    return lines, result


_SOLVERS: dict[str, Callable[[str], Steps | None]] = {
    "arithmetic": solve_arithmetic,
    "chain_sum": solve_chain_sum,
    "products": solve_products,
    "gcd": solve_gcd,
    "lcm": solve_lcm,
}


def _check_family(family: str) -> None:
    if family not in _SOLVERS:
        listing = "; ".join(f"{name}: {description}" for name, description in FAMILIES.items())
        raise ConfigError(f"unknown worked-solution family {family!r}; choose one of: {listing}")


def _agrees(result: int, answer: object) -> bool:
    """Whether the reference answer (an integer, or anything whose last number is one) is `result`."""
    text = str(answer)
    integer = _INTEGER_ANSWER.fullmatch(text)
    if integer:
        return int(integer.group(1)) == result
    number = last_number(text)
    return number is not None and math.isclose(number, result, rel_tol=0, abs_tol=1e-9)


def worked_solution(prompt: PromptExample, family: str) -> str | None:
    """A step-by-step solution ending in "Answer: <number>", or None when `family` cannot
    read this question (or its result disagrees with the prompt's `answer` column)."""
    _check_family(family)
    # The question is the first line; prompts.py appends an optional instruction after "\n".
    question = prompt.text.split("\n", 1)[0].strip()
    solved = _SOLVERS[family](question)
    if solved is None:
        return None
    lines, result = solved
    answer = prompt.columns.get("answer")
    if answer is not None and not _agrees(result, answer):
        log.warning("worked:%s computed %s for %r but its answer column says %r; skipping it", family, result, question, answer)
        return None
    return "\n".join([*lines, f"Answer: {result}"])


def worked_traces(prompts: list[PromptExample], family: str) -> tuple[list[Trace], int]:
    """A trace per prompt the family can solve, and how many it could not."""
    _check_family(family)
    traces: list[Trace] = []
    unsolved = 0
    for prompt in prompts:
        response = worked_solution(prompt, family)
        if response is None:
            unsolved += 1
            continue
        traces.append(Trace(response=response, prompt=prompt.text, reward=None, source=f"worked:{family}"))
    if unsolved:
        log.info("worked:%s solved %d of %d prompts; the rest are not in a format it reads", family, len(traces), len(prompts))
    return traces, unsolved
