# Run: pytest tests/test_perplexity_chat.py   (without the eval/perplexity.py subprocess: -m "not slow")
# eval/perplexity.py and eval/chat.py on tiny random checkpoints, in process (cli(argv) returns the exit status):
# perplexity equals exp(mean NLL) computed independently with F.cross_entropy on full logits, with and without a
# LoRA adapter; chat passes its flags to generate, --system and --raw shape the prompt, --raw stops at <|endoftext|>,
# an interactive session drops its oldest turns when the context is full and goes on; every bad flag, model
# directory or data file is one `error: ...` line with exit status 2.
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minitrain.eval import chat, perplexity
from minitrain.model.checkpoint import load_model, load_tokenizer, save_checkpoint
from minitrain.model.config import load_model_config
from minitrain.model.generate import generate
from minitrain.model.lora import LoRAConfig, apply_lora, save_adapter
from minitrain.model.transformer import CausalLM
from conftest import cli_error

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["The quick brown fox jumps over the lazy dog, then naps in the sun for a while.",
         "What is 23 + 19? It is 42.",
         "Sort from smallest to largest: 42 7 19 and then 3 1 2, please, as fast as you can manage it.",
         "ok"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(REPO / "dataset" / "tokenizer"))


def save_tiny(tokenizer, path: Path, preset: str = "tiny", **overrides) -> tuple[CausalLM, str]:
    torch.manual_seed(0)
    model = CausalLM(load_model_config(preset, overrides)).eval()
    save_checkpoint(model, tokenizer, str(path))
    return model, str(path)


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    """(model, checkpoint dir) of the tiny preset with a 48-position context."""
    return save_tiny(tokenizer, tmp_path_factory.mktemp("tiny") / "model", max_position_embeddings=48)


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """(adapted model, adapter dir): LoRA on every linear layer with a large random B, so answers change."""
    _, path = tiny
    adapted, _ = load_model(path, with_tokenizer=False)
    apply_lora(adapted, LoRAConfig(rank=4, alpha=8.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    directory = tmp_path_factory.mktemp("adapter") / "lora"
    save_adapter(adapted, None, str(directory), base_model_path=path)
    return adapted.eval(), str(directory)


@pytest.fixture(scope="module")
def texts_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# eval/perplexity.py
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_loss(model, tokenizer, texts: list[str], window: int) -> tuple[float, int]:
    """Mean NLL over every predicted token, one window at a time, from the full logits."""
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer.encode(text)
        for start in range(0, len(ids), window):
            w = ids[start:start + window]
            if len(w) < 2:
                continue
            logits = model(torch.tensor([w])).logits[0]                                   # [T, V]
            total += F.cross_entropy(logits[:-1].double(), torch.tensor(w[1:]), reduction="sum").item()
            count += len(w) - 1
    return total / count, count


def test_perplexity_is_exp_of_the_mean_token_nll(tokenizer, tiny, texts_jsonl, capsys):
    model, path = tiny
    # windows of 8 tokens, 3 per batch: rows split across windows, batches right-padded, 1-token tails dropped
    argv = ["--model", path, "--data_path", texts_jsonl, "--max_seq_len", "8", "--batch_size", "3", "--device", "cpu"]
    assert perplexity.cli(argv + ["--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    result = json.loads(out)
    assert set(result) == {"loss", "ppl", "tokens"}
    loss, tokens = reference_loss(model, tokenizer, TEXTS, 8)
    assert result["tokens"] == tokens and tokens > 30
    assert math.isclose(result["loss"], loss, rel_tol=1e-5)
    assert math.isclose(result["ppl"], math.exp(loss), rel_tol=1e-5)
    assert 6000 < result["ppl"] < 7000   # a random model over 6400 tokens: close to uniform
    # the terminal line reports the same numbers; --max_rows keeps the first rows only
    assert perplexity.cli(argv) == 0
    assert capsys.readouterr().out == (f"loss {result['loss']:.4f} | ppl {result['ppl']:.2f} | tokens {tokens:,} | "
                                       f"rows {len(TEXTS)}\n")
    assert perplexity.cli(argv + ["--json", "--max_rows", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["tokens"] == reference_loss(model, tokenizer, TEXTS[:2], 8)[1] < tokens


def test_perplexity_with_an_adapter(tokenizer, tiny, adapter, texts_jsonl, capsys):
    _, path = tiny
    adapted, adapter_dir = adapter
    argv = ["--model", path, "--data_path", texts_jsonl, "--max_seq_len", "16", "--device", "cpu", "--json"]
    assert perplexity.cli(argv + ["--adapter", adapter_dir]) == 0
    result = json.loads(capsys.readouterr().out)
    loss, tokens = reference_loss(adapted, tokenizer, TEXTS, 16)
    assert result["tokens"] == tokens and math.isclose(result["loss"], loss, rel_tol=1e-5)
    assert perplexity.cli(argv) == 0
    assert abs(json.loads(capsys.readouterr().out)["loss"] - loss) > 0.01   # the adapter changed the model


def broken_copy(path: str, tmp_path: Path, name: str, change) -> str:
    """A copy of checkpoint `path` with `change(copy_dir)` applied."""
    copy = tmp_path / name
    copy.mkdir()
    for file in os.listdir(path):
        (copy / file).write_bytes((Path(path) / file).read_bytes())
    change(copy)
    return str(copy)


def retype(field: str, value):
    def change(copy: Path):
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, field: value}))
    return change


@pytest.fixture(scope="module")
def broken_models(tokenizer, tiny, tmp_path_factory):
    """Checkpoints a CLI must refuse, and the message each must give."""
    _, path = tiny
    tmp = tmp_path_factory.mktemp("broken")
    _, small_vocab = save_tiny(tokenizer, tmp / "small-vocab", vocab_size=100)
    return [
        (broken_copy(path, tmp, "badtype", retype("rope_theta", "fast")),
         "badtype/config.json: field 'rope_theta' must be a number, got 'fast'"),
        (broken_copy(path, tmp, "badhidden", retype("hidden_size", "64")),
         "badhidden/config.json: field 'hidden_size' must be int, got '64'"),
        (broken_copy(path, tmp, "baddtype", retype("torch_dtype", "int8")),
         "baddtype/config.json: field 'torch_dtype' must be float32, bfloat16, float16, got 'int8'"),
        (broken_copy(path, tmp, "badweights", lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64)),
         "badweights/model.safetensors: not a readable safetensors file"),
        (small_vocab, ("small-vocab/tokenizer.json: vocabulary of 6400 tokens does not fit the model (config.json "
                       "field 'vocab_size' = 100)")),
        (path + "/config.json", "model/config.json: not a directory"),
    ]


def test_perplexity_bad_input_is_one_line(tiny, texts_jsonl, broken_models, tmp_path, capsys):
    _, path = tiny
    run = ["--data_path", texts_jsonl, "--device", "cpu"]
    for model, message in broken_models:
        assert message in cli_error(perplexity.cli, ["--model", model] + run, capsys)
    cases = [
        (["--model", path] + run[:2] + ["--device", "nonsense"], "--device nonsense: not a device"),
        (["--model", path] + run[:2] + ["--device", "meta"], "--device meta: only cpu, cuda[:N] and mps"),
        (["--model", path] + run + ["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--model", path] + run + ["--max_seq_len", "1"], "--max_seq_len must be at least 2"),
        (["--model", path] + run + ["--max_rows", "x"], "argument --max_rows: invalid int value: 'x'"),
        (["--model", path] + run + ["--max_seq_len", "49"],
         "--max_seq_len 49: exceeds the model's max_position_embeddings (48)"),
        (["--model", path, "--device", "cpu"], "the following arguments are required: --data_path"),
        (["--model", path, "--data_path", str(tmp_path / "none.jsonl")], "none.jsonl: file not found"),
        (["--model", path] + run + ["--adapter", str(tmp_path / "none")], "none: adapter directory not found"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--model", path] + run[:2] + ["--device", "cuda"], "--device cuda: CUDA is not available"))
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"txt": "no text"}\n')
    cases.append((["--model", path, "--data_path", str(tmp_path / "rows.jsonl")], "rows.jsonl: line 2"))
    for argv, message in cases:
        assert message in cli_error(perplexity.cli, argv, capsys)


@pytest.mark.slow
def test_perplexity_script_reports_bad_flags_on_one_line():
    r = subprocess.run([sys.executable, "eval/perplexity.py", "--model", "m", "--data_path", "d", "--batch_size",
                        "many"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "error: argument --batch_size: invalid int value: 'many'\n"


# ---------------------------------------------------------------------------------------------------------------
# eval/chat.py
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def calls(monkeypatch):
    """Every call chat.py makes to generate: (prompts, keyword arguments, output); the real generate runs."""
    recorded = []

    def recording_generate(model, prompts, max_new_tokens, **kwargs):
        out = generate(model, prompts, max_new_tokens, **kwargs)
        recorded.append((prompts, {"max_new_tokens": max_new_tokens, **kwargs}, out))
        return out

    monkeypatch.setattr(chat, "generate", recording_generate)
    return recorded


def test_chat_passes_its_sampling_flags_to_generate(tokenizer, tiny, calls, capsys):
    model, path = tiny
    assert chat.cli(["--model", path, "--prompt", "What is 2+3?", "--device", "cpu", "--max_new_tokens", "6",
                     "--temperature", "0.9", "--top_k", "50", "--top_p", "0.8", "--min_p", "0.05",
                     "--repetition_penalty", "1.3", "--seed", "7"]) == 0
    (prompts, kwargs, out), = calls
    ids = tokenizer.chat_prompt_ids([{"role": "user", "content": "What is 2+3?"}])
    assert prompts == [ids]
    assert {k: kwargs[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                   "eos_token_id", "pad_token_id", "compiled")} == \
        {"max_new_tokens": 6, "temperature": 0.9, "top_k": 50, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.3,
         "eos_token_id": [tokenizer.eos_id, tokenizer.pad_id], "pad_token_id": tokenizer.pad_id, "compiled": False}
    expected = generate(model, [ids], 6, temperature=0.9, top_k=50, top_p=0.8, min_p=0.05, repetition_penalty=1.3,
                        eos_token_id=[2, 0], generator=torch.Generator().manual_seed(7)).completions[0]
    assert out.completions[0] == expected and len(set(expected)) > 1
    assert capsys.readouterr().out == tokenizer.decode(expected) + "\n"


def test_chat_reads_weights_in_the_dtype_asked(tiny, monkeypatch, capsys):
    """--dtype bfloat16: the model generates from bf16 weights (auto keeps the saved fp32)."""
    _, path = tiny
    seen = []
    monkeypatch.setattr(chat, "generate", lambda model, *args, **kwargs: (
        seen.append(next(model.parameters()).dtype), generate(model, *args, **kwargs))[1])
    for flag in ("auto", "bfloat16"):
        assert chat.cli(["--model", path, "--prompt", "Hi", "--device", "cpu", "--max_new_tokens", "3",
                         "--temperature", "0", "--dtype", flag]) == 0
    assert seen == [torch.float32, torch.bfloat16]
    capsys.readouterr()


def test_chat_system_message_and_adapter(tokenizer, tiny, adapter, calls, capsys):
    model, path = tiny
    adapted, adapter_dir = adapter
    argv = ["--model", path, "--prompt", "Hi there", "--system", "Answer in one word.", "--temperature", "0",
            "--max_new_tokens", "8", "--device", "cpu"]
    ids = tokenizer.chat_prompt_ids([{"role": "system", "content": "Answer in one word."},
                                     {"role": "user", "content": "Hi there"}])
    for with_adapter in (False, True):
        assert chat.cli(argv + (["--adapter", adapter_dir] if with_adapter else [])) == 0
        prompts, _, out = calls[-1]
        assert prompts == [ids]
        reference = adapted if with_adapter else model
        expected = generate(reference, [ids], 8, temperature=0, eos_token_id=[2, 0]).completions[0]
        assert out.completions[0] == expected
        assert capsys.readouterr().out == tokenizer.decode(expected) + "\n"
    assert calls[0][2].completions != calls[1][2].completions   # the adapter changed the answer


def test_chat_raw_sends_plain_text_and_stops_at_endoftext(tokenizer, tmp_path, calls, capsys):
    # a model whose final norm is zero: every logit is 0, so greedy picks token 0, <|endoftext|>, at once
    torch.manual_seed(0)
    model = CausalLM(load_model_config("tiny")).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()
    save_checkpoint(model, tokenizer, str(tmp_path / "m"))
    assert generate(model, [[5, 6]], 4, temperature=0, eos_token_id=tokenizer.eos_id).completions == [[0, 0, 0, 0]]
    assert chat.cli(["--model", str(tmp_path / "m"), "--raw", "--prompt", "The list", "--temperature", "0",
                     "--max_new_tokens", "4", "--device", "cpu"]) == 0
    (prompts, _, out), = calls
    assert prompts == [tokenizer.encode("The list")]           # no chat template
    assert out.completions == [[tokenizer.pad_id]] and out.finished == [True]
    assert capsys.readouterr().out == "\n"


def test_chat_interactive_session_drops_old_turns_and_goes_on(tokenizer, tiny, calls, monkeypatch, capsys):
    _, path = tiny      # 48 positions, 8 of them for the answer: prompts of at most 40 tokens
    system = {"role": "system", "content": "Be brief."}
    turns = ["What is 2+3?", "And 4+4?", "Name a colour.", "word " * 60, "/reset", "Bye now."]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n\n"))
    assert chat.cli(["--model", path, "--system", "Be brief.", "--temperature", "0", "--max_new_tokens", "8",
                     "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "oldest messages to fit the model's 48 positions]" in err
    assert "[this message does not fit the model's 48 positions with --max_new_tokens 8; not sent]" in err
    prompts = [p[0] for p, _, _ in calls]
    assert len(prompts) == 4 and all(len(p) <= 40 for p in prompts)
    # each prompt is the system message, then the latest turns that fit, then the new message
    history = []
    for prompt, (_, _, out), text in zip(prompts, calls, ["What is 2+3?", "And 4+4?", "Name a colour.", "Bye now."]):
        if text == "Bye now.":
            history = []   # /reset
        history.append({"role": "user", "content": text})
        fits = [j for j in range(0, len(history), 2) if tokenizer.chat_prompt_ids([system] + history[j:]) == prompt]
        assert fits, text
        history = history[fits[0]:] + [{"role": "assistant", "content": tokenizer.decode(out.completions[0])}]
    assert len(tokenizer.chat_prompt_ids([system] + [{"role": "user", "content": t} for t in turns[:3]])) > 40


def test_chat_banner_gives_total_and_active_parameters(tokenizer, tmp_path, monkeypatch, capsys):
    model, path = save_tiny(tokenizer, tmp_path / "moe", preset="tiny-moe")
    total, active = model.num_parameters(), model.num_parameters(active_only=True)
    assert total > active
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert chat.cli(["--model", path, "--device", "cpu"]) == 0
    assert f"({total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token)" in capsys.readouterr().err


def test_chat_bad_input_is_one_line(tiny, broken_models, tmp_path, capsys):
    _, path = tiny
    for model, message in broken_models:
        assert message in cli_error(chat.cli, ["--model", model, "--prompt", "hi", "--device", "cpu"], capsys)
    run = ["--model", path, "--prompt", "hi"]
    cases = [
        (run + ["--device", "nonsense"], "--device nonsense: not a device"),
        (run + ["--device", "cpu", "--temperature", "warm"], "argument --temperature: invalid float value: 'warm'"),
        (run + ["--device", "cpu", "--top_p", "0"], "--top_p must be in (0, 1]"),
        (run + ["--device", "cpu", "--repetition_penalty", "0"], "--repetition_penalty must be positive"),
        (["--prompt", "hi"], "the following arguments are required: --model"),
        (run + ["--device", "cpu", "--max_new_tokens", "48"],
         "--max_new_tokens 48: must be below the model's max_position_embeddings (48)"),
        (["--model", path, "--prompt", "word " * 40, "--device", "cpu", "--max_new_tokens", "8"],
         "tokens + --max_new_tokens 8 exceed the model's max_position_embeddings (48)"),
        (["--model", path, "--raw", "--prompt", "", "--device", "cpu", "--max_new_tokens", "8"],
         "--prompt is empty"),
        (run + ["--device", "cpu", "--adapter", str(tmp_path / "none")], "none: adapter directory not found"),
        (run + ["--device", "cpu", "--raw", "--system", "Be brief."], "--system needs the chat template"),
    ]
    if not torch.cuda.is_available():
        cases.append((run + ["--device", "cuda"], "--device cuda: CUDA is not available on this machine"))
    for argv, message in cases:
        assert message in cli_error(chat.cli, argv, capsys)
