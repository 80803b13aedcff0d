# Run: pytest tests/test_tokenizer.py   (without the train_tokenizer.py subprocess: -m "not slow")
# The shipped tokenizer (dataset/tokenizer/, made by trainer/train_tokenizer.py): special ids, round trips, digits one
# token each, the assistant mask of render_chat, the same ids from Hugging Face's apply_chat_template, and the
# training script itself on a small corpus (including its one-line errors on bad files, bad UTF-8, an --out_dir that
# is a file); render_chat refuses roles outside the chat format.
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minitrain.eval.tasks import EVAL_SEED, get_task
from minitrain.model.tokenizer import IM_END, SPECIAL_TOKENS, Tokenizer, TokenizerError, render_chat_text
from minitrain.trainer import train_tokenizer as train_tokenizer_script
from minitrain.trainer.train_tokenizer import TAG_TOKENS, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = str(REPO / "dataset" / "tokenizer")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 23 + 19?"},
     {"role": "assistant", "content": "<think>23+19=42</think>\n<answer>42</answer>"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Explain json.dumps in one sentence."},
     {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."},
     {"role": "user", "content": "And  json.loads?\n"},
     {"role": "assistant", "content": " Deserialize s (a str, bytes or bytearray) to a Python object. "}],
    [{"role": "user", "content": "Sort from smallest to largest: 42 7 19"},
     {"role": "assistant", "content": "<think>3 numbers, min 7, max 42</think>\n<answer>7 19 42</answer>"},
     {"role": "user", "content": "café 🙂 ünïcode\ttabs"},
     {"role": "assistant", "content": "Ça va: 1 2 3!"}],
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def sft_conversations():
    """Task conversations the embedded SFT data is made of (all tasks), plus the hand-made ones."""
    chats = list(CONVERSATIONS)
    for name in ("arithmetic", "sat", "sort", "countdown"):
        task = get_task(name)
        for p in task.make_problems(8, EVAL_SEED):
            chats.append(p.messages() + [{"role": "assistant", "content": task.reference_response(p)}])
    return chats


def test_shipped_tokenizer_ids_and_config(tok):
    assert tok.vocab_size == 6400
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (tok.pad_id, tok.im_start_id, tok.eos_id) == (0, 1, 2)
    assert [tok.token_to_id(t) for t in TAG_TOKENS] == [6396, 6397, 6398, 6399]
    config = json.load(open(f"{TOKENIZER_DIR}/tokenizer_config.json"))
    assert config["eos_token"] == IM_END and config["pad_token"] == "<|endoftext|>" and "chat_template" in config


@pytest.mark.parametrize("text", [
    "Hello world, 12345 apples!", "  def f(x):\n\treturn x**2  # comment\n", "café 🙂 ünïcode — “quotes”",
    "(x1 | ~x2 | x3) & (~x1 | x4 | x5)", "<think>5*(4+(-4))=5*0=0</think>\n<answer>0</answer>", "", "\n\n\n",
    "日本語",
])
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_digits_are_single_tokens_and_tags_are_one_token(tok):
    ids = tok.encode("1234567890")
    assert [tok.decode([i]) for i in ids] == list("1234567890")
    assert tok.encode("x=42") == tok.encode("x=") + tok.encode("4") + tok.encode("2")
    for tag in TAG_TOKENS:
        assert tok.encode(tag) == [tok.token_to_id(tag)]
    assert tok.decode(tok.encode("<think>a</think>")) == "<think>a</think>"     # tags survive skip_special decoding
    assert tok.decode(tok.encode("<|im_end|>")) == "" and tok.encode("<|im_end|>") == [2]


def test_arithmetic_responses_stay_short(tok):
    task = get_task("arithmetic")
    lengths = [len(tok.encode(task.reference_response(p))) for p in task.make_problems(300, EVAL_SEED)]
    assert max(lengths) < 40 and sum(lengths) / len(lengths) < 25
    assert len(tok.encode("<think>23+19=42</think>\n<answer>42</answer>")) == 15


def test_render_chat_mask_covers_exactly_assistant_content_and_im_end(tok, sft_conversations):
    for messages in sft_conversations:
        ids, mask = tok.render_chat(messages)
        text, _ = render_chat_text(messages)
        assert ids == tok.encode(text) and len(mask) == len(ids)
        masked = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
        assert masked == "".join(m["content"] + IM_END for m in messages if m["role"] == "assistant")
        unmasked = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special=False)
        assert unmasked == "".join(f"<|im_start|>{m['role']}\n" + (m["content"] + IM_END if m["role"] != "assistant"
                                                                  else "") + "\n" for m in messages)
        assert sum(i == tok.eos_id for i, m in zip(ids, mask) if m) == sum(m["role"] == "assistant" for m in messages)


def test_hugging_face_chat_template_gives_the_same_ids(tok, sft_conversations):
    transformers = pytest.importorskip("transformers")
    config = json.load(open(f"{TOKENIZER_DIR}/tokenizer_config.json"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{TOKENIZER_DIR}/tokenizer.json",
                                              chat_template=config["chat_template"])

    def hf_ids(messages, add_generation_prompt):
        out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        out = out["input_ids"] if not isinstance(out, list) else out     # transformers 5 returns a BatchEncoding
        return list(out)

    for messages in sft_conversations:
        assert hf_ids(messages, False) == tok.render_chat(messages)[0]
        prompt = messages[:-1]
        assert hf_ids(prompt, True) == tok.chat_prompt_ids(prompt)
        assert tok.chat_prompt_ids(prompt)[-3:] == tok.encode("<|im_start|>assistant\n")
    assert hf.decode(tok.encode("What is 2 + 3?")) == "What is 2 + 3?"


def test_train_tokenizer_on_a_small_corpus():
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "What is 23 + 19? 42.", "<think>1+1=2</think>"] * 20
    hf = train_tokenizer(texts, vocab_size=300)
    tok = Tokenizer(hf)
    assert tok.vocab_size == 300
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert [tok.token_to_id(t) for t in TAG_TOKENS] == [296, 297, 298, 299]
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox") // 2     # merges were learned
    for text in texts[:3] + ["unseen ☃ text 987"]:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
def test_train_tokenizer_script_writes_files_and_rejects_bad_rows(tmp_path):
    good = tmp_path / "good.jsonl"
    rows = [{"text": "Some text with numbers 123 and words."}] * 30
    rows += [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}] * 30
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "tok"
    run = subprocess.run([sys.executable, "trainer/train_tokenizer.py", "--data_path", str(good), "--vocab_size", "280",
                          "--out_dir", str(out)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    trained = Tokenizer.from_dir(str(out))
    assert trained.vocab_size <= 280 and trained.eos_id == 2
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    run = subprocess.run([sys.executable, "trainer/train_tokenizer.py", "--data_path", str(bad), "--out_dir",
                          str(tmp_path / "never")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and f"{bad}:2:" in run.stderr and '"text"' in run.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}],
     "message 1: role 'tool' is not one of system, user, assistant"),
    ([{"role": "User", "content": "hi"}], "message 0: role 'User' is not one of system, user, assistant"),
    ([{"content": "hi"}], "message 0: role None is not one of"),
    (["hi"], "message 0: role 'hi' is not one of"),
    ([{"role": "assistant", "content": None}], "message 0 (assistant): field 'content' must be a string, got None"),
])
def test_render_chat_rejects_roles_outside_the_chat_format(tok, messages, message):
    with pytest.raises(TokenizerError) as e:
        tok.render_chat(messages)
    assert str(e.value) == message or str(e.value).startswith(message), str(e.value)
    with pytest.raises(TokenizerError):
        tok.chat_prompt_ids(messages)


def script_error(argv: list[str], capsys) -> str:
    """trainer/train_tokenizer.py's main in process: exit status 2 and one `error: ...` line on stderr."""
    with pytest.raises(SystemExit) as e:
        train_tokenizer_script.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_train_tokenizer_bad_files_and_out_dirs_are_one_line(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine"}\n')
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    roles = tmp_path / "roles.jsonl"
    roles.write_text(json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (["--data_path", str(latin1), "--out_dir", str(tmp_path / "out")],
         f"{latin1}:2: not valid UTF-8 (byte 14 of the line: invalid continuation byte)"),
        (["--data_path", str(roles), "--out_dir", str(tmp_path / "out")],
         f"{roles}:1: field \"messages\": message 0: role 'tool' is not one of system, user, assistant"),
        (["--data_path", str(good), "--out_dir", str(a_file)], f"--out_dir {a_file}: exists and is not a directory"),
        (["--data_path", str(good), "--out_dir", str(a_file / "sub")],
         f"--out_dir {a_file / 'sub'}: {a_file} is not a directory"),
        (["--data_path", str(good), "--vocab_size", "big"], "argument --vocab_size: invalid int value: 'big'"),
    ]
    for argv, message in cases:
        assert script_error(argv, capsys) == f"error: {message}\n"
    assert not (tmp_path / "out").exists()
