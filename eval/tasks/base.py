"""The interface every evaluation task implements, and the rules that keep evaluation problems out of training.

A task generates problems deterministically from a seed and scores a model's completion exactly. The same
problem generators feed the embedded training data (dataset/embedded.py) with *different* seeds, so no held-out
problem is ever trained on.

Response format (training data and scoring alike):

    <think>23+19=42</think>
    <answer>42</answer>

`score` reads the content of the LAST <answer>...</answer> of a completion (extract_answer), collapses its
whitespace and compares it exactly with the task's rule (integers parsed as integers, a SAT assignment checked
against the formula). A completion without a closed <answer> tag scores 0.0. The <think> part is never scored.

Held-out problems, two guarantees:
  1. Seeds: evaluation seeds are below TRAIN_SEED_BASE, training seeds (training_seed(i)) at or above it.
  2. Problems: every question falls, by a hash of its text, into the held-out partition (1 in HELD_OUT_BUCKETS)
     or the training partition. make_problems with an evaluation seed returns only held-out problems and with a
     training seed only training problems. So no seed, sample size or task option can put an evaluation problem
     into training data, even for small problem spaces (one-digit sums) where independent draws would collide.
"""

import hashlib
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

EVAL_SEED = 1234                # the seed of the held-out problems evaluation uses by default
TRAIN_SEED_BASE = 1_000_000     # training seeds are TRAIN_SEED_BASE + i; every seed below it is an evaluation seed
HELD_OUT_BUCKETS = 10           # one question in HELD_OUT_BUCKETS (by hash) is held out for evaluation
EXHAUSTED_AFTER = 20_000        # make_problems(distinct=True): draws in a row without a new question = all found


class ProblemSpaceError(ValueError):
    """make_problems cannot find enough problems of the wanted partition (task options leave too few problems)."""


def training_seed(index: int) -> int:
    """The index-th training seed (index >= 0): never an evaluation seed."""
    if index < 0:
        raise ValueError(f"training_seed: index must be >= 0, got {index}")
    return TRAIN_SEED_BASE + index


def is_training_seed(seed: int) -> bool:
    return seed >= TRAIN_SEED_BASE


def is_held_out(family: str, question: str) -> bool:
    """Whether a question belongs to the held-out (evaluation) partition of its task family."""
    digest = hashlib.sha256(f"{family}\n{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def extract_answer(completion: str) -> str | None:
    """Content of the last <answer>...</answer> in `completion`, whitespace collapsed; None when there is none."""
    end = completion.rfind("</answer>")
    if end < 0:
        return None
    start = completion.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return normalize_whitespace(completion[start + len("<answer>"):end])


def format_response(think: str, answer: str) -> str:
    """The think/answer response format of the training data."""
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


INTEGER = re.compile(r"[+-]?[0-9]+")


def parse_integer(text: str) -> int | None:
    """An integer written alone ("42", "-7", "+3"); None for anything else ("42.0", "42 apples", "")."""
    return int(text) if INTEGER.fullmatch(text) else None


@dataclass
class Problem:
    task: str                    # name of the task that made it, e.g. "arithmetic" (get_task(task) rebuilds it)
    id: str                      # stable identifier, unique within the task and seed: "<task>/<seed>/<index>"
    question: str                # the user message, exactly as it appears in the chat data
    answer: str                  # the canonical answer (what goes inside <answer>...</answer>)
    meta: dict = field(default_factory=dict)   # task-specific data the checker needs (e.g. the CNF formula); JSON-able

    def messages(self) -> list[dict]:
        """The chat prompt: a single user turn."""
        return [{"role": "user", "content": self.question}]

    def __hash__(self) -> int:
        # Problems are compared for overlap by their question text (equal problems have equal questions).
        return hash(self.question)

    def to_dict(self) -> dict:
        return {"task": self.task, "id": self.id, "question": self.question, "answer": self.answer, "meta": self.meta}

    @classmethod
    def from_dict(cls, row: dict) -> "Problem":
        return cls(task=row["task"], id=row["id"], question=row["question"], answer=row["answer"],
                   meta=dict(row.get("meta") or {}))


class Task(ABC):
    """A family of generated problems with an exact checker.

    Subclasses set `family` and OPTIONS (option name -> default), and implement sample_problem, reference_response,
    check_answer, wrong_response and statement. Instances are built with keyword options; `name` is the canonical
    spec get_task accepts ("arithmetic", "arithmetic:level=2", "sat:k=3:n_vars=6").
    """

    family: str = ""
    OPTIONS: dict = {}
    name: str = ""

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"task {self.family}: unknown option(s) {unknown}; options: {sorted(self.OPTIONS)}")
        self.options = dict(self.OPTIONS)
        for key, value in options.items():
            kind = type(self.OPTIONS[key])
            if kind is float and type(value) is int:
                value = float(value)
            if type(value) is not kind:
                raise ValueError(f"task {self.family}: option {key}={value!r} must be {kind.__name__}")
            self.options[key] = value
        changed = [f"{k}={v}" for k, v in sorted(self.options.items()) if v != self.OPTIONS[k]]
        self.name = ":".join([self.family, *changed])

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # ---- generation ----
    def make_problems(self, n: int, seed: int, distinct: bool = False) -> list[Problem]:
        """n problems drawn deterministically from `seed`: held-out ones for an evaluation seed, training ones for a
        training seed (see the module docstring).

        distinct=False draws problems independently, so a small problem space repeats problems (training data).
        distinct=True (evaluation) never returns the same question twice; when the partition holds fewer than n
        questions it returns all it finds, fewer than n: the draw stops after EXHAUSTED_AFTER draws in a row bring
        nothing new (arithmetic:level=1 holds 15 held-out questions, arithmetic:level=3 about 144).
        """
        rng = random.Random(f"{self.name}/{seed}")
        want_held_out = not is_training_seed(seed)
        problems, seen, attempts, fruitless = [], set(), 0, 0
        while len(problems) < n:
            attempts += 1
            if distinct and fruitless >= EXHAUSTED_AFTER and problems:
                break
            if attempts > 1000 * (n + 10) + EXHAUSTED_AFTER:
                raise ProblemSpaceError(f"task {self.name}: could not draw {n} problems of the "
                                 f"{'held-out' if want_held_out else 'training'} partition (problem space too small)")
            problem = self.sample_problem(rng)    # question, answer, meta; task and id are set here
            fruitless += 1
            if is_held_out(self.family, problem.question) != want_held_out:
                continue
            if distinct and problem.question in seen:
                continue
            if not self.accept(problem):
                continue
            problem.task, problem.id = self.name, f"{self.name}/{seed}/{len(problems)}"
            problems.append(problem)
            seen.add(problem.question)
            fruitless = 0
        return problems

    @abstractmethod
    def sample_problem(self, rng: random.Random) -> Problem:
        """One random problem (task and id are filled in by make_problems)."""

    def accept(self, problem: Problem) -> bool:
        """A final filter after the partition check (SAT rejects unsatisfiable formulas here, the costly test)."""
        return True

    # ---- responses ----
    @abstractmethod
    def reference_response(self, problem: Problem) -> str:
        """The assistant response the training data uses for this problem (think/answer format)."""

    @abstractmethod
    def wrong_response(self, problem: Problem, rng: random.Random) -> str:
        """A plausible wrong response in the same format (a near miss), for preference data; scores 0.0."""

    @abstractmethod
    def statement(self, problem: Problem) -> str:
        """The problem and its answer as one plain sentence, for pretraining text ("23 + 19 = 42.")."""

    # ---- scoring ----
    @abstractmethod
    def check_answer(self, problem: Problem, answer: str) -> float:
        """Score the extracted, whitespace-normalised answer text: 1.0 right, 0.0 wrong or unparsable."""

    def closeness(self, problem: Problem, answer: str) -> float | None:
        """How close a wrong answer comes, in [0, 1] (1.0 = right); None when it is not an answer of this task's form
        (not an integer, not an assignment, ...). Partial-credit rewards (trainer/rewards.py) use it; the default knows
        only right (1.0) and wrong (0.0)."""
        return float(self.check_answer(problem, answer))

    def score(self, problem: Problem, completion: str) -> float:
        """1.0 for an exactly correct answer, 0.0 for a wrong or malformed one (partial credit where defined)."""
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        return float(self.check_answer(problem, answer))
