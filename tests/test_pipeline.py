# Run: pytest tests/test_pipeline.py   (without trainer/pipeline.py in subprocesses: -m "not slow")
# trainer/pipeline.py end to end on a shortened config (pretraining and SFT, a few steps each, then evaluation and
# the comparison), the skipping of finished stages, and its one-line errors.
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import copy_prepared, script_env
from minitrain.trainer.optim import cpu_has_native_bf16
from minitrain.trainer.pipeline import stage_dtype

REPO = Path(__file__).resolve().parents[1]

SHORT = """
out_dir: unused
stages:
  - name: tokenizer
    script: trainer/train_tokenizer.py
    args: {}
  - name: pretrain
    script: trainer/train_pretrain.py
    args: {max_steps: 6, batch_size: 4, max_seq_len: 64, eval_interval: 0, eval_batches: 1, sample_prompts: "",
           prepared_dir: PREPARED, use_prepared: true}
  - name: sft
    script: trainer/train_sft.py
    init_from: pretrain
    args: {max_steps: 6, batch_size: 4, max_seq_len: 96, eval_interval: 0, eval_batches: 1, eval_tasks: "",
           sample_prompts: "", prepared_dir: PREPARED}
evaluation: {tasks: "arithmetic", num_samples: 8, max_new_tokens: 12}
"""


def pipeline(*args):
    return subprocess.run([sys.executable, "trainer/pipeline.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=script_env(), timeout=600)


@pytest.mark.slow
def test_short_pipeline_trains_evaluates_and_compares_every_stage(prepared_pretrain, tmp_path):
    copy_prepared(prepared_pretrain, tmp_path / "prepared")       # pretraining reads it back; SFT prepares its own
    config = tmp_path / "short.yaml"
    config.write_text(textwrap.dedent(SHORT).replace("PREPARED", str(tmp_path / "prepared")))
    out = tmp_path / "out"
    r = pipeline("--config", str(config), "--out_dir", str(out))
    assert r.returncode == 0, r.stderr + r.stdout
    assert "[1/2] pretrain: python trainer/train_pretrain.py --max_steps 6" in r.stdout   # the user's command
    assert "[2/2] sft: done in" in r.stdout and "tokenizer" not in r.stdout
    for stage in ("pretrain", "sft"):
        assert (out / stage / "final" / "model.safetensors").exists() and (out / stage / "log.txt").exists()
        result = json.loads((out / "eval" / f"{stage}.json").read_text())
        assert result["tasks"]["arithmetic"]["num_samples"] == 8
    sft_json = json.loads((out / "eval" / "sft.json").read_text())
    assert sft_json["model"].endswith("sft/final")
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| pretrain | ") and table[3].startswith("| sft | ")
    assert "Pareto frontier" in r.stdout and (out / "eval" / "compare.json").exists()
    paired = json.loads((out / "eval" / "compare.json").read_text())["paired"]     # the same 8 problems, paired
    assert [(p["before"], p["after"], p["tasks"]["arithmetic"]["problems"]) for p in paired] == [("pretrain", "sft", 8)]
    assert "pretrain -> sft" in r.stdout

    again = pipeline("--config", str(config), "--out_dir", str(out), "--stages", "sft")
    assert again.returncode == 0, again.stderr
    assert "sft: skipped" in again.stdout and "pretrain" not in again.stdout.split("\n")[1]


@pytest.mark.slow
def test_dry_run_prints_the_default_commands_and_dtype_overrides_every_stage(tmp_path):
    r = pipeline("--dry_run", "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    commands = [line for line in r.stdout.splitlines() if ": python trainer/" in line]
    assert [c.split()[:2] for c in commands] == [["[1/5]", "pretrain:"], ["[2/5]", "sft:"], ["[3/5]", "pairs:"],
                                                 ["[4/5]", "dpo:"], ["[5/5]", "grpo:"]]
    native = cpu_has_native_bf16()       # the default config's bfloat16, or float32 where this CPU would emulate it
    assert all(f"--dtype {'bfloat16' if native else 'float32'}" in c for c in commands)
    assert ("no native bfloat16" in r.stdout) == (not native)
    assert f"--init_from {tmp_path}/sft/final" in commands[2] and f"--init_from {tmp_path}/sft/final" in commands[3]
    assert f"--data_path {tmp_path}/pairs/pairs.jsonl" in commands[3] and "report_to" not in commands[2]
    assert not list(tmp_path.iterdir())                                                          # nothing written
    r = pipeline("--dry_run", "--out_dir", str(tmp_path), "--dtype", "float32")
    commands = [line for line in r.stdout.splitlines() if ": python trainer/" in line]
    assert len(commands) == 5 and all("--dtype float32" in c and "bfloat16" not in c for c in commands)
    assert not any("--seed" in c for c in commands)
    r = pipeline("--dry_run", "--out_dir", str(tmp_path), "--seed", "7")
    commands = [line for line in r.stdout.splitlines() if ": python trainer/" in line]
    assert len(commands) == 5 and all("--seed 7" in c for c in commands)


def test_bf16_stages_run_in_fp32_on_a_cpu_that_would_emulate_bf16():
    assert stage_dtype("bfloat16", None, "cpu", native_bf16=False) == "float32"
    assert stage_dtype("bfloat16", None, "cpu", native_bf16=True) == "bfloat16"
    assert stage_dtype("bfloat16", None, "cuda", native_bf16=True) == "bfloat16"
    assert stage_dtype("bfloat16", "bfloat16", "cpu", native_bf16=False) == "bfloat16"   # --dtype decides
    assert stage_dtype("float16", None, "cpu", native_bf16=False) == "float16"
    assert stage_dtype(None, None, "cpu", native_bf16=False) is None                     # the script's default


def test_cpu_bf16_is_read_off_the_cpu_flags(tmp_path):
    for flags, native in [("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("fp asimd bf16", True),
                          ("fpu amx_tile amx_bf16", True)]:
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_has_native_bf16(str(tmp_path / "cpuinfo")) is native, flags
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is True      # nothing to read (not Linux): trust the user


@pytest.mark.slow
def test_pipeline_errors_are_one_line(tmp_path):
    r = pipeline("--stages", "pretrain,rlhf", "--out_dir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: --stages: unknown stage(s) ['rlhf']")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - name: sft\n    script: trainer/train_sft.py\n    init_from: pretrain\n")
    r = pipeline("--config", str(bad))
    assert r.returncode == 2 and "init_from 'pretrain' is not an earlier stage" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    bad.write_text("stages:\n  - name: pairs\n    script: trainer/make_pairs.py\n    output: pairs.jsonl\n"
                   "  - name: dpo\n    script: trainer/train_dpo.py\n    init_from: pairs\n")
    r = pipeline("--config", str(bad))
    assert r.returncode == 2 and "init_from 'pairs' writes data, not a model" in r.stderr
    bad.write_text("stages:\n  - name: dpo\n    script: trainer/train_dpo.py\n    data_from: sft\n")
    r = pipeline("--config", str(bad))
    assert r.returncode == 2 and "data_from 'sft' is not an earlier stage with an 'output'" in r.stderr
