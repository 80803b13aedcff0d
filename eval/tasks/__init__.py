"""Verifiable tasks: generated problems with exact checkers, shared by evaluation and the embedded training data.

    from minitrain.eval.tasks import EVAL_SEED, get_task
    task = get_task("arithmetic")                      # or "arithmetic:level=2", "sat:n_vars=6:k=3", ...
    for problem in task.make_problems(500, EVAL_SEED):
        completion = ...                               # the model's reply to problem.messages()
        score = task.score(problem, completion)        # 1.0 or 0.0

Tasks (options after the name, separated by ":", e.g. "sort:length=8"):
    arithmetic   level=0 (mixed) | 1 one-digit +- | 2 two-digit +- | 3 two-digit * one-digit | 4 with parentheses
    sat          n_vars=4, k=3, ratio=0.0 (0 = the satisfiability threshold of k): satisfiable random k-SAT
    sort         length=5, max_value=99: sort integers ascending
    countdown    count=4, max_number=20: reach a target with + - * / using each number once

Rows that carry their task (dataset/embedded.py's rlaif.jsonl: prompt, answer, task, id, meta) are scored with
score_row(row, completion).

Evaluation uses EVAL_SEED (or any seed below TRAIN_SEED_BASE); training data uses training_seed(i). The two draw
from disjoint partitions of the problems (eval/tasks/base.py), so no held-out problem is ever trained on.
"""

from minitrain.eval.tasks.arithmetic import ArithmeticTask
from minitrain.eval.tasks.base import (EVAL_SEED, HELD_OUT_BUCKETS, TRAIN_SEED_BASE, Problem, ProblemSpaceError, Task,
                                       extract_answer, format_response, is_held_out, is_training_seed,
                                       normalize_whitespace, training_seed)
from minitrain.eval.tasks.countdown import CountdownTask
from minitrain.eval.tasks.sat import SatTask
from minitrain.eval.tasks.sort import SortTask

TASKS = {task.family: task for task in (ArithmeticTask, SatTask, SortTask, CountdownTask)}
TASK_NAMES = tuple(TASKS)

__all__ = ["EVAL_SEED", "HELD_OUT_BUCKETS", "TASKS", "TASK_NAMES", "TRAIN_SEED_BASE", "Problem", "ProblemSpaceError",
           "Task", "extract_answer", "format_response", "get_task", "is_held_out", "is_training_seed",
           "normalize_whitespace", "parse_task_spec", "problem_from_row", "score_row", "training_seed"]


def parse_task_spec(spec: str) -> tuple[str, dict]:
    """"sat:n_vars=6:k=3" -> ("sat", {"n_vars": 6, "k": 3}); values typed like the option's default."""
    name, *items = spec.strip().split(":")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    defaults, options = TASKS[name].OPTIONS, {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"task {spec!r}: bad option {item!r}; options of {name}: "
                             f"{', '.join(f'{k}={v}' for k, v in defaults.items())}")
        kind = type(defaults[key])
        try:
            options[key] = kind(text)
        except ValueError:
            raise ValueError(f"task {spec!r}: option {key} must be {kind.__name__}, got {text!r}") from None
    return name, options


def get_task(name: str, **options) -> Task:
    """The task named `name` ("arithmetic", or with options "arithmetic:level=2"); keyword options override those in
    the name. An unknown name or option raises ValueError listing the known ones."""
    family, spec_options = parse_task_spec(name)
    return TASKS[family](**{**spec_options, **options})


def problem_from_row(row: dict) -> Problem:
    """The Problem of a row {"task", "id", "prompt" (or "question"), "answer", "meta"} (dataset/embedded.py's
    rlaif.jsonl rows, or Problem.to_dict())."""
    question = row["prompt"] if "prompt" in row else row["question"]
    return Problem(task=row["task"], id=row["id"], question=question, answer=row["answer"], meta=dict(row["meta"]))


def score_row(row: dict, completion: str) -> float:
    """Score a completion of a prompt row that carries its task and answer (rlaif.jsonl)."""
    return get_task(row["task"]).score(problem_from_row(row), completion)
