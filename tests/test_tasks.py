# Run: pytest tests/test_tasks.py   (without the scan of the embedded data: -m "not slow")
# The verifiable tasks (eval/tasks): each checker accepts right answers and rejects near misses and malformed output;
# the SAT checker evaluates the formula (any satisfying assignment passes); generation is deterministic; and no
# held-out problem (EVAL_SEED) appears in the embedded training data generated at its default sizes.
import itertools
import json
import random
import re
from collections import Counter

import pytest

from minitrain.dataset.embedded import TASK_MIX, ensure_embedded_data
from minitrain.eval.tasks import (EVAL_SEED, TASK_NAMES, TRAIN_SEED_BASE, Problem, ProblemSpaceError, extract_answer,
                                  format_response, get_task, is_held_out, is_training_seed, score_row, training_seed)
from minitrain.eval.tasks.arithmetic import column_steps, operation_steps, operations
from minitrain.eval.tasks.sat import THRESHOLDS, evaluate_formula, satisfying_set

EVAL_SPECS = sorted(set(TASK_NAMES) | {spec for spec, _ in TASK_MIX})   # every spec training data uses, + defaults
HELD_OUT_PER_TASK = 500


def respond(answer: str) -> str:
    return format_response("scratch work", answer)


# ---- answer extraction ----

@pytest.mark.parametrize("completion, expected", [
    ("<think>x</think>\n<answer>42</answer>", "42"),
    ("<answer>1</answer> then <answer>  4  2 </answer>", "4 2"),              # the last one, whitespace collapsed
    ("<answer>7</answer><answer>8", "7"),                                      # an unclosed last tag is ignored
    ("<answer>1<answer>2</answer>", "2"),                                      # the innermost opening before </answer>
    ("<answer></answer>", ""),
    ("42", None), ("<answer>42", None), ("42</answer>", None), ("</answer><answer>", None), ("", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_get_task_names_options_and_errors():
    assert set(TASK_NAMES) == {"arithmetic", "sat", "sort", "countdown"}
    assert get_task("arithmetic").name == "arithmetic"
    assert get_task("arithmetic:level=2").options["level"] == 2
    assert get_task("sat", n_vars=6).name == "sat:n_vars=6"
    assert get_task("sat:n_vars=6:k=4").num_clauses == round(THRESHOLDS[4] * 6)
    with pytest.raises(ValueError, match="known tasks: arithmetic, sat, sort, countdown"):
        get_task("algebra")
    with pytest.raises(ValueError, match="options of sat: n_vars=4, k=3"):
        get_task("sat:clauses=3")
    with pytest.raises(ValueError, match="level must be"):
        get_task("arithmetic:level=7")
    with pytest.raises(ValueError, match="must be int"):
        get_task("sort:length=many")


# ---- arithmetic ----

@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_arithmetic_levels_are_what_they_claim_and_reference_is_right(level):
    task = get_task(f"arithmetic:level={level}")
    for p in task.make_problems(200, training_seed(0)):
        expression = re.fullmatch(r"What is (.+)\?", p.question).group(1)
        operands = [int(x) for x in re.findall(r"\d+", expression)]
        assert int(p.answer) == eval(expression)                    # Python's own arithmetic, independent of ours
        if level == 1:
            assert all(x <= 9 for x in operands) and re.fullmatch(r"\d [+-] \d", expression) and int(p.answer) >= 0
        elif level == 2:
            assert all(10 <= x <= 99 for x in operands) and " * " not in expression and int(p.answer) >= 0
        elif level == 3:
            assert " * " in expression and sorted(len(str(x)) for x in operands) == [1, 2]
        else:
            assert "(" in expression and len(operands) in (3, 4)
        response = task.reference_response(p)
        assert task.score(p, response) == 1.0
        think = re.fullmatch(r"<think>(.+)</think>\n<answer>(.+)</answer>", response).group(1)
        if level in (1, 4):
            # operations "a op b=value", each true; each operand is a number of the question or the value of an
            # earlier operation, each used once; one operation per operator, the last value is the answer
            leaves, values = Counter(operands), Counter()
            operations = [re.fullmatch(r"(\(-\d+\)|\d+)([-+*])(\(-\d+\)|\d+)=(-?\d+)", step).groups()
                          for step in think.split(",")]
            for a, op, b, value in operations:
                assert eval(f"{a}{op}{b}") == int(value)
                for x in (int(a.strip("()")), int(b.strip("()"))):
                    pool = values if values[x] else leaves
                    assert pool[x] > 0, (think, x)
                    pool[x] -= 1
                values[int(value)] += 1
            assert len(operations) == len(re.findall(r" [-+*] ", expression)) and operations[-1][3] == p.answer
            assert +leaves == Counter()
        else:
            # columns: "ones=value,tens=value,answer"; each column's sum is true, and the ones column works on the
            # ones digits of the operands (the two-digit ones at level 3), the tens column on their tens digits
            *columns, last = think.split(",")
            assert last == p.answer and len(columns) == 2
            for column in columns:
                left, right = column.split("=")
                assert eval(left) == int(right)
            two_digit = [x for x in operands if x >= 10]
            ones_digits = re.findall(r"\d+", columns[0].split("=")[0])
            assert {int(d) % 10 for d in ones_digits} >= {x % 10 for x in two_digit}
            assert columns[1].startswith(str(two_digit[0] // 10))



def test_arithmetic_operations_in_the_order_of_the_reduction():
    assert operation_steps(operations(("*", ("+", 3, 4), 5))) == "3+4=7,7*5=35"
    assert operation_steps(operations(("-", 2, ("-", 7, 9)))) == "7-9=-2,2-(-2)=4"
    assert operation_steps(operations(("-", 1, ("*", ("+", 5, 6), 3)))) == "5+6=11,11*3=33,1-33=-32"
    assert operation_steps(operations(("*", ("-", 1, 8), ("-", 2, 9)))) == "1-8=-7,2-9=-7,(-7)*(-7)=49"
    assert operation_steps(operations(("-", 7, 3))) == "7-3=4"                  # level 1: one operation
    task = get_task("arithmetic:level=4")
    p = Problem("arithmetic:level=4", "t", "What is 2 - (7 - 9)?", "4",
                {"level": 4, "steps": ["2-(7-9)", "2-(-2)", "4"], "operations": operations(("-", 2, ("-", 7, 9)))})
    wrong = task.wrong_response(p, random.Random(0))
    assert wrong.startswith("<think>7-9=-2,2-(-2)=") and task.score(p, wrong) == 0.0

def test_arithmetic_columns_carry_and_borrow_as_on_paper():
    assert column_steps(52, "+", 39) == "2+9=11,5+3+1=9,91"
    assert column_steps(52, "+", 31) == "2+1=3,5+3=8,83"
    assert column_steps(75, "+", 48) == "5+8=13,7+4+1=12,123"
    assert column_steps(52, "-", 39) == "12-9=3,5-1-3=1,13"
    assert column_steps(52, "-", 47) == "12-7=5,5-1-4=0,5"
    assert column_steps(98, "-", 26) == "8-6=2,9-2=7,72"
    assert column_steps(23, "*", 7) == "3*7=21,2*7+2=16,161"
    assert column_steps(7, "*", 23) == "3*7=21,2*7+2=16,161"      # the two-digit factor is always the columns'
    assert column_steps(31, "*", 3) == "1*3=3,3*3=9,93"
    task = get_task("arithmetic:level=2")
    problem = next(p for p in task.make_problems(50, training_seed(0)) if "+" in p.question)
    near_miss = task.wrong_response(problem, random.Random(0))
    assert near_miss.rsplit(",", 1)[0] == task.reference_response(problem).rsplit(",", 1)[0]   # same columns
    assert task.score(problem, near_miss) == 0.0


def test_arithmetic_checker_rejects_near_misses_and_malformed_output():
    task = get_task("arithmetic")
    p = Problem("arithmetic", "t", "What is 23 + 19?", "42", {"level": 2, "steps": ["23+19", "42"]})
    for good in ["<answer>42</answer>", "<think>23+19=41?</think><answer> 42 </answer>", "<answer>+42</answer>",
                 "<answer>41</answer> no wait <answer>42</answer>"]:
        assert task.score(p, good) == 1.0, good
    for bad in ["<answer>41</answer>", "<answer>43</answer>", "<answer>-42</answer>", "<answer>420</answer>",
                "<answer>42.0</answer>", "<answer>42 apples</answer>", "<answer>4 2</answer>", "<answer></answer>",
                "42", "<answer>42", "<think>42</think>", "<answer>42</answer> then <answer>41</answer>"]:
        assert task.score(p, bad) == 0.0, bad


# ---- SAT ----

def brute_force_solutions(clauses, n_vars):
    """Every satisfying assignment, by itertools (independent of the bit-set solver)."""
    return [dict(enumerate(bits, 1)) for bits in itertools.product((0, 1), repeat=n_vars)
            if all(any((bits[abs(l) - 1] == 1) == (l > 0) for l in c) for c in clauses)]


def test_sat_bitset_solver_matches_brute_force_on_random_formulas():
    rng = random.Random(0)
    satisfiable = 0
    for _ in range(100):
        n = rng.randint(3, 7)
        clauses = [[v if rng.random() < 0.5 else -v for v in rng.sample(range(1, n + 1), 3)]
                   for _ in range(round(4.267 * n))]
        expected = brute_force_solutions(clauses, n)
        bits = satisfying_set(clauses, n)
        assert bin(bits).count("1") == len(expected)
        satisfiable += bool(expected)
    assert 10 < satisfiable < 95          # near the threshold: both kinds occur, so the check above means something


def test_sat_problems_are_satisfiable_threshold_formulas():
    task = get_task("sat:n_vars=5")
    problems = task.make_problems(40, EVAL_SEED)
    for p in problems:
        clauses = p.meta["clauses"]
        assert len(clauses) == round(4.267 * 5) and all(len({abs(l) for l in c}) == 3 for c in clauses)
        assert brute_force_solutions(clauses, 5)                    # satisfiable
        assert task.score(p, task.reference_response(p)) == 1.0
        formula = p.question.split("\n", 1)[1]                       # the question holds the whole formula
        assert formula.count("(") == len(clauses) and formula.count(" & ") == len(clauses) - 1


def test_sat_accepts_any_satisfying_assignment_and_rejects_the_rest():
    task = get_task("sat")
    checked_other = 0
    for p in task.make_problems(30, EVAL_SEED):
        n, clauses = p.meta["n_vars"], p.meta["clauses"]
        solutions = brute_force_solutions(clauses, n)
        for values in itertools.product((0, 1), repeat=n):
            assignment = dict(enumerate(values, 1))
            text = " ".join(f"x{v}={assignment[v]}" for v in range(1, n + 1))
            expected = 1.0 if assignment in solutions else 0.0
            assert task.score(p, respond(text)) == expected
            if expected and text != p.answer:
                checked_other += 1
    assert checked_other > 0       # some formulas have satisfying assignments other than the stored one


def test_sat_answer_format():
    task = get_task("sat")
    clauses = [[1, 2, 3], [-1, 2, 4], [1, -3, -4]]
    p = Problem("sat", "t", "q", "x1=1 x2=1 x3=0 x4=0", {"n_vars": 4, "clauses": clauses})
    assert evaluate_formula(clauses, {1: 1, 2: 1, 3: 0, 4: 0})
    for good in ["x1=1 x2=1 x3=0 x4=0", "x4=0, x3=0, x2=1, x1=1", "x1 = 1 x2 = 1 x3 = 0 x4 = 0",
                 "x1=1 x2=1 x3=1 x4=1"]:
        assert task.score(p, respond(good)) == 1.0, good
    for bad in ["x1=1 x2=1 x3=0", "x1=1 x2=1 x3=0 x4=0 x5=1", "x1=1 x1=1 x2=1 x3=0 x4=0", "x1=1 x2=1 x3=0 x4=2",
                "x1=true x2=1 x3=0 x4=0", "1 1 0 0", "x1=0 x2=0 x3=0 x4=0", "", "x1=1 x2=1 x3=0 x4=0 extra",
                "x01=1 x2=1 x3=0 x4=0", "X1=1 x2=1 x3=0 x4=0", "x1=01 x2=1 x3=0 x4=0", "x0=1 x2=1 x3=0 x4=0"]:
        assert task.score(p, respond(bad)) == 0.0, bad
    assert task.score(p, "x1=1 x2=1 x3=0 x4=0") == 0.0                 # no answer tags


def test_sat_planted_large_instances():
    task = get_task("sat:n_vars=30")
    for p in task.make_problems(5, EVAL_SEED):
        assert len(p.meta["clauses"]) == round(4.267 * 30)
        assert task.score(p, task.reference_response(p)) == 1.0


# ---- sort and countdown ----

def test_sort_checker():
    task = get_task("sort")
    p = Problem("sort", "t", "Sort from smallest to largest: 42 7 19 88 7", "7 7 19 42 88",
                {"numbers": [42, 7, 19, 88, 7]})
    for good in ["7 7 19 42 88", "7, 7, 19, 42, 88", " 7 7  19 42 88 "]:
        assert task.score(p, respond(good)) == 1.0
    for bad in ["7 19 42 88", "7 7 19 42 88 88", "7 7 42 19 88", "88 42 19 7 7", "7 7 19 42 89", "7 7 19 42 88.",
                "seven", ""]:
        assert task.score(p, respond(bad)) == 0.0, bad


def test_countdown_checker_evaluates_the_expression():
    task = get_task("countdown")
    p = Problem("countdown", "t", "Use 2 3 4 once each with + - * / and parentheses to make 20.", "(2+3)*4",
                {"numbers": [2, 3, 4], "target": 20, "steps": ["(2+3)*4", "5*4", "20"]})
    for good in ["(2+3)*4", "4*(3+2)", "( 2 + 3 ) * 4"]:
        assert task.score(p, respond(good)) == 1.0, good
    for bad in ["2*3*4", "(2+3)*4+0", "5*4", "(2+3)*4*1", "(2+3)*4=20", "20", "2**3*4", "(2+3)*4/0",
                "-(2+3)*-4", "__import__('os')", "(2+3)*4)", "", "(2+3)//1*4", "(2+3)*4.0",
                "(0x2+3)*4", "(2+3)*0o4", "(2+3)*0b100", "(2+3)*4 # 20", "(2+3)*4;"]:   # other Python syntax
        assert task.score(p, respond(bad)) == 0.0, bad
    q = Problem("countdown", "t", "", "8/(3-8/3)", {"numbers": [3, 3, 8, 8], "target": 24, "steps": []})
    assert task.score(q, respond("8/(3-8/3)")) == 1.0                 # exact fractions, not integer division


@pytest.mark.parametrize("name", EVAL_SPECS)
def test_reference_passes_near_miss_fails_and_generation_is_deterministic(name):
    task = get_task(name)
    first, again = task.make_problems(60, EVAL_SEED), task.make_problems(60, EVAL_SEED)
    assert [p.to_dict() for p in first] == [p.to_dict() for p in again]
    assert [p.id for p in first] == [f"{task.name}/{EVAL_SEED}/{i}" for i in range(60)]
    assert [p.question for p in task.make_problems(60, EVAL_SEED + 1)] != [p.question for p in first]
    assert [p.to_dict() for p in task.make_problems(10, EVAL_SEED)] == [p.to_dict() for p in first[:10]]   # prefixes
    rng = random.Random(0)
    for p in first:
        assert task.score(p, task.reference_response(p)) == 1.0
        wrong = task.wrong_response(p, rng)
        assert task.score(p, wrong) == 0.0 and extract_answer(wrong) is not None
        assert json.loads(json.dumps(p.meta)) == p.meta                # rows carry meta as JSON
        assert score_row({"prompt": p.question, **p.to_dict()}, task.reference_response(p)) == 1.0


def test_too_small_problem_space_is_a_clear_error():
    with pytest.raises(ProblemSpaceError, match="could not draw 3 problems of the held-out partition"):
        get_task("sort:length=2:max_value=1").make_problems(3, EVAL_SEED)      # 4 possible questions


# ---- held-out problems never reach training ----

def test_training_seeds_are_never_evaluation_seeds():
    assert not is_training_seed(EVAL_SEED) and EVAL_SEED < TRAIN_SEED_BASE
    assert all(is_training_seed(training_seed(i)) for i in (0, 1, 10**6))
    with pytest.raises(ValueError):
        training_seed(-1)
    task = get_task("arithmetic:level=1")       # 155 possible problems: independent draws alone would collide
    held_out = {p.question for p in task.make_problems(300, EVAL_SEED)}
    trained = {p.question for p in task.make_problems(3000, training_seed(0))}
    assert held_out and trained and not held_out & trained
    assert all(is_held_out("arithmetic", q) for q in held_out)
    assert not any(is_held_out("arithmetic", q) for q in trained)
    assert len(held_out | trained) > 140       # together they cover the space: the partition, not luck, separates them


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return ensure_embedded_data(str(tmp_path_factory.mktemp("embedded")))     # default sizes


@pytest.mark.slow
def test_no_held_out_problem_in_the_embedded_training_data(embedded):
    rows = {name: [json.loads(line) for line in open(path)] for name, path in embedded.items()}
    trained = set()
    for row in rows["sft"]:
        trained |= {m["content"] for m in row["messages"] if m["role"] == "user"}
    trained |= {row["prompt"] for row in rows["dpo"]} | {row["prompt"] for row in rows["rlaif"]}
    trained |= {row["prompt"] for row in rows["rlaif_level4"]} | {row["prompt"] for row in rows["rlaif_level2"]}
    texts = "\n".join(row["text"] for row in rows["pretrain"] + rows["midtrain"])
    text_lines = set(texts.split("\n"))                                             # statements are whole lines
    text_questions = set(re.findall(r"Question: (.*?)\nAnswer: ", texts, re.S))    # worked examples
    text_questions |= set(re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", texts, re.S))   # conversations
    for name in EVAL_SPECS:
        task = get_task(name)
        held_out = task.make_problems(HELD_OUT_PER_TASK, EVAL_SEED)
        questions = {p.question for p in held_out}
        assert not questions & trained, (name, sorted(questions & trained)[:3])
        assert not questions & text_questions, (name, sorted(questions & text_questions)[:3])
        assert not {task.statement(p) for p in held_out} & text_lines, name
    # the same checks find training problems, so they would find a leak
    task = get_task("arithmetic")
    pretrain_problems = task.make_problems(500, training_seed(0))     # pretrain.jsonl's seed
    assert len({task.statement(p) for p in pretrain_problems} & text_lines) > 20
    assert len({p.question for p in pretrain_problems} & text_questions) > 20
    assert len({p.question for p in task.make_problems(500, training_seed(1))} & text_questions) > 20   # midtrain
    assert len({p.question for p in task.make_problems(500, training_seed(2))} & trained) > 20          # sft
    sat = get_task("sat")
    assert {p.question for p in sat.make_problems(50, training_seed(0))} & text_questions              # multi-line


# ---- distinct evaluation problems ----

def test_distinct_problems_never_repeat_and_exhaust_small_spaces_exactly():
    # enumerate the whole question space of levels 1 and 3 and count its held-out questions by hand
    level1 = {f"What is {a} + {b}?" for a in range(10) for b in range(10)} | \
             {f"What is {a} - {b}?" for a in range(10) for b in range(a + 1)}
    level3 = {f"What is {a} * {b}?" for a in range(10, 100) for b in range(2, 10)} | \
             {f"What is {b} * {a}?" for a in range(10, 100) for b in range(2, 10)}
    assert len(level1) == 155 and len(level3) == 1440
    for name, space in (("arithmetic:level=1", level1), ("arithmetic:level=3", level3)):
        held_out = {q for q in space if is_held_out("arithmetic", q)}
        problems = get_task(name).make_problems(2000, EVAL_SEED, distinct=True)
        questions = [p.question for p in problems]
        assert len(questions) == len(set(questions))                     # no repeats
        assert set(questions) == held_out                                 # all of them, and only held-out ones
    assert len({q for q in level1 if is_held_out("arithmetic", q)}) == 12
    # a large space gives exactly n, deterministically; independent draws of a small space repeat
    first = get_task("arithmetic:level=2").make_problems(500, EVAL_SEED, distinct=True)
    assert len({p.question for p in first}) == 500
    assert [p.question for p in get_task("arithmetic:level=2").make_problems(500, EVAL_SEED, distinct=True)] == \
        [p.question for p in first]
    repeated = get_task("arithmetic:level=1").make_problems(100, EVAL_SEED)
    assert len(repeated) == 100 and len({p.question for p in repeated}) == 12


def test_evaluation_prompts_are_distinct():
    from minitrain.eval.task_eval import held_out_prompts
    from minitrain.model.checkpoint import load_tokenizer
    from minitrain import REPO_ROOT
    tokenizer = load_tokenizer(f"{REPO_ROOT}/dataset/tokenizer")
    _, problems, prompts = held_out_prompts(tokenizer, "arithmetic:level=1", 50)
    assert len(problems) == len(prompts) == 12 == len({p.question for p in problems})
