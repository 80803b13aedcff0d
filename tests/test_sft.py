# Run: pytest tests/test_sft.py   (without the train_sft.py / train_lora.py subprocesses: -m "not slow")
# Supervised fine-tuning and LoRA: the loss mask covers exactly the assistant tokens for every chat shape, truncation
# drops rows left without an assistant token, packing gives the same loss as separate rows, and train_sft.py /
# train_lora.py run end to end (LoRA checkpoints hold adapter tensors only; --merge equals base plus adapters;
# resume of a LoRA run repeats its losses).
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minitrain.dataset import formats
from minitrain.dataset.chat import IGNORE_INDEX, ChatDataset, collate_chat, pack_first_fit, tokenize_conversation
from minitrain.model.checkpoint import load_model, load_tokenizer, save_checkpoint
from minitrain.model.config import load_model_config
from minitrain.model.lora import load_adapter
from minitrain.model.transformer import CausalLM

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(REPO / "dataset" / "tokenizer"))


SHAPES = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 * 4?"},
                  {"role": "assistant", "content": "It is 16."}]},
    {"conversations": [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "5"},
                       {"from": "human", "value": "And 4 * 4?"}, {"from": "gpt", "value": "It is 16."}]},
    {"prompt": "What is 2 + 3?", "response": "The answer is 5.", "system": "Be brief."},
    {"text": "\n\nHuman: What is 2 + 3?\n\nAssistant: 5\n\nHuman: And 4 * 4?\n\nAssistant: It is 16."},
]


@pytest.mark.parametrize("row", SHAPES, ids=["messages", "sharegpt", "prompt-response", "hh"])
def test_labels_cover_exactly_the_assistant_turns(tokenizer, row):
    messages = formats.normalize_chat(row)[0]["messages"]
    ids, labels = tokenize_conversation(tokenizer, messages, max_seq_len=512)
    assert len(ids) == len(labels)
    # the target tokens, read back in runs, are each assistant turn's content followed by <|im_end|>
    runs, current = [], []
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            assert label == ids[i]
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(run, skip_special=False) for run in runs] == expected
    # and nothing else: every other token (system, user, role headers) is ignored
    assert sum(len(r) for r in runs) == sum(1 for label in labels if label != IGNORE_INDEX)


def test_truncation_drops_rows_without_an_assistant_token(tokenizer, tmp_path):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    assert tokenize_conversation(tokenizer, long_prompt["messages"], 64) is None
    ids, labels = tokenize_conversation(tokenizer, short["messages"], 10)         # cut inside the answer
    assert len(ids) == 10 and labels[-1] == ids[-1] and labels[:-1].count(IGNORE_INDEX) == 9
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [long_prompt, short, short]))
    data = ChatDataset(str(path), tokenizer, max_seq_len=64)
    assert (len(data), data.dropped, data.rows) == (2, 1, 3)


def test_first_fit_packing_respects_capacity_and_places_every_item():
    lengths = [5, 9, 3, 7, 1, 4, 6]
    bins = pack_first_fit(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert bins == [[1, 4], [3, 2], [6, 5], [0]]      # decreasing length, first bin with room


def test_packed_rows_give_the_loss_of_separate_rows(tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"{a + b}"}]} for a, b in [(1, 2), (30, 4), (5, 600)]]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    model = CausalLM(load_model_config("tiny")).eval()
    separate = ChatDataset(str(path), tokenizer, max_seq_len=128)
    packed = ChatDataset(str(path), tokenizer, max_seq_len=128, packing=True)
    assert len(separate) == 3 and len(packed) == 1
    batch = collate_chat([packed[0]], tokenizer.pad_id)
    assert batch["attention_mask"].max() == 3 and batch["position_ids"][0, 0] == 0
    # the model's loss is a mean over targets: compare sums (mean * number of targets)
    targets = lambda b: int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    packed_sum = model(**batch).loss * targets(batch)
    one_by_one = sum(model(**b).loss * targets(b) for b in (collate_chat([separate[i]], tokenizer.pad_id)
                                                             for i in range(3)))
    assert torch.allclose(packed_sum, one_by_one, rtol=1e-5, atol=1e-5)
    padded = collate_chat([separate[i] for i in range(3)], tokenizer.pad_id)   # right padding changes nothing
    assert torch.allclose(model(**padded).loss * targets(padded), one_by_one, rtol=1e-5, atol=1e-5)


# ---- the scripts --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("base") / "model"
    torch.manual_seed(0)
    save_checkpoint(CausalLM(load_model_config("tiny")), load_tokenizer(str(REPO / "dataset" / "tokenizer")),
                    str(path))
    return str(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("prepared"))


def run(script, *args):
    return subprocess.run([sys.executable, f"trainer/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          env=ENV, timeout=300)


def short_run(base, prepared, out, *extra):
    return ["--init_from", base, "--out_dir", str(out), "--prepared_dir", prepared, "--max_seq_len", "96",
            "--batch_size", "8", "--max_steps", "16", "--log_interval", "1", "--eval_interval", "0",
            "--eval_batches", "2", "--eval_tasks", "", "--sample_prompts", "", "--report_to", "none", *extra]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if r["kind"] == "train"}


@pytest.mark.slow
def test_sft_script_lowers_the_loss_and_saves_a_full_checkpoint(base_checkpoint, prepared, tmp_path):
    r = run("train_sft.py", *short_run(base_checkpoint, prepared, tmp_path / "sft", "--learning_rate", "3e-3",
                                       "--packing"))
    assert r.returncode == 0, r.stderr
    got = losses(tmp_path / "sft")
    assert sorted(got) == list(range(1, 17)) and got[16] < got[1] - 1.0
    assert "conversations" in r.stdout and "packed into" in r.stdout
    model, _ = load_model(str(tmp_path / "sft" / "final"))
    assert model.config.hidden_size == 64


@pytest.mark.slow
def test_lora_script_saves_adapters_only_merges_and_resumes_exactly(base_checkpoint, prepared, tmp_path):
    args = short_run(base_checkpoint, prepared, tmp_path / "lora", "--learning_rate", "1e-2", "--lora_rank", "4",
                     "--lora_targets", "q_proj,v_proj,down_proj", "--save_interval", "8", "--merge")
    r = run("train_lora.py", *args)
    assert r.returncode == 0, r.stderr
    assert "LoRA: rank 4 on q_proj, v_proj, down_proj" in r.stdout
    full = losses(tmp_path / "lora")
    assert full[16] < full[1]
    final = tmp_path / "lora" / "final"
    assert sorted(os.listdir(final)) == ["adapter_config.json", "adapter_model.safetensors", "minitrain.json",
                                         "resume_state.json", "resume_state.safetensors", "tokenizer.json",
                                         "tokenizer_config.json"]
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 3 * 2 and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
    # merged checkpoint == base + adapters
    ids = torch.randint(3, 6000, (2, 12), generator=torch.Generator().manual_seed(0))
    base, _ = load_model(base_checkpoint)
    adapted = load_adapter(base, str(final)).eval()
    merged, _ = load_model(str(tmp_path / "lora" / "merged"))
    assert torch.allclose(adapted(ids).logits, merged.eval()(ids).logits, atol=1e-5)
    assert not torch.allclose(load_model(base_checkpoint)[0].eval()(ids).logits, merged(ids).logits, atol=1e-3)

    # resume from step 8 (the latest checkpoint once step 16's is removed) repeats steps 9-16 exactly
    out = tmp_path / "lora"
    for name in ("final", "merged", "step_000016"):
        target = out / name
        if target.is_symlink():
            target.unlink()
        else:
            subprocess.run(["rm", "-rf", str(target)], check=True)
    (out / "latest").write_text("step_000008\n")
    r = run("train_lora.py", *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and losses(out) == full


@pytest.mark.slow
def test_sft_needs_init_from_and_valid_lora_flags(tmp_path):
    r = run("train_sft.py", "--init_from", "", "--out_dir", str(tmp_path / "a"))
    assert r.returncode == 2 and "--init_from is required" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("train_lora.py", "--lora_rank", "0", "--out_dir", str(tmp_path / "b"))
    assert r.returncode == 2 and "--lora_rank must be at least 1" in r.stderr
    r = run("train_sft.py", "--lora_rank", "4", "--lora_targets", "q_proj,,v", "--out_dir", str(tmp_path / "c"))
    assert r.returncode == 2 and "--lora_targets" in r.stderr and "Traceback" not in r.stderr
