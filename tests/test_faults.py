# Run: pytest tests/test_faults.py   (without the training subprocesses: -m "not slow")
# Faults lose nothing (issue 24): a run whose loss stops being finite ends with one line and keeps its last good
# checkpoint; a non-finite or corrupt checkpoint is refused on --resume; two runs cannot share an --out_dir (the lock
# dies with its holder, kill -9 included); an unusable --out_dir is one line before any data is prepared; a broken
# reward module is one line before training; a giant row is tokenized in bounded memory; smaller one-line errors.
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, copy_prepared, run_script, script_env
from minitrain.trainer import checkpointing, configuration, optim
from minitrain.trainer.checkpointing import check_out_dir
from minitrain.trainer.configuration import TrainConfig, parse_config

QUICK = ["--model_config", "tiny", "--report_to", "none", "--batch_size", "4", "--max_seq_len", "64",
         "--eval_batches", "1", "--sample_prompts", ""]


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a run that ended as promised: exit 2, no traceback."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def step_dirs(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith("step_"))


# ---- non-finite loss ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(prepared_pretrain, tmp_path):
    """The issue's reproduction: at learning rate 1e4 the weights turn NaN during step 5. Before, steps 6 and 9 were
    saved with NaN weights, `latest` named them, rotation deleted step 3 and the run crashed in sampling."""
    out = tmp_path / "run"
    prepared = copy_prepared(prepared_pretrain, tmp_path / "prepared")        # the session's, not prepared again
    r = run_script("train_pretrain.py", "--model_config", "tiny", "--learning_rate", "1e4", "--warmup_steps", "1",
                   "--max_steps", "12", "--save_interval", "3", "--keep_checkpoints", "2", "--report_to", "none",
                   "--prepared_dir", prepared, "--use_prepared", "--out_dir", str(out))
    line = one_error_line(r)
    assert line == (f"error: step 6: 20 weight tensors are not finite (NaN or inf), e.g. model.embed_tokens.weight: "
                    f"the run stopped and saved none of it; the last good checkpoint is {out}/step_000003: lower "
                    f"--learning_rate (or raise --warmup_steps) and --resume from it")
    assert (out / "latest").read_text() == "step_000003\n"
    assert step_dirs(out) == ["step_000003"]                   # nothing non-finite written, step 3 not rotated away
    weights = load_file(str(out / "step_000003" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_a_non_finite_gradient_norm_at_a_log_step_stops_the_run_naming_step_and_value(prepared_pretrain, tmp_path):
    out = tmp_path / "run"
    prepared = copy_prepared(prepared_pretrain, tmp_path / "prepared")        # the session's, not prepared again
    r = run_script("train_pretrain.py", *QUICK, "--learning_rate", "1e4", "--warmup_steps", "1", "--max_steps", "8",
                   "--log_interval", "1", "--eval_interval", "0", "--prepared_dir", prepared, "--use_prepared",
                   "--out_dir", str(out))
    line = one_error_line(r)
    assert line == ("error: step 5: the gradient norm is nan (loss 8.76405): the run stopped and saved none of it; the "
                    "last good checkpoint is none (nothing was saved yet): lower --learning_rate (or raise "
                    "--warmup_steps) and start again")
    assert not (out / "latest").exists() and step_dirs(out) == []
    # opt-in: skip such updates, at most --skip_nonfinite_steps times
    r = run_script("train_pretrain.py", *QUICK, "--learning_rate", "1e4", "--warmup_steps", "1", "--max_steps", "12",
                   "--log_interval", "1", "--eval_interval", "0", "--prepared_dir", prepared, "--use_prepared",
                   "--out_dir", str(tmp_path / "skipping"), "--skip_nonfinite_steps", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stdout.count("skipped an update whose gradient norm is nan") == 2
    assert r.stderr.startswith("error: the gradient norm was not finite (nan) in 3 steps, more than "
                               "--skip_nonfinite_steps 2: the run stopped"), r.stderr


def test_skip_nonfinite_steps_leaves_weights_and_optimizer_untouched():
    model = torch.nn.Linear(3, 2)
    optimizer = optim.build_optimizer(model, TrainConfig(skip_nonfinite_steps=1), torch.device("cpu"))
    scaler = optim.make_grad_scaler(torch.device("cpu"), torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.tensor([[1.0, float("nan"), 0.0]])).sum().backward()
    assert torch.isnan(optim.optimizer_step(optimizer, scaler, 1e-2, 1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and optimizer.state_dict()["state"] == {}
    assert all(p.grad is None for p in model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    assert torch.isfinite(optim.optimizer_step(optimizer, scaler, 1e-2, 1.0))
    assert not torch.equal(before[0], model.weight)
    model(torch.tensor([[float("inf"), 0.0, 0.0]])).sum().backward()
    with pytest.raises(configuration.TrainingDiverged, match=r"^the gradient norm was not finite \(inf\) in 2 steps, more "
                                                       r"than --skip_nonfinite_steps 1: the run stopped"):
        optim.optimizer_step(optimizer, scaler, 1e-2, 1.0)


def test_an_infinite_learning_rate_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(TrainConfig, ["--learning_rate", "inf"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: command line: --learning_rate must be a positive finite number, "
                                       "got inf\n")


@pytest.fixture(scope="module")
def two_step_run(prepared_pretrain, tmp_path_factory):
    """A finished run of 2 steps with a checkpoint at each step (tests copy it before changing it), on a copy of the
    session's prepared data (resume() reads it back with --use_prepared)."""
    root = tmp_path_factory.mktemp("two_steps")
    copy_prepared(prepared_pretrain, root / "prepared")
    r = run_script("train_pretrain.py", *QUICK, "--max_steps", "2", "--save_interval", "1", "--eval_interval", "0",
                   "--prepared_dir", str(root / "prepared"), "--use_prepared", "--out_dir", str(root / "run"))
    assert r.returncode == 0, r.stderr
    return root


def resume(root, out, *extra):
    return run_script("train_pretrain.py", *QUICK, "--max_steps", "3", "--eval_interval", "0", "--resume",
                      "--prepared_dir", str(root / "prepared"), "--use_prepared", "--out_dir", str(out), *extra)


@pytest.mark.slow
def test_resume_refuses_non_finite_weights_and_optimizer_state(two_step_run, tmp_path):
    out = tmp_path / "nan_weights"
    shutil.copytree(two_step_run / "run", out)
    path = str(out / "step_000002" / "model.safetensors")
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name][0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    line = one_error_line(resume(two_step_run, out))
    assert line.startswith(f"error: {out}/step_000002: 1 weight tensors are not finite (NaN or inf), e.g. ")
    assert line.endswith("the run had diverged; resume from an earlier checkpoint")

    out = tmp_path / "inf_moments"
    shutil.copytree(two_step_run / "run", out)
    path = str(out / "step_000002" / "resume_state.safetensors")
    tensors = load_file(path)
    tensors["optimizer.0.exp_avg"][0] = float("inf")
    save_file(tensors, path, metadata={"format": "minitrain-resume"})
    line = one_error_line(resume(two_step_run, out))
    assert line == (f"error: {path}: 1 tensors are not finite (NaN or inf), e.g. optimizer.0.exp_avg: the run had "
                    f"diverged; resume from an earlier checkpoint")


@pytest.mark.slow
def test_a_corrupt_resume_state_is_one_line(two_step_run, tmp_path):
    """Before: a SafetensorError traceback."""
    out = tmp_path / "corrupt"
    shutil.copytree(two_step_run / "run", out)
    path = out / "step_000002" / "resume_state.safetensors"
    path.write_bytes(path.read_bytes()[:100])                         # cut short, as a full disk leaves it
    line = one_error_line(resume(two_step_run, out))
    assert line.startswith(f"error: {path}: corrupt or unreadable resume state (")
    assert line.endswith(f"resume from an earlier checkpoint (point {out}/latest at it)")
    (out / "step_000002" / "resume_state.json").write_text('{"step": 2, ')
    line = one_error_line(resume(two_step_run, out))
    assert line.startswith(f"error: {out}/step_000002/resume_state.json: corrupt resume state (")


# ---- the run directory: lock, unusable paths ----------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from minitrain.trainer.checkpointing import check_out_dir
    from minitrain.trainer.configuration import TrainConfig
    check_out_dir(TrainConfig(out_dir=sys.argv[1]))
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.mark.slow
def test_a_second_run_on_the_same_out_dir_stops_naming_the_holder(tmp_path):
    """Before: both runs passed the "already holds a run" check and mixed their checkpoints. The kernel releases the
    lock of a killed holder, so a kill -9 never blocks the next run (or --resume)."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, env=script_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        r = run_script("train_pretrain.py", *QUICK, "--max_steps", "1", "--prepared_dir", str(tmp_path / "prepared"),
                       "--out_dir", str(out))
        line = one_error_line(r)
        assert line.startswith(f"error: --out_dir {out} is in use by another run (pid {holder.pid} on ")
        assert line.endswith(f"{out}/run.lock): wait for it to end or choose another --out_dir")
        assert not (tmp_path / "prepared").exists()                   # stopped before preparing any data
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    check_out_dir(TrainConfig(out_dir=str(out)))                      # the dead holder's lock is gone
    assert (out / "run.lock").read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"
    checkpointing.RUN_DIR_LOCK.file.close()
    checkpointing.RUN_DIR_LOCK.file = None


@pytest.mark.slow
def test_an_unusable_out_dir_is_one_line_before_data_preparation(tmp_path):
    (tmp_path / "a_file").write_text("x")
    r = run_script("train_pretrain.py", *QUICK, "--prepared_dir", str(tmp_path / "prepared"),
                   "--out_dir", str(tmp_path / "a_file" / "run"))
    assert one_error_line(r) == f"error: --out_dir {tmp_path}/a_file/run: cannot create it (Not a directory: " \
                                f"{tmp_path}/a_file/run)"
    r = run_script("train_pretrain.py", *QUICK, "--prepared_dir", str(tmp_path / "prepared"),
                   "--out_dir", str(tmp_path / "a_file"))
    assert one_error_line(r) == f"error: --out_dir {tmp_path}/a_file: exists and is not a directory"
    assert not (tmp_path / "prepared").exists()


# ---- reward modules ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("source, message", [
    ("def r(prompts, completions, **rows):\n    return [1.0 for c in\n",
     "error: command line: --reward_funcs reward 'user_reward:r': {dir}/user_reward.py: line 2: syntax error "
     "('[' was never closed)"),
    ("def r(completion):\n    return [1.0]\n",
     "error: command line: --reward_funcs reward 'user_reward:r': signature r(completion) cannot be called as "
     "(prompts, completions, **rows): too many positional arguments"),
])
def test_a_broken_reward_module_is_one_line_before_training(tmp_path, source, message):
    (tmp_path / "user_reward.py").write_text(source)
    r = run_script("train_grpo.py", "--reward_funcs", "user_reward:r", "--reward_weights", "1", "--out_dir",
                   str(tmp_path / "run"), env={"PYTHONPATH": str(tmp_path)})
    assert one_error_line(r) == message.format(dir=tmp_path)


# ---- a giant row ----------------------------------------------------------------------------------------------

PEAK = textwrap.dedent("""
    import json, random, resource, sys
    from minitrain.dataset.pretokenize import build_token_cache
    from minitrain.model.checkpoint import load_tokenizer
    from minitrain.trainer.configuration import DEFAULT_TOKENIZER_DIR
    path, chars = sys.argv[1], int(sys.argv[2])
    random.seed(0)
    words = ["alpha", "beta", "gamma", "the", "of", "model", "token", "1234", "x"]
    text = " ".join(random.choice(words) for _ in range(chars // 5))
    with open(path, "w") as f:
        f.write(json.dumps({"text": "a small document"}) + "\\n" + json.dumps({"text": text}) + "\\n")
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER_DIR)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cache = build_token_cache(path, tokenizer)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"grown_mb": grown / 1024, "cache": cache}))
""")


@pytest.mark.slow
def test_a_giant_row_is_tokenized_in_bounded_memory(tmp_path):
    """A 4 MB row: before, the peak grew by ~730 MB (about 180 times the row, so a 50 MB row took 8 GB); tokenized
    in pieces it grows by ~50 MB, whatever the row's size."""
    r = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "big.jsonl"), str(4_000_000)], cwd=REPO,
                       env=script_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["grown_mb"] < 150, result
    meta = json.loads(open(result["cache"] + ".json").read())
    assert meta["num_documents"] == 2 and meta["num_tokens"] > 400_000


def test_pieces_of_a_long_text_tokenize_as_the_whole_text():
    from minitrain.model import tokenizer as tokenizer_module
    from minitrain.model.checkpoint import load_tokenizer
    tokenizer = load_tokenizer(configuration.DEFAULT_TOKENIZER_DIR)
    text = " ".join(f"word{i % 97} of the model, 12.5%" for i in range(30_000))      # ~750 k characters
    assert len(text) > 8 * tokenizer_module.PIECE_CHARS
    pieces = list(tokenizer.encode_pieces(["short one", text]))
    assert len(pieces) > 8 and [last for _, _, last in pieces].count(True) == 2
    assert [t for i, ids, _ in pieces if i == 1 for t in ids] == tokenizer.encode(text)
    assert [t for i, ids, _ in pieces if i == 0 for t in ids] == tokenizer.encode("short one")


# ---- smaller ones -------------------------------------------------------------------------------------------

def test_a_model_flag_that_breaks_the_preset_is_blamed_on_the_flag(capsys):
    from minitrain.model.config import ConfigError, load_model_config
    with pytest.raises(ConfigError) as e:
        load_model_config("tiny", {"num_attention_heads": 3})
    assert str(e.value).startswith("command line: --num_attention_heads 3 (over ")
    assert str(e.value).endswith("tiny.yaml): field 'num_key_value_heads' (2) must divide num_attention_heads (3)")


def test_sft_rows_with_empty_answers_are_skipped_and_counted(tmp_path):
    from minitrain.dataset.jsonl import DataError
    from minitrain.dataset.mixer import Source, read_source
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    rows[3]["messages"][1]["content"] = ""
    rows[5]["messages"][1]["content"] = "  \n"
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = read_source(Source(name="sft", path=str(path), weight=1.0), "sft", max_bad_fraction=0.5)
    assert read.bad == 2 and len(read.rows) == 6
    with pytest.raises(DataError, match=r"line 4: field 'messages': every assistant answer is empty"):
        read_source(Source(name="sft", path=str(path), weight=1.0), "sft", max_bad_fraction=0.0)


def test_sft_answers_all_beyond_max_seq_len_name_file_and_line(tmp_path):
    from minitrain.dataset.chat import ChatDataset
    from minitrain.dataset.jsonl import DataError
    from minitrain.model.checkpoint import load_tokenizer
    rows = [{"messages": [{"role": "user", "content": "a long question " * 20}, {"role": "assistant",
                                                                                "content": "yes"}]}] * 3
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        ChatDataset(str(path), load_tokenizer(configuration.DEFAULT_TOKENIZER_DIR), max_seq_len=16)
    assert str(e.value) == (f"{path}: line 1: field 'messages': no assistant token within --max_seq_len 16, nor in "
                            f"any of the other 2 (lines 2-3); raise --max_seq_len or shorten the prompts")
