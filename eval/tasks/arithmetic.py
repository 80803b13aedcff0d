"""Integer arithmetic in four difficulty levels.

    level 1   one-digit + and -        What is 7 - 3?        <think>7-3=4</think>\\n<answer>4</answer>
    level 2   two-digit + and -        What is 52 + 39?      <think>2+9=11,5+3+1=9,91</think>\\n<answer>91</answer>
    level 3   two-digit * one-digit    What is 23 * 7?       <think>3*7=21,2*7+2=16,161</think>\\n<answer>161</answer>
    level 4   three or four one-digit operands with + - * and parentheses
                                       What is 2 - (7 - 9)?  <think>7-9=-2,2-(-2)=4</think>\\n<answer>4</answer>
    level 0   (the default) each problem draws its level uniformly from 1-4

Subtraction in levels 1 and 2 never goes below zero (the larger operand comes first); level 4 can be negative.
At levels 2 and 3 the think part works in columns, as on paper: the ones digits first, then the tens with the carry
(or the borrow), then the answer read off the results (column_steps). At levels 1 and 4 it writes each operation
with its operands and its value, in the order the expression is reduced (innermost parentheses first, then left to
right; operation_steps), a negative operand in parentheses. All are written without spaces to stay short: with the
shipped tokenizer (one token per digit and per tag) a response is ~21 tokens on average (11 at level 1, 23 to 26 at
levels 2-4) and under 40.
Level 4 wrote its expression again after each reduction until embedded data v5 ("2-(7-9)=2-(-2)=4"): the small
model then had to find the operation inside the rewritten text, and miscopied even one-digit facts ("6*(3*3)=6*2").
Written as operations, with the operands side by side, held-out level 4 rose from 0.03 to 0.15 in the same
from-scratch experiment as the columns below (README "Results").
The columns are what makes levels 2 and 3 learnable for a small model: writing "52+39=91" at once asks it to know
the ones column's carry before it writes the tens digit. Trained from scratch on the same 60,000 arithmetic chats
for 600 steps (the mini model, 2.5M tokens), held-out accuracy was 0.058 at level 2 and 0.053 at level 3 with the
answer at once, 0.432 and 0.138 with the columns (README "Results").
Level 1 has only 155 distinct problems, of which 12 fall in the held-out partition (eval/tasks/base.py), and level 3
has 1440, of which 152 are held out: an evaluation (distinct problems) of those levels uses all of them, once each.
The answer is an integer, compared as an integer ("042" and "+42" equal 42; "42.0" and "42 apples" score 0).
"""

import random
import re

from minitrain.eval.tasks.base import Problem, Task, format_response, parse_integer

PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}

# An expression is an int (a leaf) or a tuple (op, left, right). "/" is exact division: only the countdown task uses
# it, and only where the division leaves no remainder.


def evaluate(expr) -> int:
    if isinstance(expr, int):
        return expr
    op, left, right = expr
    a, b = evaluate(left), evaluate(right)
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"inexact division {a}/{b}")
        return a // b
    return a + b if op == "+" else a - b if op == "-" else a * b


def render(expr, spaced: bool, top: bool = True) -> str:
    """Text of an expression; parentheses where precedence needs them and around a right operand of equal
    precedence, so the text reads in the order the think steps reduce it."""
    if isinstance(expr, int):
        return str(expr) if expr >= 0 or top else f"({expr})"
    op, left, right = expr
    left_text, right_text = render(left, spaced, False), render(right, spaced, False)
    if not isinstance(left, int) and PRECEDENCE[left[0]] < PRECEDENCE[op]:
        left_text = f"({left_text})"
    if not isinstance(right, int) and PRECEDENCE[right[0]] <= PRECEDENCE[op]:
        right_text = f"({right_text})"
    return f"{left_text} {op} {right_text}" if spaced else f"{left_text}{op}{right_text}"


def reduce_once(expr):
    """Replace the first operation (depth-first, left to right) whose operands are both numbers by its value."""
    op, left, right = expr
    if isinstance(left, int) and isinstance(right, int):
        return evaluate(expr)
    if not isinstance(left, int):
        return (op, reduce_once(left), right)
    return (op, left, reduce_once(right))


def reduction_steps(expr) -> list[str]:
    """Compact texts of the expression after each reduction: ["(3+4)*5", "7*5", "35"]."""
    steps = [render(expr, spaced=False)]
    while not isinstance(expr, int):
        expr = reduce_once(expr)
        steps.append(render(expr, spaced=False))
    return steps


def operations(expr) -> list[list]:
    """The expression's operations in the order reduce_once performs them, each [a, op, b, value] with a and b the
    values its operands have by then: (3 + 4) * 5 -> [[3, "+", 4, 7], [7, "*", 5, 35]]. Lists, as Problem.meta is
    JSON."""
    if isinstance(expr, int):
        return []
    op, left, right = expr
    a, b = evaluate(left), evaluate(right)
    return operations(left) + operations(right) + [[a, op, b, evaluate((op, a, b))]]


def operation_steps(ops: list[list]) -> str:
    """The think part of levels 1 and 4: "7-9=-2,2-(-2)=4", one operation after another, negative operands in
    parentheses."""
    def operand(x: int) -> str:
        return str(x) if x >= 0 else f"({x})"
    return ",".join(f"{operand(a)}{op}{operand(b)}={value}" for a, op, b, value in ops)


def column_steps(a: int, op: str, b: int) -> str:
    """Paper arithmetic, one column at a time, for two-digit a + b, a - b (a >= b) and a * b (one of them one-digit):

        52+39   "2+9=11,5+3+1=9,91"      ones (carry 1), tens plus the carry, then the answer
        52-39   "12-9=3,5-1-3=1,13"      the ones borrow ten, so the tens lose 1
        23*7    "3*7=21,2*7+2=16,161"    ones times 7 (carry 2), tens times 7 plus the carry
    """
    if op == "*":
        a, b = (a, b) if a >= 10 else (b, a)          # a is the two-digit factor
        ones = (a % 10) * b
        carry = ones // 10
        tens = (a // 10) * b + carry
        return f"{a % 10}*{b}={ones}," + f"{a // 10}*{b}" + (f"+{carry}" if carry else "") + f"={tens},{a * b}"
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        carry = (a0 + b0) // 10
        return f"{a0}+{b0}={a0 + b0}," + f"{a1}+{b1}" + ("+1" if carry else "") + f"={a1 + b1 + carry},{a + b}"
    borrow = int(a0 < b0)
    ones = f"1{a0}-{b0}={10 + a0 - b0}" if borrow else f"{a0}-{b0}={a0 - b0}"
    return ones + "," + f"{a1}" + ("-1" if borrow else "") + f"-{b1}={a1 - borrow - b1},{a - b}"


def random_tree(rng: random.Random, leaves: int):
    if leaves == 1:
        return rng.randint(1, 9)
    left = rng.randint(1, leaves - 1)
    return (rng.choice("+-*"), random_tree(rng, left), random_tree(rng, leaves - left))


class ArithmeticTask(Task):
    family = "arithmetic"
    OPTIONS = {"level": 0}      # 0 = mixed (each problem draws 1-4), else 1, 2, 3 or 4

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["level"] not in (0, 1, 2, 3, 4):
            raise ValueError(f"task arithmetic: level must be 0 (mixed), 1, 2, 3 or 4, got {self.options['level']}")

    def sample_expression(self, rng: random.Random, level: int):
        if level in (1, 2):
            low, high = (0, 9) if level == 1 else (10, 99)
            a, b = rng.randint(low, high), rng.randint(low, high)
            op = rng.choice("+-")
            if op == "-" and a < b:
                a, b = b, a
            return (op, a, b)
        if level == 3:
            a, b = rng.randint(10, 99), rng.randint(2, 9)
            return ("*", a, b) if rng.random() < 0.5 else ("*", b, a)
        while True:   # level 4: keep the expressions that need parentheses
            expr = random_tree(rng, rng.choice((3, 4)))
            if "(" in render(expr, spaced=False):
                return expr

    def sample_problem(self, rng: random.Random) -> Problem:
        level = self.options["level"] or rng.randint(1, 4)
        expr = self.sample_expression(rng, level)
        return Problem(task=self.name, id="", question=f"What is {render(expr, spaced=True)}?",
                       answer=str(evaluate(expr)),
                       meta={"level": level, "steps": reduction_steps(expr), "operations": operations(expr)})

    def think(self, problem: Problem) -> str:
        """Columns at levels 2 and 3 (column_steps), one operation after another at levels 1 and 4
        (operation_steps)."""
        if problem.meta["level"] in (2, 3):
            a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", problem.meta["steps"][0]).groups()
            return column_steps(int(a), op, int(b))
        return operation_steps(problem.meta["operations"])

    def reference_response(self, problem: Problem) -> str:
        return format_response(self.think(problem), problem.answer)

    def wrong_response(self, problem: Problem, rng: random.Random) -> str:
        """The same reasoning with a wrong last value: a near miss by -10, -2, -1, 1, 2 or 10."""
        wrong = int(problem.answer) + rng.choice((-10, -2, -1, 1, 2, 10))
        think = self.think(problem)
        last = max(think.rfind("="), think.rfind(","))
        return format_response(think[:last + 1] + str(wrong), str(wrong))

    def statement(self, problem: Problem) -> str:
        return f"{problem.question[len('What is '):-1]} = {problem.answer}."

    def check_answer(self, problem: Problem, answer: str) -> float:
        value = parse_integer(answer)
        return float(value is not None and value == int(problem.answer))

    def closeness(self, problem: Problem, answer: str) -> float | None:
        """1 - |value - answer| / max(1, |answer|), floored at 0: 41 for 42 is 0.98, 5 for 4 is 0.75."""
        value = parse_integer(answer)
        if value is None:
            return None
        right = int(problem.answer)
        return max(0.0, 1.0 - abs(value - right) / max(1, abs(right)))
