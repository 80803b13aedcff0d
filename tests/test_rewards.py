# Run: pytest tests/test_rewards.py
# Reward functions (trainer/rewards.py): exact answers through the task checkers, the format reward, the partial-credit
# tiers and each task's closeness, the length penalty, combining several with weights, and loading module:function.
import pytest

from minitrain.trainer.rewards import CombinedReward, RewardError, load_reward, parse_reward_flags
from minitrain.eval.tasks import EVAL_SEED, get_task


def columns(task_name: str, count: int = 3):
    """(prompts, rows as column lists) of held-out problems of a task, as the RL trainers pass them."""
    problems = get_task(task_name).make_problems(count, EVAL_SEED)
    rows = {"task": [p.task for p in problems], "answer": [p.answer for p in problems], "id": [p.id for p in problems],
            "meta": [p.meta for p in problems]}
    return [p.question for p in problems], rows, problems


def answer(text: str, think: str = "x") -> str:
    return f"<think>{think}</think>\n<answer>{text}</answer>"


def test_exact_answer_uses_the_task_checkers():
    prompts, rows, problems = columns("arithmetic")
    right = [answer(p.answer) for p in problems]
    wrong = [answer(str(int(p.answer) + 1)) for p in problems]
    reward = load_reward("exact_answer")
    assert reward(prompts, right, **rows) == [1.0, 1.0, 1.0]
    assert reward(prompts, wrong, **rows) == [0.0, 0.0, 0.0]
    assert reward(prompts, [p.answer for p in problems], **rows) == [0.0, 0.0, 0.0]   # no answer tag


def test_format_reward():
    reward = load_reward("format")
    assert reward([""] * 4, ["<think>a</think> <answer>1</answer>", "<answer>1</answer>", "1",
                             "<think>a</think><answer>1</answer> trailing"], ) == [1.0, 0.5, 0.0, 0.5]


def test_tiers_of_partial_credit():
    prompts, rows, problems = columns("arithmetic:level=2", 1)
    value = int(problems[0].answer)
    assert value >= 10
    completions = [answer(str(value)),                       # perfect
                   answer(str(value + max(1, value // 20))),  # within 10%: near
                   answer(str(value * 3 + 50)),               # an integer, far off: partial
                   answer("forty-two"),                      # an answer tag, not an integer: attempted
                   "<think>thinking</think>",                # a think part, no answer: attempted
                   "no idea"]                                # wrong
    reward = load_reward("tiered")
    assert reward(prompts * 6, completions, **{k: v * 6 for k, v in rows.items()}) == [1.0, 0.6, 0.3, 0.1, 0.1, 0.0]


def test_closeness_of_each_task():
    arithmetic = get_task("arithmetic")
    problem = arithmetic.make_problems(1, EVAL_SEED)[0]
    right = int(problem.answer)
    assert arithmetic.closeness(problem, str(right)) == 1.0
    assert arithmetic.closeness(problem, str(right + 1)) == pytest.approx(1 - 1 / max(1, abs(right)))
    assert arithmetic.closeness(problem, "x") is None

    sat = get_task("sat")
    problem = sat.make_problems(1, EVAL_SEED)[0]
    clauses = problem.meta["clauses"]
    flipped = " ".join(f"x{i}={1 - int(v)}" for i, v in
                       (item[1:].split("=") for item in problem.answer.split()))
    values = {int(i): 1 - int(v) for i, v in (item[1:].split("=") for item in problem.answer.split())}
    satisfied = sum(any((values[abs(lit)] == 1) == (lit > 0) for lit in clause) for clause in clauses)
    assert sat.closeness(problem, flipped) == pytest.approx(satisfied / len(clauses))
    assert sat.closeness(problem, "x1=1") is None

    sort = get_task("sort:length=4")
    problem = sort.make_problems(1, EVAL_SEED)[0]
    numbers = problem.answer.split()
    swapped = " ".join([numbers[1], numbers[0]] + numbers[2:])
    assert sort.closeness(problem, swapped) == (0.5 if numbers[0] != numbers[1] else 1.0)
    assert sort.closeness(problem, " ".join(numbers[:3])) == 0.0

    countdown = get_task("countdown")
    problem = countdown.make_problems(1, EVAL_SEED)[0]
    assert countdown.closeness(problem, problem.answer) == 1.0
    target = problem.meta["target"]
    numbers = problem.meta["numbers"]
    total = sum(numbers)
    assert countdown.closeness(problem, " + ".join(map(str, numbers))) == pytest.approx(
        max(0.0, 1 - abs(total - target) / max(1, abs(target))))
    assert countdown.closeness(problem, "1 + 1") == 0.0           # other numbers


def test_length_penalty():
    reward = load_reward("length_penalty")
    assert reward(["", "", ""], ["a" * 100, "a" * 600, "a" * 5000]) == [0.0, -0.5, -1.0]


def double_length(prompts, completions, **rows):   # a user reward, loaded as test_rewards:double_length
    return [2.0 * len(c) for c in completions]


def test_combined_rewards_weigh_and_keep_each_function():
    prompts, rows, problems = columns("arithmetic", 2)
    completions = [answer(problems[0].answer), "<answer>nonsense</answer>"]
    reward = parse_reward_flags("exact_answer, format, test_rewards:double_length", "1, 0.5, 0.01")
    total, each = reward(prompts, completions, rows)
    assert each["exact_answer"] == [1.0, 0.0] and each["format"] == [1.0, 0.5]
    assert total == pytest.approx([1.0 + 0.5 + 0.02 * len(completions[0]), 0.25 + 0.02 * len(completions[1])])


def returns_text(prompts, completions, **rows):
    return "text"


def test_reward_errors_name_the_reward():
    with pytest.raises(RewardError, match="reward 'nope': not a built-in"):
        load_reward("nope")
    with pytest.raises(RewardError, match="cannot import no_such_module"):
        load_reward("no_such_module:f")
    with pytest.raises(RewardError, match="has no function missing"):
        load_reward("test_rewards:missing")
    with pytest.raises(RewardError, match="2 reward functions but 1 weights"):
        CombinedReward(["format", "exact_answer"], [1.0])
    bad = CombinedReward(["test_rewards:returns_text"])      # returns a string, not a list of floats
    with pytest.raises(RewardError, match="returned str"):
        bad(["p"], ["c"], {})
    with pytest.raises(RewardError, match="needs prompt rows with fields"):
        load_reward("exact_answer")(["q"], ["c"])


def test_a_broken_reward_module_is_one_line_before_training(tmp_path, monkeypatch):
    """A SyntaxError in the module, an exception while importing it, and a function whose parameters cannot take
    (prompts, completions, **rows) are RewardErrors at load time, naming the file and line or the signature."""
    (tmp_path / "broken_syntax.py").write_text("def r(prompts, completions, **rows):\n    return [1.0 for c in\n")
    (tmp_path / "broken_import.py").write_text("raise RuntimeError('no GPU here')\n")
    (tmp_path / "wrong_args.py").write_text("def r(completion):\n    return [1.0]\n\n"
                                             "def no_rows(prompts, completions):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match=r"broken_syntax.py: line 2: syntax error"):
        load_reward("broken_syntax:r")
    with pytest.raises(RewardError, match=r"importing broken_import raised RuntimeError: no GPU here"):
        load_reward("broken_import:r")
    with pytest.raises(RewardError, match=r"signature r\(completion\) cannot be called as \(prompts, completions, "
                                          r"\*\*rows\): too many positional arguments"):
        load_reward("wrong_args:r")
    with pytest.raises(RewardError, match=r"signature no_rows\(prompts, completions\) .* takes no \*\*rows"):
        load_reward("wrong_args:no_rows")
