# Run: pytest tests/test_evaluate_cli.py   (without the script subprocesses and the slower model runs: -m "not slow")
# Task evaluation end to end: evaluate_tasks with a scripted generator (known right/wrong answers, so accuracy,
# interval, pass@k and the aggregate have exact expected values); the evaluation prompt is the chat format of the
# training data; eval/evaluate.py on a tiny random checkpoint writes the JSON with every key and self-consistent
# numbers, batched answers equal one-at-a-time generation, an --adapter changes the answers; bad input (flags, model
# directories, output paths, result files) is one line with exit status 2; eval/compare.py on hand-made result files
# gets the table, dominance and frontier right.
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minitrain.eval import compare, evaluate, task_eval
from minitrain.eval.stats import jeffreys_interval, pass_at_k
from minitrain.eval.task_eval import evaluate_tasks, task_metrics
from minitrain.eval.tasks import EVAL_SEED, TASK_NAMES, get_task, training_seed
from minitrain.model.checkpoint import load_model, load_tokenizer, save_checkpoint
from minitrain.model.config import load_model_config
from minitrain.model.generate import GenerationOutput, generate
from minitrain.model.transformer import CausalLM
from conftest import cli_error

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"accuracy", "num_samples", "ci80", "mean", "std", "median", "success_rate"}


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(REPO / "dataset" / "tokenizer"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_checkpoint(CausalLM(load_model_config("tiny")), tokenizer, str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# evaluate_tasks with scripted answers
# ---------------------------------------------------------------------------------------------------------------

class ScriptedGenerator:
    """Stands in for model.generate.generate: problem i of a task gets i % (K + 1) right answers among its K samples
    (the first ones), the others a near miss; right answers end with EOS, wrong ones do not."""

    def __init__(self, tokenizer, tasks: dict[str, int], samples_per_problem: int):
        self.tokenizer, self.k, self.batches = tokenizer, samples_per_problem, []
        self.by_prompt, self.seen = {}, {}
        for name, n in tasks.items():
            task = get_task(name)
            for i, problem in enumerate(task.make_problems(n, EVAL_SEED)):
                key = tuple(tokenizer.chat_prompt_ids(problem.messages()))
                assert key not in self.by_prompt, "scripted answers need distinct prompts"
                self.by_prompt[key] = (task, problem, i % (samples_per_problem + 1))

    def __call__(self, model, prompts, max_new_tokens, eos_token_id=None, pad_token_id=0, **sampling):
        self.batches.append(len(prompts))
        assert eos_token_id == self.tokenizer.eos_id and pad_token_id == self.tokenizer.pad_id
        completions, finished = [], []
        for prompt in prompts:
            task, problem, right = self.by_prompt[tuple(prompt)]   # KeyError: not a held-out problem's chat prompt
            sample = self.seen.get(tuple(prompt), 0)
            self.seen[tuple(prompt)] = sample + 1
            if sample < right:
                ids = self.tokenizer.encode(task.reference_response(problem)) + [eos_token_id]
            else:
                ids = self.tokenizer.encode(task.wrong_response(problem, random.Random(sample)))
            completions.append(ids)
            finished.append(sample < right)
        return GenerationOutput(completions=completions, finished=finished)


def test_evaluate_tasks_statistics_from_scripted_answers(monkeypatch, tokenizer):
    n, k = 10, 3
    scripted = ScriptedGenerator(tokenizer, {"sort": n, "sat": n}, k)
    monkeypatch.setattr(task_eval, "generate", scripted)
    model = CausalLM(load_model_config("tiny")).train()
    results = evaluate_tasks(model, tokenizer, ["sort", "sat"], n, samples_per_problem=k, temperature=1.0,
                             batch_size=7, task_weights={"sort": 3, "sat": 1})
    assert model.training                                       # given back in the mode it came in
    assert max(scripted.batches) <= 7 and sum(scripted.batches) == 2 * n * k
    right = [i % (k + 1) for i in range(n)]                     # right answers per problem: 0 1 2 3 0 1 2 3 0 1
    accuracy = sum(right) / (n * k)
    for name in ("sort", "sat"):
        s = results[name]
        assert SUMMARY_KEYS <= set(s)
        assert s["accuracy"] == pytest.approx(accuracy) and s["mean"] == pytest.approx(accuracy)
        assert s["success_rate"] == pytest.approx(accuracy)     # near misses score 0
        assert s["num_samples"] == n and s["num_completions"] == n * k and s["num_correct"] == sum(right)
        assert s["distinct_problems"] == n
        assert s["finished_rate"] == pytest.approx(accuracy)
        lo, hi = jeffreys_interval(sum(right) / k, n - sum(right) / k)
        assert s["ci80"] == pytest.approx([lo, hi], rel=1e-12)
        for kk in (1, 2, 3):
            assert s[f"pass@{kk}"] == pytest.approx(sum(pass_at_k(k, c, kk) for c in right) / n)
        assert s["pass@3"] == pytest.approx(sum(c > 0 for c in right) / n)
    agg = results["aggregate"]
    assert agg["accuracy"] == pytest.approx(accuracy) and agg["weights"] == {"sort": 0.75, "sat": 0.25}
    assert task_metrics(results) == {"eval/sort/accuracy": pytest.approx(accuracy),
                                     "eval/sat/accuracy": pytest.approx(accuracy),
                                     "eval/aggregate/accuracy": pytest.approx(accuracy)}
    assert task_metrics(results, prefix="", fields=("pass@2",)) == {
        "sort/pass@2": results["sort"]["pass@2"], "sat/pass@2": results["sat"]["pass@2"]}


def test_evaluate_tasks_rejects_bad_settings_before_generating(monkeypatch, tokenizer):
    def no_generation(*args, **kwargs):
        raise AssertionError("generated despite bad settings")
    monkeypatch.setattr(task_eval, "generate", no_generation)
    model = CausalLM(load_model_config("tiny"))
    for kwargs, match in [({"num_samples": 0}, "num_samples"), ({"samples_per_problem": 2}, "temperature > 0"),
                          ({"max_new_tokens": 1000}, "max_position_embeddings"), ({"top_p": 0.0}, "top_p"),
                          ({"eval_seed": 1_000_000}, "eval_seed"),
                          ({"task_weights": {"sat": 1.0}}, "no weight for: sort")]:
        settings = {"num_samples": 2, **kwargs}
        with pytest.raises(ValueError, match=match):
            evaluate_tasks(model, tokenizer, ["sat", "sort"], **settings)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_tasks(model, tokenizer, ["sat", "nope"], 2)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_eval_prompt_is_the_chat_format_of_the_training_data(tokenizer, name):
    """The prompt evaluation generates from is exactly the start of a training conversation on the same kind of
    problem (dataset/embedded.py: user turn = problem.question, assistant turn = reference_response), and the
    tokens training supervises (the assistant mask) are the reference response and <|im_end|>, which score 1.0."""
    task = get_task(name)
    for problem in task.make_problems(3, training_seed(0)):
        ids, mask = tokenizer.render_chat(problem.messages() + [
            {"role": "assistant", "content": task.reference_response(problem)}])
        prompt = tokenizer.chat_prompt_ids(problem.messages())
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
        supervised = [t for t, m in zip(ids, mask) if m]
        assert ids[len(prompt):len(prompt) + len(supervised)] == supervised and supervised[-1] == tokenizer.eos_id
        assert tokenizer.decode(supervised) == task.reference_response(problem)
        assert task.score(problem, tokenizer.decode(supervised)) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# eval/evaluate.py on a real tiny checkpoint
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_cli_writes_consistent_json(tmp_path, tiny_checkpoint):
    out, samples = tmp_path / "result.json", tmp_path / "samples.jsonl"
    r = run_script("eval/evaluate.py", "--model", tiny_checkpoint, "--tasks", "arithmetic,sat", "--num_samples", "6",
                   "--samples_per_problem", "2", "--temperature", "1.0", "--max_new_tokens", "8", "--batch_size", "5",
                   "--task_weights", "arithmetic=1,sat=3", "--device", "cpu", "--json", str(out),
                   "--samples_jsonl", str(samples))
    assert r.returncode == 0, r.stderr
    assert "80% interval" in r.stdout and "pass@2" in r.stdout and "arithmetic" in r.stdout
    report = json.loads(out.read_text())
    assert report["model"] == tiny_checkpoint and report["adapter"] is None
    assert report["settings"]["tasks"] == ["arithmetic", "sat"] and report["settings"]["temperature"] == 1.0
    assert report["settings"]["samples_per_problem"] == 2 and report["settings"]["max_new_tokens"] == 8
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 2 * 6 * 2
    for name in ("arithmetic", "sat"):
        s = report["tasks"][name]
        assert SUMMARY_KEYS | {"pass@1", "pass@2"} <= set(s)
        assert s["num_samples"] == 6 and s["num_completions"] == 12
        scores = [row["score"] for row in rows if row["task"] == name]
        assert len(scores) == 12 and s["num_correct"] == sum(score == 1.0 for score in scores)
        assert s["accuracy"] == pytest.approx(s["num_correct"] / 12)
        assert s["mean"] == pytest.approx(sum(scores) / 12) and s["success_rate"] == pytest.approx(
            sum(score > 0 for score in scores) / 12)
        assert s["pass@1"] == pytest.approx(s["accuracy"])
        assert s["ci80"][0] < s["accuracy"] < s["ci80"][1] or s["accuracy"] in (0.0, 1.0)
        per_problem = {}
        for row in rows:
            if row["task"] == name:
                per_problem.setdefault(row["id"], []).append(row["score"] == 1.0)
        successes = sum(sum(v) / 2 for v in per_problem.values())
        assert s["ci80"] == pytest.approx(list(jeffreys_interval(successes, 6 - successes)), rel=1e-12)
        held_out = [p.id for p in get_task(name).make_problems(6, EVAL_SEED)]
        assert sorted(per_problem) == sorted(held_out)
    agg = report["aggregate"]
    t = report["tasks"]
    assert agg["accuracy"] == pytest.approx(0.25 * t["arithmetic"]["accuracy"] + 0.75 * t["sat"]["accuracy"])
    assert agg["weights"] == {"arithmetic": 0.25, "sat": 0.75}


@pytest.mark.slow
def test_batched_greedy_answers_equal_one_at_a_time_generation(tiny_checkpoint, tokenizer):
    model, tok = load_model(tiny_checkpoint)
    results = evaluate_tasks(model, tok, ["sort", "countdown"], 3, max_new_tokens=6, batch_size=4,
                             keep_samples=True)
    for name in ("sort", "countdown"):
        problems = get_task(name).make_problems(3, EVAL_SEED)
        for problem, row in zip(problems, results[name]["samples"]):
            alone = generate(model, [tok.chat_prompt_ids(problem.messages())], 6, temperature=0,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id).completions[0]
            assert row["id"] == problem.id and row["completion"] == tok.decode(alone)


def test_evaluate_compile_flag_reaches_every_generate_call_and_the_settings(tmp_path, tiny_checkpoint, monkeypatch):
    seen = []

    def recording_generate(model, prompts, max_new_tokens, **kwargs):
        seen.append(kwargs["compiled"])
        return GenerationOutput(completions=[[5] for _ in prompts], finished=[True] * len(prompts))

    monkeypatch.setattr(task_eval, "generate", recording_generate)
    args = ["--model", tiny_checkpoint, "--tasks", "sort", "--num_samples", "5", "--batch_size", "2", "--device", "cpu"]
    assert evaluate.main(args)["settings"]["compiled"] is False and seen == [False] * 3
    seen.clear()
    assert evaluate.main(args + ["--compile"])["settings"]["compiled"] is True and seen == [True] * 3


@pytest.mark.slow
def test_evaluate_with_adapter_answers_with_the_adapted_model(tmp_path, tiny_checkpoint, tokenizer):
    from minitrain.model.lora import LoRAConfig, apply_lora, lora_layers, save_adapter
    model, tok = load_model(tiny_checkpoint)
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 2.0)            # B = 0 at init would leave the answers unchanged
    save_adapter(model, tok, str(tmp_path / "adapter"))
    args = ["--model", tiny_checkpoint, "--tasks", "sort", "--num_samples", "3", "--max_new_tokens", "6",
            "--device", "cpu"]
    base = tmp_path / "base.jsonl"
    adapted = tmp_path / "adapted.jsonl"
    evaluate.main(args + ["--samples_jsonl", str(base)])
    report = evaluate.main(args + ["--adapter", str(tmp_path / "adapter"), "--samples_jsonl", str(adapted)])
    assert report["adapter"] == str(tmp_path / "adapter")
    base_rows = [json.loads(line) for line in base.read_text().splitlines()]
    adapted_rows = [json.loads(line) for line in adapted.read_text().splitlines()]
    problems = get_task("sort").make_problems(3, EVAL_SEED)
    for problem, row in zip(problems, adapted_rows):
        ids = generate(model.eval(), [tok.chat_prompt_ids(problem.messages())], 6, temperature=0,
                       eos_token_id=tok.eos_id, pad_token_id=tok.pad_id).completions[0]
        assert row["completion"] == tok.decode(ids)
    assert [r["completion"] for r in base_rows] != [r["completion"] for r in adapted_rows]


def test_adapter_without_lora_module_is_a_clear_error(monkeypatch, tmp_path, tiny_checkpoint):
    monkeypatch.setitem(sys.modules, "minitrain.model.lora", None)      # as in a build without model/lora.py
    with pytest.raises(evaluate.UsageError, match=r"^--adapter needs model/lora.py \(LoRA support\), not available"):
        evaluate.main(["--model", tiny_checkpoint, "--adapter", str(tmp_path), "--tasks", "sat", "--device", "cpu"])


@pytest.mark.slow
def test_evaluate_bad_input_is_one_line_exit_2(tmp_path, tiny_checkpoint):
    r = run_script("eval/evaluate.py", "--model", str(tmp_path / "missing"), "--tasks", "sat")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"--model {tmp_path / 'missing'}: model directory not found" in r.stderr
    cases = [
        (["--tasks", "arithmetic,nope"], "--tasks arithmetic,nope: unknown task 'nope'"),
        (["--tasks", "sat:colour=3"], "bad option 'colour=3'"),
        (["--tasks", "sat", "--num_samples", "0"], "--num_samples must be >= 1"),
        (["--tasks", "sat", "--num_samples", "many"], "--num_samples: invalid int value"),
        (["--tasks", "sat", "--samples_per_problem", "4"], "--samples_per_problem 4 needs --temperature > 0"),
        (["--tasks", "sat", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--tasks", "sat,sort", "--task_weights", "sat=2"], "--task_weights: no weight for sort"),
        (["--tasks", "sat", "--task_weights", "sat=-2"], "--task_weights: 'sat=-2' is not task=weight"),
        (["--tasks", "sat", "--json", str(tmp_path / "no" / "dir.json")], "--json"),
        (["--tasks", "sat", "--max_new_tokens", "5000"], "--max_new_tokens 5000: the longest prompt"),
        (["--tasks", "sat", "--eval_seed", "1000000"], "--eval_seed must be in [0, 1000000)"),
    ]
    for extra, message in cases:
        with pytest.raises(evaluate.UsageError) as error:
            evaluate.main(["--model", tiny_checkpoint, "--device", "cpu", *extra])
        assert message in str(error.value) and "\n" not in str(error.value), (extra, str(error.value))
    assert not (tmp_path / "no").exists()


def test_evaluate_bad_model_dir_and_output_paths(tmp_path, tiny_checkpoint, capsys):
    def broken(name: str, change) -> str:
        path = tmp_path / name
        shutil.copytree(tiny_checkpoint, path)
        change(path)
        return str(path)

    def retype_hidden_size(path):
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))

    cases = [
        (broken("badjson", lambda p: (p / "config.json").write_text('{"hidden_size": 64,')),
         ["badjson/config.json: line 1: not valid JSON"]),
        (broken("badtype", retype_hidden_size), ["badtype/config.json: field 'hidden_size' must be int"]),
        (broken("noweights", lambda p: (p / "model.safetensors").unlink()), ["no model.safetensors"]),
        (broken("badweights", lambda p: (p / "model.safetensors").write_bytes(b"garbage")),
         ["badweights: a safetensors weights file is unreadable"]),
        (broken("notokenizer", lambda p: (p / "tokenizer.json").unlink()), ["notokenizer/tokenizer.json"]),
    ]
    for model, messages in cases:
        err = cli_error(evaluate.cli, ["--model", model, "--tasks", "sat", "--num_samples", "1",
                                            "--device", "cpu"], capsys)
        assert all(m in err for m in messages), err
    run = ["--model", tiny_checkpoint, "--device", "cpu", "--num_samples", "2", "--max_new_tokens", "2"]
    for extra, message in [
        (["--tasks", "sat", "--json", str(tmp_path)], f"--json {tmp_path}: is a directory"),
        (["--tasks", "sat", "--json", str(tmp_path / "r.json"), "--samples_jsonl", str(tmp_path / "r.json")],
         "--json and --samples_jsonl name the same file"),
        (["--tasks", "sort:length=2:max_value=1"],             # 4 possible questions, none of them held out
         "--tasks: task sort:length=2:max_value=1: could not draw 2 problems of the held-out partition"),
    ]:
        assert message in cli_error(evaluate.cli, run + extra, capsys)


# ---------------------------------------------------------------------------------------------------------------
# eval/compare.py
# ---------------------------------------------------------------------------------------------------------------

def result_file(path: Path, model: str, accuracies: dict[str, float], temperature: float = 0.0) -> str:
    tasks = {task: {"accuracy": a, "ci80": list(jeffreys_interval(a * 100, 100 - a * 100)), "num_samples": 100,
                    "mean": a, "std": 0.0, "median": 0.0, "success_rate": a} for task, a in accuracies.items()}
    path.write_text(json.dumps({"model": model, "adapter": None, "tasks": tasks, "aggregate": {},
                                "settings": {"num_samples": 100, "temperature": temperature}}))
    return str(path)


@pytest.mark.slow
def test_compare_table_dominance_and_frontier(tmp_path):
    a = result_file(tmp_path / "sft.json", "out/sft", {"arithmetic": 0.60, "sat": 0.30})
    b = result_file(tmp_path / "dpo.json", "out/dpo", {"arithmetic": 0.50, "sat": 0.30})      # dominated by sft
    c = result_file(tmp_path / "grpo.json", "out/grpo", {"arithmetic": 0.40, "sat": 0.70, "sort": 0.9},
                    temperature=0.7)                                                       # trade-off with sft
    out = tmp_path / "compare.json"
    r = run_script("eval/compare.py", a, b, c, "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "sft vs dpo: sft dominates dpo" in r.stdout
    assert "sft vs grpo: neither dominates" in r.stdout and "dpo vs grpo: neither dominates" in r.stdout
    assert "Pareto frontier: sft, grpo" in r.stdout
    lo, hi = jeffreys_interval(60, 40)
    assert f"0.600 [{lo:.3f}, {hi:.3f}]" in r.stdout
    assert "not judged, missing from some files: sort" in r.stdout and "temperature" in r.stdout
    c_json = json.loads(out.read_text())
    assert c_json["dominates"] == [["sft", "dpo"]] and c_json["frontier"] == ["sft", "grpo"]
    assert c_json["tasks"] == ["arithmetic", "sat", "sort"] and c_json["common_tasks"] == ["arithmetic", "sat"]
    assert c_json["table"]["grpo"]["sat"]["accuracy"] == 0.7 and "sort" not in c_json["table"]["sft"]
    assert c_json["models"]["dpo"]["model"] == "out/dpo"
    assert c_json["differing_settings"] == {"temperature": {"sft": 0.0, "dpo": 0.0, "grpo": 0.7}}
    named = compare.main([a, b, "--names", "first,second"])
    assert named["dominates"] == [["first", "second"]] and named["frontier"] == ["first"]


@pytest.mark.slow
def test_compare_pairs_models_problem_by_problem(tmp_path):
    def with_scores(path, scores: dict[str, dict[str, float]]):
        data = json.loads(Path(path).read_text())
        for task, per_problem in scores.items():
            data["tasks"][task]["per_problem"] = per_problem
        Path(path).write_text(json.dumps(data))
        return path

    # level=2: 10 problems; sft gets q0-q3 right, grpo gains q4-q9 and loses q0 -> +6/-1
    sft_l2 = {f"q{i}": float(i < 4) for i in range(10)}
    grpo_l2 = {f"q{i}": float(i >= 1) for i in range(10)}
    a = with_scores(result_file(tmp_path / "sft.json", "out/sft", {"l2": 0.4, "l3": 0.5}),
                    {"l2": sft_l2, "l3": {"x": 1.0, "y": 0.0}})
    b = with_scores(result_file(tmp_path / "grpo.json", "out/grpo", {"l2": 0.9, "l3": 0.5}),
                    {"l2": grpo_l2, "l3": {"x": 0.0, "y": 1.0}})
    c = result_file(tmp_path / "old.json", "out/old", {"l2": 0.5, "l3": 0.5})      # an older file: no scores
    result = compare.main([a, b, c])
    assert len(result["paired"]) == 1                                   # the pairs with old.json have no scores
    pair = result["paired"][0]
    assert (pair["before"], pair["after"]) == ("sft", "grpo")
    assert pair["tasks"]["l2"] == {"problems": 10, "gained": 6, "lost": 1, "p": pytest.approx(16 / 128)}
    assert pair["tasks"]["l3"] == {"problems": 2, "gained": 1, "lost": 1, "p": 1.0}
    assert pair["tasks"]["all"]["gained"] == 7 and pair["tasks"]["all"]["lost"] == 2   # pooled over both tasks
    r = run_script("eval/compare.py", a, b)
    assert "sft -> grpo" in r.stdout and "+6/-1 p=0.12" in r.stdout and "+7/-2" in r.stdout, r.stdout


@pytest.mark.slow
def test_compare_bad_input(tmp_path, capsys):
    good = result_file(tmp_path / "good.json", "m", {"sat": 0.5})
    (tmp_path / "broken.json").write_text('{"tasks": {"sat": {"accuracy": 0.5,')
    (tmp_path / "noacc.json").write_text('{"tasks": {"sat": {"ci80": [0.1, 0.2]}}}')
    r = run_script("eval/compare.py", good, str(tmp_path / "broken.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "broken.json: line 1: not valid JSON" in r.stderr
    for argv, message in [([good, str(tmp_path / "noacc.json")], "noacc.json: field 'tasks.sat.accuracy'"),
                          ([good, str(tmp_path / "missing.json")], "missing.json: file not found"),
                          ([good], "at least two result files"),
                          ([good, good, "--names", "x"], "--names: need 2 distinct")]:
        with pytest.raises(compare.UsageError, match=message.replace(".", r"\.").replace("(", r"\(")):
            compare.main(argv)
    for name, change, message in [
        ("settings.json", {"settings": [1]}, "field 'settings' must be an object"),
        ("model.json", {"model": 3}, "field 'model' must be a path or null"),
        ("bool.json", {"tasks": {"sat": {"accuracy": True, "ci80": [0.1, 0.9]}}}, "field 'tasks.sat.accuracy'"),
        ("inverted.json", {"tasks": {"sat": {"accuracy": 0.5, "ci80": [0.9, 0.1]}}}, "field 'tasks.sat.ci80'"),
        ("nan.json", {"tasks": {"sat": {"accuracy": 0.5, "ci80": [math.nan, 0.9]}}}, "field 'tasks.sat.ci80'"),
    ]:
        (tmp_path / name).write_text(json.dumps({**json.loads(Path(good).read_text()), **change}))
        assert f"{name}: {message}" in cli_error(compare.cli, [good, str(tmp_path / name)], capsys)
    assert f"{tmp_path}: is a directory" in cli_error(compare.cli, [good, str(tmp_path)], capsys)
    assert "--json" in cli_error(compare.cli, [good, good, "--names", "a,b", "--json", str(tmp_path)], capsys)
    assert compare.cli([good, good, "--names", "a,b"]) == 0
