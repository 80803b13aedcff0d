"""Countdown: combine the given numbers with + - * / into an expression that equals the target.

    question   Use 3 7 12 5 once each with + - * / and parentheses to make 46.
    response   <think>(12-5)*7-3=7*7-3=49-3=46</think>\\n<answer>(12-5)*7-3</answer>
    answer     an arithmetic expression (digits, + - * /, parentheses, spaces) that uses every given number exactly
               once and equals the target; division is exact (fractions are kept, so 7/2*2 = 7). Any such expression
               scores 1.0, not only the stored reference; an expression with "=" or anything else scores 0.

Generation: `count` numbers from 1..max_number (defaults 4 and 20) are combined by a random expression tree whose
every intermediate value is a non-negative integer; its value (1..999) is the target, so a solution always exists.
"""

import ast
import random
import re
from fractions import Fraction

from minitrain.eval.tasks.arithmetic import evaluate, reduction_steps, render
from minitrain.eval.tasks.base import Problem, Task, format_response

MAX_ANSWER_CHARS = 200
ANSWER_CHARS = re.compile(r"[0-9+\-*/() ]+")   # before parsing: no 0x1f, 1_0, 1e1, comments or other Python syntax
OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def evaluate_answer(text: str) -> tuple[Fraction, list[int]] | None:
    """(value, numbers used) of an expression of decimal integers, + - * / and parentheses; None for anything else
    (other characters, other syntax such as ** or //, unary minus, division by zero)."""
    if len(text) > MAX_ANSWER_CHARS or not ANSWER_CHARS.fullmatch(text):
        return None
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    numbers = []

    def value(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            a, b = value(node.left), value(node.right)
            op = OPERATORS[type(node.op)]
            if op == "/":
                if b == 0:
                    raise ZeroDivisionError
                return a / b
            return a + b if op == "+" else a - b if op == "-" else a * b
        raise ValueError("not allowed")

    try:
        return value(tree), numbers
    except (ValueError, ZeroDivisionError):
        return None


class CountdownTask(Task):
    family = "countdown"
    OPTIONS = {"count": 4, "max_number": 20}

    def __init__(self, **options):
        super().__init__(**options)
        if not 2 <= self.options["count"] <= 6:
            raise ValueError(f"task countdown: count must be between 2 and 6, got {self.options['count']}")
        if not 2 <= self.options["max_number"] <= 100:
            raise ValueError(f"task countdown: max_number must be between 2 and 100, got {self.options['max_number']}")

    def random_tree(self, rng: random.Random, numbers: list[int]):
        if len(numbers) == 1:
            return numbers[0]
        split = rng.randint(1, len(numbers) - 1)
        return (rng.choice("+-*/"), self.random_tree(rng, numbers[:split]), self.random_tree(rng, numbers[split:]))

    @staticmethod
    def valid(expr) -> bool:
        """Every intermediate value a non-negative integer (exact division), the result in 1..999."""
        def walk(node) -> int:
            if isinstance(node, int):
                return node
            value = evaluate((node[0], walk(node[1]), walk(node[2])))
            if value < 0:
                raise ValueError("negative")
            return value
        try:
            return 1 <= walk(expr) <= 999
        except ValueError:
            return False

    def sample_problem(self, rng: random.Random) -> Problem:
        while True:
            numbers = [rng.randint(1, self.options["max_number"]) for _ in range(self.options["count"])]
            expr = self.random_tree(rng, numbers)
            if self.valid(expr):
                break
        shown = sorted(numbers) if rng.random() < 0.5 else rng.sample(numbers, len(numbers))
        target = evaluate(expr)
        question = f"Use {' '.join(map(str, shown))} once each with + - * / and parentheses to make {target}."
        return Problem(task=self.name, id="", question=question, answer=render(expr, spaced=False),
                       meta={"numbers": shown, "target": target, "steps": reduction_steps(expr)})

    def reference_response(self, problem: Problem) -> str:
        return format_response("=".join(problem.meta["steps"]), problem.answer)

    def wrong_response(self, problem: Problem, rng: random.Random) -> str:
        """The reference expression with one operator changed so that it misses the target (steps shown)."""
        expr = ast_to_tree(ast.parse(problem.answer, mode="eval").body)
        paths = operator_paths(expr)
        for _ in range(100):
            path = rng.choice(paths)
            candidate = replace_operator(expr, path, rng.choice("+-*/"))
            if self.valid(candidate) and evaluate(candidate) != problem.meta["target"]:
                return format_response("=".join(reduction_steps(candidate)), render(candidate, spaced=False))
        numbers = problem.meta["numbers"]      # no valid near miss: a plain sum that misses
        wrong = "+".join(map(str, numbers))
        if sum(numbers) == problem.meta["target"]:
            wrong = "*".join(map(str, numbers))
        return format_response(wrong, wrong)

    def statement(self, problem: Problem) -> str:
        numbers = " ".join(map(str, problem.meta["numbers"]))
        return f"With {numbers} once each, {problem.answer} = {problem.meta['target']}."

    def check_answer(self, problem: Problem, answer: str) -> float:
        result = evaluate_answer(answer)
        if result is None:
            return 0.0
        value, used = result
        return float(value == problem.meta["target"] and sorted(used) == sorted(problem.meta["numbers"]))

    def closeness(self, problem: Problem, answer: str) -> float | None:
        return countdown_closeness(problem, answer)


def countdown_closeness(problem, answer: str) -> float | None:
    """For an expression that uses exactly the given numbers: 1 - |value - target| / max(1, target), floored at 0;
    an expression that uses other numbers is 0.0."""
    result = evaluate_answer(answer)
    if result is None:
        return None
    value, used = result
    if sorted(used) != sorted(problem.meta["numbers"]):
        return 0.0
    target = problem.meta["target"]
    return max(0.0, 1.0 - float(abs(value - target)) / max(1, abs(target)))


def ast_to_tree(node):
    if isinstance(node, ast.Constant):
        return node.value
    return (OPERATORS[type(node.op)], ast_to_tree(node.left), ast_to_tree(node.right))


def operator_paths(expr, path=()) -> list[tuple]:
    if isinstance(expr, int):
        return []
    return [path] + operator_paths(expr[1], path + (1,)) + operator_paths(expr[2], path + (2,))


def replace_operator(expr, path: tuple, op: str):
    if not path:
        return (op, expr[1], expr[2])
    parts = list(expr)
    parts[path[0]] = replace_operator(expr[path[0]], path[1:], op)
    return tuple(parts)
