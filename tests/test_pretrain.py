# Run: pytest tests/test_pretrain.py   (all slow: the scripts as subprocesses, torchrun included)
# trainer/train_pretrain.py and train_midtrain.py end to end on CPU, as subprocesses (the way users run them):
# the loss falls on the embedded data; torchrun with 2 ranks (gloo) gives the losses of 1 process with twice the
# accumulation; kill -9 between checkpoints plus --resume repeats the uninterrupted losses exactly; a resume with
# another number of ranks continues from the same data position; bad input is a one-line error with exit status 2.
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_prepared, script_error
from minitrain.model.checkpoint import load_model
from minitrain.trainer import train_midtrain, train_pretrain

REPO = Path(__file__).resolve().parents[1]
TWO_RANKS_TOLERANCE = 1e-4   # losses of 2 ranks vs 1 rank with 2x accumulation (only the float summation order differs)
pytestmark = pytest.mark.slow   # every test runs the scripts as subprocesses


def command(script: str, ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, f"trainer/{script}"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            f"trainer/{script}"]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def run(args: list[str], ranks: int = 1, script: str = "train_pretrain.py") -> subprocess.CompletedProcess:
    result = subprocess.run(command(script, ranks) + args, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=environment())
    return result


def train_losses(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def prepared(prepared_pretrain, tmp_path_factory) -> str:
    """The embedded pretrain mixture, prepared and tokenized once per session (conftest.py), copied for every run
    of this file (--use_prepared)."""
    return copy_prepared(prepared_pretrain, tmp_path_factory.mktemp("prepared") / "prepared")


def small_run(prepared, out_dir, *extra) -> list[str]:
    """12 steps of 8 sequences of 64 tokens, a checkpoint every 4 steps, every step logged."""
    return ["--prepared_dir", prepared, "--use_prepared", "--out_dir", str(out_dir), "--max_seq_len", "64",
            "--batch_size", "4", "--max_steps", "12", "--learning_rate", "3e-3", "--warmup_steps", "2",
            "--log_interval", "1", "--eval_interval", "0", "--eval_batches", "1", "--save_interval", "4",
            "--sample_prompts", "", "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("uninterrupted")
    r = run(small_run(prepared, out, "--accumulation_steps", "2"))
    assert r.returncode == 0, r.stderr
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 13))
    return losses


def test_loss_falls_on_the_embedded_data(prepared, tmp_path):
    out = tmp_path / "run"
    r = run(["--prepared_dir", prepared, "--use_prepared", "--out_dir", str(out), "--max_seq_len", "64",
             "--batch_size", "8", "--max_steps", "80", "--learning_rate", "5e-3", "--warmup_steps", "5",
             "--log_interval", "5", "--eval_interval", "40", "--eval_batches", "4", "--report_to", "none",
             "--sample_prompts", "The|def ", "--sample_tokens", "8"])
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [x for x in records if x["kind"] == "train"]
    evals = {x["step"]: x["loss"] for x in records if x["kind"] == "eval"}
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "samples_per_sec", "mfu_percent",
            "epoch"} <= set(train[0])
    assert sorted(evals) == [0, 40, 80]
    assert 8.0 < evals[0] < 9.5                           # about ln(6400) = 8.76 for random weights
    assert evals[80] < evals[0] - 2.5 and evals[80] < evals[40]
    assert train[-1]["loss"] < 6.5
    assert r.stdout.count("sample: 'The' -> ") == 3        # samples at steps 0, 40 and 80
    assert "parameters" in r.stdout and "step 80/80" in r.stdout
    model, tokenizer = load_model(str(out / "final"))
    assert os.path.realpath(out / "final") == str(out / "step_000080")
    assert model.config.hidden_size == 64 and tokenizer.vocab_size <= model.config.vocab_size


def test_two_ranks_give_the_losses_of_one_rank_with_twice_the_accumulation(prepared, uninterrupted, tmp_path):
    r = run(small_run(prepared, tmp_path / "ddp", "--accumulation_steps", "1"), ranks=2)
    assert r.returncode == 0, r.stderr
    losses = train_losses(tmp_path / "ddp")
    assert sorted(losses) == sorted(uninterrupted)
    for step, loss in uninterrupted.items():
        assert abs(losses[step] - loss) < TWO_RANKS_TOLERANCE, (step, losses[step], loss)
    assert uninterrupted[12] < uninterrupted[1] - 0.5     # it trained: equal numbers are not equal constants


def kill_after_step(args: list[str], step: int) -> None:
    """Start a run and SIGKILL it as soon as it reports `step`."""
    proc = subprocess.Popen(command("train_pretrain.py", 1) + args, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=environment())
    for line in proc.stdout:
        if line.startswith(f"step {step:>2}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_between_saves_and_resume_repeat_the_uninterrupted_losses(prepared, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    args = small_run(prepared, out, "--accumulation_steps", "2")
    kill_after_step(args, 6)
    latest = (out / "latest").read_text().strip()
    logged = train_losses(out)
    assert latest == "step_000004" and max(logged) > 4         # killed between the saves of steps 4 and 8
    shutil.copytree(out, tmp_path / "copy", symlinks=True)     # for the resume with 2 ranks below

    r = run(args + ["--resume"])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    assert train_losses(out) == uninterrupted                  # bit for bit, every step

    # the same checkpoint resumed by 2 ranks (accumulation 1, so the same global batch): same data position
    r = run(small_run(prepared, tmp_path / "copy", "--accumulation_steps", "1", "--resume"), ranks=2)
    assert r.returncode == 0, r.stderr
    assert "saved with 1 ranks, now 2" in r.stdout
    state = json.load(open(tmp_path / "copy" / "step_000012" / "resume_state.json"))
    assert state["world_size"] == 2 and state["data"]["samples_seen"] == 12 * 8
    resumed = train_losses(tmp_path / "copy")
    assert sorted(resumed) == list(range(1, 13))
    for step, loss in uninterrupted.items():
        assert abs(resumed[step] - loss) < TWO_RANKS_TOLERANCE, (step, resumed[step], loss)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def test_bad_input_is_one_line_with_exit_2_before_training(tmp_path, capsys):
    # the first case runs the script as a subprocess (a traceback would show on its stderr), the others call main()
    missing = tmp_path / "no_such_checkpoint"
    err = one_line_error(run(["--init_from", str(missing), "--out_dir", str(tmp_path / "a"), "--report_to", "none"]))
    assert f"error: {missing}: model directory not found" in err
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    err = script_error(train_midtrain.main, ["--init_from", str(missing), "--out_dir", str(tmp_path / "b")],
                           capsys)
    assert "model directory not found" in err
    err = script_error(train_midtrain.main, ["--out_dir", str(tmp_path / "c")], capsys)
    assert "--init_from is required" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 4\nlearning_rate: fast\n")
    err = script_error(train_pretrain.main, ["--config", str(bad)], capsys)
    assert f"{bad}: line 2: key 'learning_rate' must be float, got 'fast'" in err
    err = script_error(train_pretrain.main, ["--out_dir", str(tmp_path / "d"), "--resume"], capsys)
    assert "--resume" in err and "latest not found" in err
