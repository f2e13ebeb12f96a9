"""Programmatic teachers (brainforge.teachers.worked): every generated question of a family
gets a solution the `last_number` reward scores 1.0, every equation a solution states is
true, and a question outside the family's format gets None, never a guess."""

from __future__ import annotations

import ast
import math
import re
import time
from fractions import Fraction

import pytest

from brainforge.data.prompts import PromptExample, reasoning_gym_prompts
from brainforge.errors import ConfigError
from brainforge.rewards.correctness import last_number_match
from brainforge.teachers import worked
from brainforge.teachers.worked import FAMILIES, worked_solution, worked_traces

ARITHMETIC = {"min_terms": 2, "max_terms": 2, "operators": ["+", "-", "*"]}

# (family, reasoning-gym task, options): 500 questions each, across digits, operators,
# signs, parentheses, whitespace and question styles.
CASES = [
    *[("arithmetic", "basic_arithmetic", {**ARITHMETIC, "min_digits": d, "max_digits": d}) for d in (1, 2, 3, 4)],
    ("arithmetic", "basic_arithmetic", {**ARITHMETIC, "min_digits": 1, "max_digits": 4, "allow_parentheses": False,
                                        "allow_negation": False, "instruction": "Answer with the number only."}),
    ("arithmetic", "basic_arithmetic", {**ARITHMETIC, "min_digits": 1, "max_digits": 4, "format_style": "natural", "whitespace": "random"}),
    ("arithmetic", "basic_arithmetic", {**ARITHMETIC, "min_digits": 1, "max_digits": 4, "whitespace": "no_space"}),
    ("chain_sum", "chain_sum", {"min_terms": 2, "max_terms": 6, "min_digits": 1, "max_digits": 4}),
    ("chain_sum", "chain_sum", {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 4, "allow_negation": True}),
    ("products", "products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 4}),
    ("products", "products", {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 3, "allow_negation": True}),
    ("gcd", "gcd", {}),
    ("gcd", "gcd", {"min_numbers": 2, "max_numbers": 5, "max_value": 10000}),
    ("lcm", "lcm", {}),
    ("lcm", "lcm", {"min_numbers": 2, "max_numbers": 4, "max_value": 1000}),
]


def _generated(task: str, options: dict, seed: int) -> list[PromptExample]:
    """500 questions exactly as `reasoning_gym_prompts` builds them: its test split is
    `create_dataset(task, size=eval_size, seed=seed, **options)`."""
    return reasoning_gym_prompts(task, {**options, "eval_size": 500, "seed": seed}, "test")


def _value(node: ast.AST) -> Fraction:
    """Exact value of an integer expression with + - * / and unary minus; anything else is
    not one of the solution's equations."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand)
    if isinstance(node, ast.BinOp):
        left, right = _value(node.left), _value(node.right)
        operations = {ast.Add: lambda: left + right, ast.Sub: lambda: left - right, ast.Mult: lambda: left * right, ast.Div: lambda: left / right}
        if type(node.op) in operations:
            return operations[type(node.op)]()
    raise ValueError(f"not an arithmetic expression: {ast.dump(node)}")


CALL = re.compile(r"(GCD|LCM)\((\d+),(\d+)\)=(.*)")


def check_equations(solution: str) -> int:
    """Assert every equation stated in the solution is true; return how many there were.

    A segment is a line cut at ", " and ": "; one made of digits, operators, parentheses and
    "=" is a chain of equal expressions; "GCD(a,b)=..." and "LCM(a,b)=..." are checked with math."""
    checked = 0
    for line in solution.splitlines():
        for segment in re.split(r", |: ", line):
            call = CALL.fullmatch(segment)
            if call:
                a, b = int(call.group(2)), int(call.group(3))
                expected = math.gcd(a, b) if call.group(1) == "GCD" else math.lcm(a, b)
                assert _value(ast.parse(call.group(4).split("=")[-1], mode="eval").body) == expected, f"{segment!r} in\n{solution}"
                segment = f"{expected}={call.group(4)}"
            if "=" not in segment or not re.fullmatch(r"[-+*/()\d=]+", segment):
                continue
            values = {_value(ast.parse(side, mode="eval").body) for side in segment.split("=")}
            assert len(values) == 1, f"false equation {segment!r} in\n{solution}"
            checked += 1
    return checked


def test_every_family_has_a_solver():
    assert set(worked._SOLVERS) == set(FAMILIES)


@pytest.mark.parametrize(("family", "task", "options"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_family_solves_every_generated_question(family, task, options):
    prompts = _generated(task, options, seed=100 + CASES.index((family, task, options)))
    assert len(prompts) == 500
    solutions = [worked_solution(prompt, family) for prompt in prompts]
    unsolved = [p.text for p, s in zip(prompts, solutions) if s is None]
    assert not unsolved, f"{len(unsolved)} unsolved, e.g. {unsolved[:3]}"
    rewards = last_number_match([p.text for p in prompts], solutions, answer=[p.columns["answer"] for p in prompts])
    wrong = [(p.text, s) for p, s, r in zip(prompts, solutions, rewards) if r != 1.0]
    assert not wrong, f"{len(wrong)} scored below 1.0, e.g. {wrong[:2]}"
    for prompt, solution in zip(prompts, solutions):
        assert solution.splitlines()[-1] == f"Answer: {int(prompt.columns['answer'])}"
        assert check_equations(solution) >= 1
        # The answer column only guards against a misread; the solution is computed without it.
        assert worked_solution(PromptExample(prompt.messages, {}), family) == solution


def test_worked_examples_are_the_column_method():
    def solve(question: str) -> str | None:
        return worked_solution(PromptExample([{"role": "user", "content": question}]), "arithmetic")

    assert solve("Calculate 347 + 589.") == (
        "ones: 7+9=16, write 6, carry 1\ntens: 4+8+1=13, write 3, carry 1\nhundreds: 3+5+1=9\nAnswer: 936")
    assert solve("Calculate 602 - 358.") == "ones: 12-8=4, borrow 1\ntens: 10-5-1=4, borrow 1\nhundreds: 6-3-1=2\nAnswer: 244"
    assert solve("Calculate 47 * 6.") == "ones: 7*6=42, write 2, carry 4\ntens: 4*6+4=28\nAnswer: 282"
    assert solve("Calculate 38 * 27.") == (
        "ones: 8*7=56, write 6, carry 5\ntens: 3*7+5=26\n38*7=266\n"
        "ones: 8*2=16, write 6, carry 1\ntens: 3*2+1=7\n38*20=760\n"
        "Add: 266+760\nones: 6+0=6\ntens: 6+6=12, write 2, carry 1\nhundreds: 2+7+1=10\nAnswer: 1026")
    # Negative results and operands are restated as one unsigned column operation.
    assert solve("Calculate 347 - 958.") == "347-958=-(958-347)\nones: 8-7=1\ntens: 5-4=1\nhundreds: 9-3=6\nAnswer: -611"
    assert solve("Calculate -6 * 47.").splitlines()[0] == "-6*47=-(47*6)"
    assert solve("What is -( 3 + 4 )?").splitlines()[-2:] == ["-(7)=-7", "Answer: -7"]


@pytest.mark.parametrize(("family", "question"), [
    ("arithmetic", "Calculate 3 + 4 + 5."),               # three terms
    ("arithmetic", "Calculate 12 / 4."),                  # division is not covered
    ("arithmetic", "Calculate ( 3 + 4 ) * 5."),
    ("arithmetic", "Calculate ( 3 + 4."),                 # unbalanced parenthesis
    ("arithmetic", "Calculate 3.5 + 4."),                 # decimals
    ("arithmetic", "Calculate 3 + 4"),                    # no closing period
    ("arithmetic", "What is the capital of France?"),
    ("arithmetic", "Please calculate 3 + 4."),            # anchored at the start
    ("arithmetic", "Calculate " + "9" * 21 + " + 1."),    # longer than any question's operand
    ("chain_sum", "State the final answer to the following arithmetic problem: 3 * 4 ="),
    ("chain_sum", "State the final answer to the following arithmetic problem: 3  + 4 ="),
    ("products", "Solve the following multiplication: 3 + 4. Give only the result as your final answer."),
    ("gcd", "Find the Greatest Common Divisor (GCD) of these numbers: 12. Give only the GCD as your final answer."),
    ("gcd", "Find the Greatest Common Divisor (GCD) of these numbers: 12, 0. Give only the GCD as your final answer."),
    ("gcd", "Calculate 3 + 4."),                          # another family's question
    ("lcm", "Find the Least Common Multiple (LCM) of these numbers: 12, 18, "),
])
def test_question_in_an_unknown_format_gets_none(family, question):
    assert worked_solution(PromptExample([{"role": "user", "content": question}], {"answer": "7"}), family) is None
    assert worked_solution(PromptExample([{"role": "user", "content": question}]), family) is None


def test_solution_that_disagrees_with_the_answer_column_is_dropped(caplog):
    """The answer column is the last guard against a misread question: a disagreement means
    no solution (and a warning), not a trace that teaches a wrong answer."""
    prompt = PromptExample([{"role": "user", "content": "Calculate 347 + 589."}], {"answer": "937"})
    assert worked_solution(prompt, "arithmetic") is None
    assert "937" in caplog.text
    assert worked_solution(PromptExample(prompt.messages, {"answer": "936"}), "arithmetic") is not None
    assert worked_solution(PromptExample(prompt.messages, {"answer": "The sum is 936."}), "arithmetic") is not None


def test_parsing_hostile_text_is_fast():
    """Anchored patterns whose repeats are separated by fixed delimiters: long near-misses
    are rejected in linear time, not by catastrophic backtracking."""
    hostile = [
        "Calculate " + "1 " * 20000 + "+",
        "What is " + "(" * 20000 + "1 + 1",
        "State the final answer to the following arithmetic problem: " + "1 + " * 20000 + "=x",
        "Solve the following multiplication: " + "2 * " * 20000 + ". Give only",
        "Find the Greatest Common Divisor (GCD) of these numbers: " + "1, " * 20000 + ".",
        "Find the Least Common Multiple (LCM) of these numbers: " + "1, " * 20000 + "x",
    ]
    start = time.monotonic()
    for text in hostile:
        for family in FAMILIES:
            assert worked_solution(PromptExample([{"role": "user", "content": text}]), family) is None
    assert time.monotonic() - start < 10  # linear: milliseconds; exponential: never


def test_worked_traces_and_unknown_family():
    prompts = [
        PromptExample([{"role": "user", "content": "Calculate 47 * 6.\nShow your work."}], {"answer": "282", "task": "basic_arithmetic"}),
        PromptExample([{"role": "user", "content": "Calculate 12 / 4."}], {"answer": "3", "task": "basic_arithmetic"}),
        PromptExample([{"role": "user", "content": "Calculate 2 + 2."}], {"answer": "4", "task": "basic_arithmetic"}),
    ]
    traces, unsolved = worked_traces(prompts, "arithmetic")
    assert unsolved == 1
    assert [t.prompt for t in traces] == ["Calculate 47 * 6.\nShow your work.", "Calculate 2 + 2."]
    assert all(t.source == "worked:arithmetic" and t.reward is None for t in traces)
    assert traces[0].response.endswith("Answer: 282")
    with pytest.raises(ConfigError) as raised:
        worked_traces(prompts, "calculus")
    message = str(raised.value)
    assert "'calculus'" in message and all(name in message for name in FAMILIES)
    with pytest.raises(ConfigError):
        worked_solution(prompts[0], "calculus")


def test_arithmetic_solutions_fit_the_generation_budget(tokenizer):
    """The student imitates these under a ~96-128 token budget: the column method for the
    tasks the LUFFY benchmark trains on must fit with room to spare."""
    import random

    rng = random.Random(0)

    def longest(digits_x: int, op: str, digits_y: int) -> int:
        lengths = []
        for _ in range(100):
            x, y = rng.randint(10 ** (digits_x - 1), 10**digits_x - 1), rng.randint(10 ** (digits_y - 1), 10**digits_y - 1)
            text = worked_solution(PromptExample([{"role": "user", "content": f"Calculate {x} {op} {y}."}]), "arithmetic")
            lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        return max(lengths)

    assert longest(3, "+", 3) <= 80
    assert longest(3, "-", 3) <= 80
    assert longest(2, "*", 1) <= 48
