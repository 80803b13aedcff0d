# Run: pytest tests/test_data.py   (without the trainer subprocess: -m "not slow")
# The data layer: JSON/JSONL readers and their file:line:field errors, the row formats of each phase, the mixer
# (realised weights, upsampling, held-out rows, determinism, bad mixtures, malformed-row fractions), and the token
# cache (reuse, rebuild, packing).
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from minitrain.dataset import formats
from minitrain.dataset.jsonl import DataError, iter_rows, read_jsonl
from minitrain.dataset.mixer import format_summary, load_mixture, load_prepared, prepare_mixture, resolve_mixture, shares
from minitrain.dataset.pretokenize import PackedTokenDataset, build_token_cache
from minitrain.model.checkpoint import load_tokenizer
from minitrain.model.tokenizer import render_chat_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(REPO / "dataset" / "tokenizer"))


def write_rows(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def write_yaml(path, text) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


# ---- readers --------------------------------------------------------------------------------------------------

def test_jsonl_errors_name_file_line_and_field(tmp_path):
    good = write_rows(tmp_path / "good.jsonl", [{"text": "a"}, "", {"text": "b"}])
    assert read_jsonl(good, required={"text": str}) == [{"text": "a"}, {"text": "b"}]
    cases = [
        ([{"text": "a"}, '{"text": "b"'], "bad.jsonl: line 2: not valid JSON"),
        ([{"text": "a"}, {"txt": "b"}], "bad.jsonl: line 2: field 'text' is missing"),
        ([{"text": 3}], "bad.jsonl: line 1: field 'text' must be str, got int"),
        ([[1, 2]], "bad.jsonl: line 1: not a JSON object (a list)"),
    ]
    for rows, message in cases:
        bad = write_rows(tmp_path / "bad.jsonl", rows)
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_jsonl(bad, required={"text": str})
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: empty file"):
        read_jsonl(str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    with pytest.raises(DataError, match="blank.jsonl: empty file"):
        read_jsonl(str(tmp_path / "blank.jsonl"))
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_jsonl(str(tmp_path / "nope.jsonl"))


def test_json_array_rows_carry_the_line_they_start_on(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "a"},\n  {"text":\n    "b"},\n  7\n]\n')
    rows = list(iter_rows(str(path)))
    assert [(r.line, r.data) for r in rows] == [(2, {"text": "a"}), (3, {"text": "b"}), (5, None)]
    assert rows[2].problem == "not a JSON object (a int)"
    with pytest.raises(DataError, match="rows.json: line 5: not a JSON object"):
        read_jsonl(str(path))
    path.write_text('[{"text": "a"} {"text": "b"}]')
    with pytest.raises(DataError, match="rows.json: line 1: expected ',' or ']'"):
        list(iter_rows(str(path)))


# ---- formats --------------------------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("row", [
    {"messages": CHAT},
    {"conversations": [{"from": "human", "value": "What is 2+3?"}, {"from": "gpt", "value": "5"}]},
    {"conversations": CHAT},
    {"prompt": "What is 2+3?", "response": "5"},
    {"prompt": "What is 2+3?", "completion": "5"},
    {"text": "\n\nHuman: What is 2+3?\n\nAssistant: 5"},
])
def test_every_chat_shape_becomes_the_same_messages(row):
    assert formats.normalize_chat(row) == ({"messages": CHAT}, "")


def test_system_turns_and_multi_turn_are_kept():
    row = {"prompt": "q", "response": "a", "system": "be brief"}
    assert formats.normalize_chat(row)[0]["messages"][0] == {"role": "system", "content": "be brief"}
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4"
    assert [m["role"] for m in formats.normalize_chat({"text": hh})[0]["messages"]] == \
        ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("row, problem", [
    ({"messages": []}, "field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "field 'messages[0]' needs 'role' and 'content'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 5}]}, "'content' must be a string, got int"),
    ({"messages": [{"role": "user", "content": "q"}]}, "field 'messages' has no assistant turn"),
    ({"messages": [CHAT[0], {"role": "system", "content": "s"}, CHAT[1]]}, "a system turn may only come first"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown speaker 'alien'"),
    ({"prompt": "q", "response": 3}, "field 'response' must be a string"),
    ({"question": "q"}, "no conversation"),
])
def test_malformed_chat_rows_name_their_field(row, problem):
    canonical, got = formats.normalize_chat(row)
    assert canonical is None and problem in got


def test_preference_shapes():
    want = {"prompt": [CHAT[0]], "chosen": [CHAT[1]], "rejected": [{"role": "assistant", "content": "6"}]}
    assert formats.normalize_preference({"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"})[0] == want
    assert formats.normalize_preference({"prompt": [CHAT[0]], "chosen": [CHAT[1]],
                                         "rejected": [{"role": "assistant", "content": "6"}]})[0] == want
    assert formats.normalize_preference({"chosen": CHAT, "rejected": [CHAT[0], want["rejected"][0]]})[0] == want
    hh = {"chosen": "\n\nHuman: What is 2+3?\n\nAssistant: 5", "rejected": "\n\nHuman: What is 2+3?\n\nAssistant: 6"}
    assert formats.normalize_preference(hh)[0] == want
    assert "differ before their last assistant turn" in formats.normalize_preference(
        {"chosen": CHAT, "rejected": [{"role": "user", "content": "other"}, CHAT[1]]})[1]
    assert "hold the same answer" in formats.normalize_preference({"prompt": "q", "chosen": "a", "rejected": "a"})[1]
    assert "field 'rejected' is missing" in formats.normalize_preference({"prompt": "q", "chosen": "a"})[1]


def test_prompt_rows_keep_their_answer_and_drop_a_trailing_assistant_turn():
    row, _ = formats.normalize_prompt({"prompt": "What is 2+3?", "answer": "5", "task": "arithmetic"})
    assert row == {"messages": [CHAT[0]], "answer": "5", "task": "arithmetic"}
    assert formats.normalize_prompt({"messages": CHAT})[0] == {"messages": [CHAT[0]]}
    assert "missing" in formats.normalize_prompt({"answer": "5"})[1]


def test_text_phase_renders_chat_rows_as_chatml():
    assert formats.normalize_text({"text": "hello"}) == ({"text": "hello"}, "")
    assert formats.normalize_text({"messages": CHAT})[0] == {"text": render_chat_text(CHAT)[0]}
    assert "field 'text' is empty" in formats.normalize_text({"text": "  "})[1]
    assert "field 'text' is missing" in formats.normalize_text({"body": "x"})[1]


# ---- the mixer -------------------------------------------------------------------------------------------------

def text_source(tmp_path, name, count):
    return write_rows(tmp_path / f"{name}.jsonl", [{"text": f"{name} document {i}"} for i in range(count)])


def test_shares_round_to_the_total():
    assert shares([3, 1], 10) == [8, 2] and sum(shares([1, 1, 1], 100)) == 100 and shares([1], 7) == [7]


def test_mixture_realises_its_weights_upsamples_and_holds_out_disjoint_rows(tmp_path, tokenizer):
    big, small = text_source(tmp_path, "big", 400), text_source(tmp_path, "small", 50)
    config = write_yaml(tmp_path / "mix.yaml", f"""\
        phase: pretrain
        seed: 7
        validation_fraction: 0.1
        num_samples: 1000
        sources:
          - {{name: big, path: {big}, weight: 3}}
          - {{name: small, path: {small}, weight: 1}}
    """)
    mixture = load_mixture(config, "pretrain", seed=0)
    data = prepare_mixture(mixture, str(tmp_path / "prepared"), tokenizer)
    train = [json.loads(line) for line in open(data.train_file)]
    val = [json.loads(line) for line in open(data.val_file)]
    assert len(train) == 1000
    counts = Counter(r["source"] for r in train)
    assert counts == {"big": 750, "small": 250}                       # 3 : 1, exactly
    small_texts = Counter(r["text"] for r in train if r["source"] == "small")
    assert len(small_texts) == 45 and set(small_texts.values()) <= {5, 6}   # 45 pool rows, upsampled 250/45 times
    assert len(val) == 40 + 5                                          # 10% of each source
    assert not {r["text"] for r in val} & {r["text"] for r in train}   # held-out rows never trained on
    by_name = {s["name"]: s for s in data.summary["sources"]}
    assert by_name["small"]["realised_share"] == 0.25 and by_name["small"]["epochs_of_source"] == pytest.approx(250 / 45)
    assert by_name["big"]["train_tokens"] == sum(len(tokenizer.encode(r["text"])) for r in train
                                                 if r["source"] == "big")
    first = open(data.train_file, "rb").read()
    prepare_mixture(mixture, str(tmp_path / "prepared"), tokenizer)
    assert open(data.train_file, "rb").read() == first                 # deterministic bytes
    other_seed = prepare_mixture(dataclasses.replace(mixture, seed=8), str(tmp_path / "other"), tokenizer)
    assert open(other_seed.train_file, "rb").read() != first
    assert load_prepared(mixture, str(tmp_path / "prepared")).summary == data.summary


def test_max_samples_and_default_size(tmp_path):
    a, b = text_source(tmp_path, "a", 100), text_source(tmp_path, "b", 100)
    config = write_yaml(tmp_path / "mix.yaml", f"""\
        phase: midtrain
        validation_fraction: 0
        sources:
          - {{name: a, path: {a}, weight: 1, max_samples: 20}}
          - {{name: b, path: {b}, weight: 1}}
    """)
    data = prepare_mixture(load_mixture(config, "midtrain", seed=1), str(tmp_path / "p"))
    train = [json.loads(line) for line in open(data.train_file)]
    assert len(train) == 120 and data.val_file is None                 # default size: the rows available
    assert Counter(r["source"] for r in train) == {"a": 60, "b": 60}
    assert len({r["text"] for r in train if r["source"] == "a"}) == 20  # only 20 rows of a, each 3 times


def test_where_selects_rows_by_field_before_sampling(tmp_path):
    rows = [{"prompt": f"q{i}", "task": "arithmetic" if i % 2 else "sat", "meta": {"level": i % 4}}
            for i in range(40)]
    path = write_rows(tmp_path / "prompts.jsonl", rows)

    def prepared(where: str):
        config = write_yaml(tmp_path / "mix.yaml", f"""\
            phase: rlaif
            validation_fraction: 0
            sources: [{{name: p, path: {path}, weight: 1, where: {where}}}]
        """)
        data = prepare_mixture(load_mixture(config, "rlaif", 0), str(tmp_path / "prepared"))
        return [json.loads(line) for line in open(data.train_file)], data.summary

    train, summary = prepared("{meta.level: [1, 2]}")        # a nested field, a list of values
    assert sorted(int(r["messages"][0]["content"][1:]) for r in train) == [i for i in range(40) if i % 4 in (1, 2)]
    assert summary["sources"][0]["rows_selected"] == 20 and summary["sources"][0]["rows_available"] == 40
    assert "20 of 40 rows selected by where" in format_summary(summary)
    train, _ = prepared("{task: arithmetic, meta.level: 3}")  # every condition holds; a single value
    assert sorted(int(r["messages"][0]["content"][1:]) for r in train) == [i for i in range(40) if i % 4 == 3]
    with pytest.raises(DataError, match="where {'meta.level': \\['1'\\]} keeps none of the 40 rows"):
        prepared("{meta.level: ['1']}")                       # values compare as typed: '1' is not 1


@pytest.mark.parametrize("body, message", [
    ("phase: pretrain\nsources: []\n", "key 'sources' is empty"),
    ("phase: pretraining\nsources: [{name: a, path: A, weight: 1}]\n", "line 1: key 'phase': unknown phase"),
    ("phase: sft\nsources: [{name: a, path: A, weight: 1}]\n", "this mixture is for phase 'sft'"),
    ("phase: pretrain\nsources:\n  - name: a\n    path: A\n    weight: 0\n", "line 5: sources[0] key 'weight' must "
                                                                           "be a positive number"),
    ("phase: pretrain\nsources:\n  - name: a\n    path: A\n    weight: -2\n", "must be a positive number, got -2"),
    ("phase: pretrain\nsources:\n  - name: a\n    path: A\n    weight: heavy\n", "key 'weight' must be number"),
    ("phase: pretrain\nsources:\n  - name: a\n    path: nowhere.jsonl\n    weight: 1\n",
     "line 4: sources[0] key 'path': file nowhere.jsonl not found"),
    ("phase: pretrain\nsources:\n  - {name: a, path: A, weight: 1}\n  - {name: a, path: A, weight: 1}\n",
     "the name 'a' is used twice"),
    ("phase: pretrain\nsources:\n  - {name: a, weight: 1}\n", "give exactly one of 'path' and 'embedded'"),
    ("phase: pretrain\nsources:\n  - {name: a, embedded: wiki, weight: 1}\n", "unknown embedded file 'wiki'"),
    ("phase: pretrain\nshuffle: true\nsources: []\n", "line 2: key 'shuffle' is unknown"),
    ("phase: pretrain\nsources:\n  - name: a\n    path: A\n    weight: 1\n    where: {}\n",
     "line 6: sources[0] key 'where' is empty"),
    ("phase: pretrain\nsources:\n  - name: a\n    path: A\n    weight: 1\n    where: {meta: {level: 2}}\n",
     "line 6: sources[0] key 'where': 'meta': {'level': 2} must map a field name to a value or a list"),
    ("phase: pretrain\nsources:\n  - name: a\n    path: A\n    weight: 1\n    where: task\n",
     "line 6: sources[0] key 'where' must be dict"),
    ("phase: pretrain\nvalidation_fraction: 1.5\nsources: [{name: a, path: A, weight: 1}]\n",
     "line 2: key 'validation_fraction' must be in [0, 1)"),
    ("phase: pretrain\nsources: [{name: a, path: A, weight: 1\n", "not valid YAML"),
])
def test_bad_mixtures_name_file_line_and_key(tmp_path, body, message):
    source = text_source(tmp_path, "A", 5)
    config = write_yaml(tmp_path / "mix.yaml", body.replace("path: A", f"path: {source}"))
    with pytest.raises(DataError) as info:
        load_mixture(config, "pretrain", 0)
    assert str(info.value).startswith(str(config)) and message in str(info.value), str(info.value)


def test_unknown_phase_and_missing_config(tmp_path):
    with pytest.raises(DataError, match="unknown phase 'rl'"):
        resolve_mixture("rl", None, None, 0)
    with pytest.raises(DataError, match="nope.yaml: data config not found"):
        resolve_mixture("sft", str(tmp_path / "nope.yaml"), None, 0)


def test_malformed_rows_past_the_fraction_stop_the_run_below_it_are_skipped(tmp_path):
    rows = [{"messages": CHAT}] * 95 + [{"messages": [{"role": "user", "content": "no answer"}]}] * 4 + ["{oops"]
    rows = rows[:10] + rows[95:] + rows[10:95]           # the bad rows at lines 11-15
    path = write_rows(tmp_path / "chat.jsonl", rows)

    def mixture(fraction):
        config = write_yaml(tmp_path / "mix.yaml", f"""\
            phase: sft
            max_bad_fraction: {fraction}
            sources: [{{name: chat, path: {path}, weight: 1}}]
        """)
        return load_mixture(config, "sft", 0)

    with pytest.raises(DataError) as info:
        prepare_mixture(mixture(0.01), str(tmp_path / "p"))
    message = str(info.value)
    assert f"{path}: 5 of 100 rows checked are malformed for phase sft (max_bad_fraction 0.01)" in message
    assert "line 11: field 'messages' has no assistant turn" in message and "line 13:" in message
    assert "line 14" not in message                       # the first three are listed
    data = prepare_mixture(mixture(0.1), str(tmp_path / "p"))
    assert data.summary["sources"][0]["rows_skipped"] == 5 and data.summary["sources"][0]["rows_available"] == 95


def test_use_prepared_refuses_a_missing_or_different_preparation(tmp_path):
    source = text_source(tmp_path, "a", 30)
    mixture = resolve_mixture("pretrain", None, source, seed=3)
    with pytest.raises(DataError, match="run once without --use_prepared"):
        load_prepared(mixture, str(tmp_path / "p"))
    prepare_mixture(mixture, str(tmp_path / "p"))
    with pytest.raises(DataError, match="prepared from another mixture or seed"):
        load_prepared(resolve_mixture("pretrain", None, source, seed=4), str(tmp_path / "p"))


# ---- token cache -----------------------------------------------------------------------------------------------

def test_token_cache_packs_documents_and_is_reused_until_the_source_changes(tmp_path, tokenizer):
    texts = ["def f(x): return x", "The quick brown fox.", "2 + 3 = 5"]
    path = write_rows(tmp_path / "train.jsonl", [{"text": t} for t in texts])
    cache = build_token_cache(path, tokenizer)
    expected = [i for t in texts for i in tokenizer.encode(t) + [tokenizer.pad_id]]
    assert np.fromfile(cache, dtype=np.uint16).tolist() == expected
    data = PackedTokenDataset(cache, seq_len=4)
    assert len(data) == len(expected) // 4
    assert data[1]["input_ids"].tolist() == expected[4:8] and data[1]["labels"].tolist() == expected[4:8]
    mtime = os.path.getmtime(cache)
    assert build_token_cache(path, tokenizer) == cache and os.path.getmtime(cache) == mtime   # reused
    write_rows(tmp_path / "train.jsonl", [{"text": t} for t in texts[:2]])
    build_token_cache(path, tokenizer)
    assert np.fromfile(cache, dtype=np.uint16).tolist() == expected[:len(expected) - len(tokenizer.encode(texts[2])) - 1]


# ---- end to end: bad data stops a trainer before its first step --------------------------------------------------

@pytest.mark.slow
def test_bad_data_is_one_line_exit_2_before_any_step(tmp_path):
    bad = write_rows(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "also fine"}, {"body": "no text"}])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "trainer/train_pretrain.py", "--data_path", bad, "--out_dir", str(out),
                        "--prepared_dir", str(tmp_path / "p"), "--report_to", "none"], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"error: {bad}: 1 of 3 rows checked are malformed for phase pretrain "
                                f"(max_bad_fraction 0): line 3: field 'text' is missing")
    assert not (out / "metrics.jsonl").exists() and not (out / "latest").exists()
