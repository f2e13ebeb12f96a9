"""Column-method arithmetic written out line by line, for programmatic worked solutions.

Each writer takes non-negative integers and returns the lines of the written method plus
the result. The lines are short and follow one template per operation ("ones: 7+9=16,
write 6, carry 1") because a 135M-parameter student imitates regular text far better than
varied prose, and its generation budget is ~100 tokens. Every number a line states is
computed, never copied from an answer key, so a line is right whenever the arithmetic of
Python integers is.

Conventions (one per operation, shared by every family that uses them):
* equations are written without spaces ("7+9=16"): the default tokenizer spends a token on
  every space before a digit, and the budget is tight.
* addition: columns right to left, missing digits written as 0; a column that overflows says
  "write 6, carry 1", the last column keeps its whole sum, so the digits read left to right
  are the result.
* subtraction (top >= bottom): "ones: 12-8=4, borrow 1" -- the 10 added to the top digit
  shows the borrow, the next column subtracts it ("tens: 10-5-1=4").
* multiplication: the multiplier is the shorter number; by one digit, digit by digit with
  carries; by several digits, one partial product per non-zero digit ("38*20=760" names it
  with its place value), then their column sum.
"""

from __future__ import annotations

PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions",
          "ten-millions", "hundred-millions", "billions", "ten-billions", "hundred-billions")


def place(index: int) -> str:
    """The name of column `index` (0 = ones); beyond the named ones, its power of ten."""
    return PLACES[index] if index < len(PLACES) else f"10^{index}"


def _digit(number: int, index: int) -> int:
    return number // 10**index % 10


def _carried(line: str, total: int, last: bool) -> tuple[str, int]:
    """A column's line and its carry: "write d, carry c" only when the column overflows; the
    last column keeps its whole total, so the digits read left to right are the result."""
    if last or total < 10:
        return line, 0
    return f"{line}, write {total % 10}, carry {total // 10}", total // 10


def column_add(addends: list[int]) -> tuple[list[str], int]:
    """Add non-negative integers column by column, right to left, with carries."""
    if len(addends) < 2 or min(addends) < 0:
        raise ValueError(f"column_add needs two or more non-negative addends, got {addends}")
    width = max(len(str(a)) for a in addends)
    lines: list[str] = []
    carry = 0
    for index in range(width):
        terms = [str(_digit(a, index)) for a in addends] + ([str(carry)] if carry else [])
        total = sum(_digit(a, index) for a in addends) + carry
        line, carry = _carried(f"{place(index)}: {'+'.join(terms)}={total}", total, index == width - 1)
        lines.append(line)
    return lines, sum(addends)


def column_subtract(top: int, bottom: int) -> tuple[list[str], int]:
    """Subtract `bottom` from `top` (top >= bottom >= 0) column by column, with borrows."""
    if not top >= bottom >= 0:
        raise ValueError(f"column_subtract needs top >= bottom >= 0, got {top} - {bottom}")
    lines: list[str] = []
    borrow = 0
    for index in range(len(str(top))):
        upper, lower = _digit(top, index), _digit(bottom, index)
        owed = f"-{borrow}" if borrow else ""
        if upper - borrow < lower:
            lines.append(f"{place(index)}: {upper + 10}-{lower}{owed}={upper + 10 - lower - borrow}, borrow 1")
            borrow = 1
        else:
            lines.append(f"{place(index)}: {upper}-{lower}{owed}={upper - lower - borrow}")
            borrow = 0
    return lines, top - bottom


def multiply_by_digit(number: int, digit: int) -> tuple[list[str], int]:
    """Multiply a non-negative integer by one digit, digit by digit with carries."""
    if number < 0 or not 0 <= digit <= 9:
        raise ValueError(f"multiply_by_digit needs a non-negative number and a digit, got {number} * {digit}")
    width = len(str(number))
    lines: list[str] = []
    carry = 0
    for index in range(width):
        product = _digit(number, index) * digit + carry
        step = f"{place(index)}: {_digit(number, index)}*{digit}" + (f"+{carry}" if carry else "") + f"={product}"
        line, carry = _carried(step, product, index == width - 1)
        lines.append(line)
    return lines, number * digit


def column_multiply(number: int, multiplier: int) -> tuple[list[str], int]:
    """Long multiplication of non-negative integers (call with the shorter one as multiplier).

    A one-digit multiplier is written digit by digit; a longer one as one block per non-zero
    multiplier digit -- the digit's product lines ("ones: 8*2=16, write 6, carry 1", ...),
    then the partial product with its place value ("38*20=760"; a digit 1 is that last line
    alone) -- and then "Add: 266+760" and the column sum of the partial products."""
    if number < 0 or multiplier < 0:
        raise ValueError(f"column_multiply needs non-negative numbers, got {number} * {multiplier}")
    if number == 0 or multiplier == 0:
        return [f"{number}*{multiplier}=0"], 0
    if multiplier < 10:
        return multiply_by_digit(number, multiplier)
    lines: list[str] = []
    partials: list[int] = []
    for index in range(len(str(multiplier))):
        digit = _digit(multiplier, index)
        if digit == 0:
            continue
        if digit == 1:
            product = number
        else:
            steps, product = multiply_by_digit(number, digit)
            lines.extend(steps)
        shift = 10**index
        lines.append(f"{number}*{digit * shift}={product * shift}")
        partials.append(product * shift)
    if len(partials) > 1:
        lines.append("Add: " + "+".join(str(p) for p in partials))
        lines.extend(column_add(partials)[0])
    return lines, number * multiplier
