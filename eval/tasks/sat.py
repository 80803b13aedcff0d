"""Random k-SAT near the satisfiability threshold: a formula in, a satisfying assignment out.

A problem is a random k-CNF formula over n_vars variables with round(ratio * n_vars) clauses, each clause k distinct
variables with random signs. The default ratio is the satisfiability threshold of random k-SAT (the clause density
at which a large random formula turns from almost surely satisfiable to almost surely unsatisfiable; 4.267 for
k=3), where instances are hardest. Only satisfiable formulas are kept:
  n_vars <= 20   uniform random formulas, rejected when unsatisfiable (exact brute force over all 2^n assignments,
                 done with bit sets: bit a of a clause's set says whether assignment a satisfies the clause);
  n_vars > 20    planted: a hidden assignment is drawn and only clauses it satisfies are kept.

    question   Assign 0 or 1 to each of x1..x4 so that the formula is true (| is or, & is and, ~ is not):
               (x1 | ~x2 | x3) & (~x1 | x2 | x4) & ...
    response   <think>17 clauses, each true</think>\\n<answer>x1=0 x2=0 x3=1 x4=1</answer>
    answer     "x1=1 x2=0 ..." every variable exactly once, values 0 or 1, separated by spaces or commas
               (spaces around "=" allowed, any order). Missing, repeated, unknown or misspelt (x01, X1) variables
               score 0.

The checker evaluates the formula on the model's assignment: any satisfying assignment scores 1.0, not only the
stored reference (the lowest satisfying assignment, x1 the least significant bit; the planted one for n > 20).
"""

import random
import re
from functools import lru_cache

from minitrain.eval.tasks.base import Problem, Task, format_response

# Satisfiability thresholds of random k-SAT (clauses per variable): k=2 exact; k=3..7 from the survey-propagation
# predictions (Mertens, Mezard, Zecchina 2006, "Threshold values of random K-SAT from the cavity method").
THRESHOLDS = {2: 1.0, 3: 4.267, 4: 9.931, 5: 21.117, 6: 43.37, 7: 87.79}
BRUTE_FORCE_MAX_VARS = 20
ASSIGNMENT_ITEM = re.compile(r"x([1-9][0-9]*)=([01])")     # variables named as in the question: x7, not x07


@lru_cache(maxsize=8)
def variable_bitsets(n_vars: int) -> tuple[int, list[int]]:
    """(all, sets): bit a of sets[i] is set when assignment a (an n-bit number) makes variable i+1 true."""
    size = 1 << n_vars
    full = (1 << size) - 1
    sets = []
    for i in range(n_vars):
        half = 1 << i                                    # pattern of period 2^(i+1): 2^i zeros then 2^i ones
        pattern = ((1 << half) - 1) << half
        repeat = full // ((1 << (2 * half)) - 1)         # 1 every 2^(i+1) bits
        sets.append(pattern * repeat)
    return full, sets


def satisfying_set(clauses: list[list[int]], n_vars: int) -> int:
    """Bit set of the assignments that satisfy every clause (literal v > 0 is x_v, v < 0 is ~x_v)."""
    full, sets = variable_bitsets(n_vars)
    result = full
    for clause in clauses:
        clause_set = 0
        for literal in clause:
            clause_set |= sets[literal - 1] if literal > 0 else full ^ sets[-literal - 1]
        result &= clause_set
        if not result:
            break
    return result


def evaluate_formula(clauses: list[list[int]], values: dict[int, int]) -> bool:
    """Whether every clause has a true literal under `values` (variable -> 0/1)."""
    return all(any((values[abs(lit)] == 1) == (lit > 0) for lit in clause) for clause in clauses)


def format_clause(clause: list[int]) -> str:
    return "(" + " | ".join(f"x{lit}" if lit > 0 else f"~x{-lit}" for lit in clause) + ")"


def format_assignment(values: dict[int, int]) -> str:
    return " ".join(f"x{v}={values[v]}" for v in sorted(values))


def parse_assignment(answer: str, n_vars: int) -> dict[int, int] | None:
    """{variable: 0/1} from "x1=1 x2=0 ...", or None unless each of x1..x{n_vars} appears exactly once."""
    items = [item for item in re.split(r"[\s,;]+", re.sub(r"\s*=\s*", "=", answer)) if item]
    values = {}
    for item in items:
        match = ASSIGNMENT_ITEM.fullmatch(item)
        if not match:
            return None
        variable = int(match.group(1))
        if variable in values or not 1 <= variable <= n_vars:
            return None
        values[variable] = int(match.group(2))
    return values if len(values) == n_vars else None


class SatTask(Task):
    family = "sat"
    OPTIONS = {"n_vars": 4, "k": 3, "ratio": 0.0}    # ratio 0.0 = the threshold of k

    def __init__(self, **options):
        super().__init__(**options)
        k, n_vars = self.options["k"], self.options["n_vars"]
        if k not in THRESHOLDS:
            raise ValueError(f"task sat: k must be one of {sorted(THRESHOLDS)}, got {k}")
        if not k <= n_vars <= 200:
            raise ValueError(f"task sat: n_vars must be between k={k} and 200, got {n_vars}")
        if self.options["ratio"] < 0:
            raise ValueError(f"task sat: ratio must be >= 0, got {self.options['ratio']}")
        self.num_clauses = max(1, round((self.options["ratio"] or THRESHOLDS[k]) * n_vars))

    def random_clause(self, rng: random.Random) -> list[int]:
        variables = sorted(rng.sample(range(1, self.options["n_vars"] + 1), self.options["k"]))
        return [v if rng.random() < 0.5 else -v for v in variables]

    def sample_problem(self, rng: random.Random) -> Problem:
        n_vars = self.options["n_vars"]
        if n_vars <= BRUTE_FORCE_MAX_VARS:
            clauses, planted = [self.random_clause(rng) for _ in range(self.num_clauses)], None
        else:
            planted = {v: rng.randint(0, 1) for v in range(1, n_vars + 1)}
            clauses = []
            while len(clauses) < self.num_clauses:
                clause = self.random_clause(rng)
                if evaluate_formula([clause], planted):
                    clauses.append(clause)
        question = (f"Assign 0 or 1 to each of x1..x{n_vars} so that the formula is true "
                    f"(| is or, & is and, ~ is not):\n" + " & ".join(format_clause(c) for c in clauses))
        answer = format_assignment(planted) if planted else ""   # brute force fills it in accept()
        return Problem(task=self.name, id="", question=question, answer=answer,
                       meta={"n_vars": n_vars, "clauses": clauses})

    def accept(self, problem: Problem) -> bool:
        if problem.answer:
            return True
        solutions = satisfying_set(problem.meta["clauses"], problem.meta["n_vars"])
        if not solutions:
            return False
        lowest = (solutions & -solutions).bit_length() - 1      # the lowest satisfying assignment, as a number
        problem.answer = format_assignment({v: (lowest >> (v - 1)) & 1 for v in range(1, problem.meta["n_vars"] + 1)})
        return True

    def reference_response(self, problem: Problem) -> str:
        return format_response(f"{len(problem.meta['clauses'])} clauses, each true", problem.answer)

    def wrong_response(self, problem: Problem, rng: random.Random) -> str:
        """The reference assignment with one variable flipped so that some clause fails (a random assignment that
        fails when no single flip does)."""
        n_vars, clauses = problem.meta["n_vars"], problem.meta["clauses"]
        reference = parse_assignment(problem.answer, n_vars)
        for variable in rng.sample(range(1, n_vars + 1), n_vars):
            values = {**reference, variable: 1 - reference[variable]}
            if not evaluate_formula(clauses, values):
                break
        else:
            for _ in range(10_000):
                values = {v: rng.randint(0, 1) for v in range(1, n_vars + 1)}
                if not evaluate_formula(clauses, values):
                    break
            else:
                raise ValueError(f"{problem.id}: no unsatisfying assignment found for a wrong response")
        return format_response(f"{len(clauses)} clauses, each true", format_assignment(values))

    def statement(self, problem: Problem) -> str:
        formula = problem.question.split("\n", 1)[1]
        return f"The assignment {problem.answer} makes {formula} true."

    def check_answer(self, problem: Problem, answer: str) -> float:
        values = parse_assignment(answer, problem.meta["n_vars"])
        return float(values is not None and evaluate_formula(problem.meta["clauses"], values))

    def closeness(self, problem: Problem, answer: str) -> float | None:
        """The fraction of clauses a well-formed assignment satisfies."""
        values = parse_assignment(answer, problem.meta["n_vars"])
        if values is None:
            return None
        clauses = problem.meta["clauses"]
        return sum(evaluate_formula([clause], values) for clause in clauses) / len(clauses)
