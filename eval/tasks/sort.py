"""Sorting a short list of integers from smallest to largest.

    question   Sort from smallest to largest: 42 7 19 88 7
    response   <think>5 numbers, min 7, max 88</think>\\n<answer>7 7 19 42 88</answer>
    answer     the integers separated by spaces or commas; the same numbers (duplicates kept) in ascending order

Options: length (how many numbers, default 5) and max_value (numbers are drawn from 0..max_value, default 99).
"""

import random
import re

from minitrain.eval.tasks.base import Problem, Task, format_response, parse_integer


def parse_numbers(answer: str) -> list[int] | None:
    items = [item for item in re.split(r"[\s,]+", answer) if item]
    numbers = [parse_integer(item) for item in items]
    return None if not numbers or any(n is None for n in numbers) else numbers


class SortTask(Task):
    family = "sort"
    OPTIONS = {"length": 5, "max_value": 99}

    def __init__(self, **options):
        super().__init__(**options)
        if not 2 <= self.options["length"] <= 50:
            raise ValueError(f"task sort: length must be between 2 and 50, got {self.options['length']}")
        if self.options["max_value"] < 1:
            raise ValueError(f"task sort: max_value must be >= 1, got {self.options['max_value']}")

    def sample_problem(self, rng: random.Random) -> Problem:
        numbers = [rng.randint(0, self.options["max_value"]) for _ in range(self.options["length"])]
        return Problem(task=self.name, id="", question="Sort from smallest to largest: " + " ".join(map(str, numbers)),
                       answer=" ".join(map(str, sorted(numbers))), meta={"numbers": numbers})

    @staticmethod
    def _think(numbers: list[int]) -> str:
        return f"{len(numbers)} numbers, min {min(numbers)}, max {max(numbers)}"

    def reference_response(self, problem: Problem) -> str:
        return format_response(self._think(problem.meta["numbers"]), problem.answer)

    def wrong_response(self, problem: Problem, rng: random.Random) -> str:
        """The sorted list with two neighbours swapped (or one number off by one when all are equal)."""
        wrong = sorted(problem.meta["numbers"])
        unequal = [i for i in range(len(wrong) - 1) if wrong[i] != wrong[i + 1]]
        if unequal:
            i = rng.choice(unequal)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        else:
            wrong[rng.randrange(len(wrong))] += 1
        return format_response(self._think(problem.meta["numbers"]), " ".join(map(str, wrong)))

    def statement(self, problem: Problem) -> str:
        numbers = " ".join(map(str, problem.meta["numbers"]))
        return f"Sorted from smallest to largest, {numbers} becomes {problem.answer}."

    def check_answer(self, problem: Problem, answer: str) -> float:
        return float(parse_numbers(answer) == sorted(problem.meta["numbers"]))

    def closeness(self, problem: Problem, answer: str) -> float | None:
        """The fraction of positions that hold the right number (0 when the answer has the wrong length)."""
        numbers = parse_numbers(answer)
        if numbers is None:
            return None
        right = sorted(problem.meta["numbers"])
        if len(numbers) != len(right):
            return 0.0
        return sum(a == b for a, b in zip(numbers, right)) / len(right)
