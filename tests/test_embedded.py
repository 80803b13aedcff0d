# Run: pytest tests/test_embedded.py   (all slow: they build the embedded data, which starts a subprocess)
# The embedded data (dataset/embedded.py): byte-identical on every build, well-formed rows in every file, answers
# that the task checkers accept, only missing or stale files rebuilt, documentation independent of what the calling
# process imported, and the CLI's one-line error.
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from minitrain.dataset.embedded import FILES, EmbeddedConfig, documentation, ensure_embedded_data, read_documentation
from minitrain.eval.tasks import Problem, extract_answer, get_task, score_row

REPO = Path(__file__).resolve().parents[1]
SMALL = EmbeddedConfig(pretrain_task_docs=20, midtrain_rows=30, midtrain_doc_rows=10, sft_task_rows=40,
                       sft_chat_rows=10, dpo_rows=30, rlaif_rows=30, rlaif_level4_rows=5,
                       rlaif_level2_rows=5)
pytestmark = pytest.mark.slow   # every test builds the embedded data, which starts a subprocess


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    return ensure_embedded_data(str(tmp_path_factory.mktemp("embedded")))


def test_two_builds_are_byte_identical_and_the_manifest_is_true(default_data, tmp_path):
    again = ensure_embedded_data(str(tmp_path / "again"))
    manifest = json.load(open(os.path.join(os.path.dirname(default_data["sft"]), "manifest.json")))
    assert set(manifest["files"]) == set(FILES) and manifest["version"] >= 1
    for name in FILES:
        first, second = Path(default_data[name]).read_bytes(), Path(again[name]).read_bytes()
        assert first == second, name
        entry = manifest["files"][name]
        assert entry["sha256"] == hashlib.sha256(first).hexdigest() and entry["bytes"] == len(first)
        assert entry["rows"] == first.count(b"\n")
    sizes = {name: os.path.getsize(path) for name, path in default_data.items()}
    # pretrain: ~2.5 MB of documentation and code plus ~6.5 MB of task documents (worked problems, mostly in chat
    # form); small enough to build and tokenize in a minute on CPU
    assert 6e6 < sizes["pretrain"] < 12e6 and sizes["midtrain"] < 4e6


def test_text_files(default_data):
    for name in ("pretrain", "midtrain"):
        rows = read_rows(default_data[name])
        assert len(rows) > 1000 and all(set(r) == {"text"} and isinstance(r["text"], str) and r["text"] for r in rows)
        text = "\n".join(r["text"] for r in rows)
        assert " at 0x" not in text and "<|endoftext|>" not in text
        assert sys.executable not in text and sys.base_prefix not in text      # this machine's paths: not portable
    pretrain = "\n".join(r["text"] for r in read_rows(default_data["pretrain"]))
    for expected in ("json.dumps(", "Module collections", "The \"assert\" statement", "Question: What is ",
                     "<think>", "<answer>"):
        assert expected in pretrain, expected
    midtrain = [r["text"] for r in read_rows(default_data["midtrain"])]
    chats = [t for t in midtrain if t.startswith("<|im_start|>")]
    assert len(chats) > 1000 and all(t.count("<|im_start|>") == t.count("<|im_end|>") for t in chats)


def answer_is_right(question: str, answer: str) -> bool:
    """Check a task answer from the question text alone, without the task's stored answer."""
    if question.startswith("What is "):
        return answer == str(eval(question[len("What is "):-1]))          # Python's own arithmetic
    if question.startswith("Sort from smallest to largest: "):
        return answer.split() == [str(n) for n in sorted(int(x) for x in question.split(": ")[1].split())]
    if question.startswith("Assign 0 or 1"):
        values = {int(v): int(b) for v, b in re.findall(r"x(\d+)=([01])", answer)}
        clauses = [[(int(v), sign != "~") for sign, v in re.findall(r"(~?)x(\d+)", c)]
                   for c in re.findall(r"\(([^)]*)\)", question.split("\n")[1])]
        return all(any((values[v] == 1) == positive for v, positive in c) for c in clauses)
    numbers, target = re.fullmatch(r"Use ([\d ]+) once each with \+ - \* / and parentheses to make (\d+)\.",
                                   question).groups()
    problem = Problem("countdown", "", question, "", {"numbers": [int(n) for n in numbers.split()],
                                                      "target": int(target)})
    return get_task("countdown").check_answer(problem, answer) == 1.0


def test_sft_rows(default_data):
    rows = read_rows(default_data["sft"])
    assert 3000 <= len(rows) <= 6000
    system = multi_turn = doc_chats = 0
    task_turns = Counter()
    for row in rows:
        messages = row["messages"]
        assert set(row) == {"messages"} and all(set(m) == {"role", "content"} for m in messages)
        roles = [m["role"] for m in messages]
        if roles[0] == "system":
            system += 1
            roles, messages = roles[1:], messages[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
        multi_turn += len(roles) > 2
        for user, assistant in zip(messages[::2], messages[1::2]):
            answer = extract_answer(assistant["content"])
            if answer is None:
                doc_chats += 1
                assert user["content"].split()[0] in ("What", "Explain") and assistant["content"].endswith(".")
                continue
            assert assistant["content"].startswith("<think>") and answer_is_right(user["content"], answer)
            task_turns[user["content"].split()[0]] += 1
    assert system > 300 and multi_turn > 300 and doc_chats >= 300
    assert task_turns["What"] > 2000 and min(task_turns[w] for w in ("Assign", "Sort", "Use")) > 200


def test_dpo_rows(default_data):
    rows = read_rows(default_data["dpo"])
    assert len(rows) == 2000
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"} and all(isinstance(v, str) and v for v in row.values())
        chosen, rejected = extract_answer(row["chosen"]), extract_answer(row["rejected"])
        assert chosen is not None and rejected is not None and chosen != rejected
        if row["prompt"].startswith("What is "):
            assert chosen == str(eval(row["prompt"][len("What is "):-1])) and abs(int(rejected) - int(chosen)) <= 10


def test_rlaif_rows_are_verifiable(default_data):
    rows = read_rows(default_data["rlaif"])
    assert len(rows) == 2000 and len({r["task"].split(":")[0] for r in rows}) == 4
    for row in rows:
        assert set(row) == {"prompt", "answer", "task", "id", "meta"}
        assert score_row(row, f"<think>.</think>\n<answer>{row['answer']}</answer>") == 1.0
        assert score_row(row, "<answer>not it</answer>") == 0.0
    assert sum(r["task"].startswith("arithmetic") for r in rows) > len(rows) / 2
    for name, level, count in (("rlaif_level4", 4, 1500), ("rlaif_level2", 2, 2000)):
        level_rows = read_rows(default_data[name])
        assert len(level_rows) == count and {r["task"] for r in level_rows} == {f"arithmetic:level={level}"}
        prompts = [r["prompt"] for r in level_rows]
        assert len(set(prompts)) == count and not set(prompts) & {r["prompt"] for r in rows}   # distinct, none in rlaif
        for row in level_rows[:100]:
            assert set(row) == {"prompt", "answer", "task", "id", "meta"} and row["meta"]["level"] == level
            assert score_row(row, f"<think>.</think>\n<answer>{row['answer']}</answer>") == 1.0


def test_only_missing_or_stale_files_are_rebuilt(tmp_path):
    root = tmp_path / "data"
    paths = ensure_embedded_data(str(root), SMALL)
    stamps = {name: os.stat(path).st_mtime_ns for name, path in paths.items()}
    ensure_embedded_data(str(root), SMALL)
    assert {name: os.stat(path).st_mtime_ns for name, path in paths.items()} == stamps      # nothing rewritten

    os.remove(paths["dpo"])
    changed = EmbeddedConfig(**{**vars(SMALL), "rlaif_rows": 31})
    ensure_embedded_data(str(root), changed)
    rebuilt = {name for name, path in paths.items() if os.stat(path).st_mtime_ns != stamps[name]}
    assert rebuilt == {"dpo", "rlaif", "rlaif_level4", "rlaif_level2"}      # the level files avoid rlaif's prompts
    assert len(read_rows(paths["rlaif"])) == 31
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["files"]["rlaif"]["rows"] == 31 and manifest["files"]["dpo"]["rows"] == 30
    assert not [p for p in os.listdir(root) if p.endswith(".tmp")]                  # no temporary files left

    ensure_embedded_data(str(root), changed, force=True)
    assert all(os.stat(path).st_mtime_ns != stamps[name] for name, path in paths.items() if name != "dpo")


def test_documentation_does_not_depend_on_what_the_caller_imported(monkeypatch):
    # Libraries patch the standard library (torch replaces inspect.getfile): the child interpreter never sees that.
    monkeypatch.setattr(inspect, "getfile", lambda obj: "patched")
    in_process = {entry.title for entry in read_documentation()}
    fresh = {entry.title for entry in documentation()}
    assert "inspect.getfile" in fresh and "inspect.getfile" not in in_process
    assert len(fresh) > 1000 and {"json.dumps", "module json", "topic assert"} <= fresh


def test_cli_builds_and_rejects_bad_counts(tmp_path):
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "minitrain.dataset.embedded", "--out", str(out), "--sft_task_rows", "5",
                          "--rlaif_rows", "7"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(read_rows(str(out / "rlaif.jsonl"))) == 7 and "rlaif.jsonl: 7 rows" in run.stdout
    run = subprocess.run([sys.executable, "-m", "minitrain.dataset.embedded", "--out", str(tmp_path / "bad"), "--dpo_rows", "-1"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "dpo_rows" in run.stderr and run.stderr.strip().count("\n") == 0
    assert not (tmp_path / "bad").exists()
