# Run: pytest tests/test_install.py   (all slow: Python in subprocesses)
# minitrain installs beside the Hugging Face stack: the only import name it puts on the path is `minitrain`, and in
# one process Hugging Face's `kernels` package, transformers, peft and minitrain's kernels all import, a model is
# trained and its checkpoint and LoRA adapter load in transformers and peft. Each check runs in a fresh interpreter
# started outside the repository, as a user's own code would (pytest's own process has tests/ on its path).
import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO, script_env

FOLDERS = ["model", "kernels", "dataset", "trainer", "eval"]     # the repository's Python folders
pytestmark = pytest.mark.slow   # every test runs Python in a subprocess


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=script_env())


def test_the_distribution_puts_only_minitrain_on_the_path(tmp_path):
    assert metadata.distribution("minitrain").read_text("top_level.txt").split() == ["minitrain"]
    r = run_python(f"""
        import importlib.util, json
        found = {{}}
        for name in {FOLDERS!r}:
            spec = importlib.util.find_spec(name)
            found[name] = spec.origin if spec else None
        print(json.dumps(found))
        """, tmp_path)
    assert r.returncode == 0, r.stderr
    # each name absent, or someone else's package (HF's `kernels`, perhaps in a .venv inside the repository)
    for name, origin in json.loads(r.stdout).items():
        assert origin is None or not Path(origin).resolve().is_relative_to(REPO / name), (name, origin)


def test_minitrain_modules_import_under_their_namespace(tmp_path):
    r = run_python("""
        import minitrain.model.transformer, minitrain.trainer.checkpointing, minitrain.eval.tasks, minitrain.dataset.mixer
        from minitrain.model.checkpoint import load_model
        from minitrain.kernels import fused_linear_cross_entropy
        import minitrain
        print(minitrain.__file__)
        """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == REPO / "__init__.py"


def test_train_then_load_in_transformers_and_peft_beside_hf_kernels(tmp_path):
    # Hugging Face's `kernels` is imported first, as transformers and peft import it; then minitrain trains a tiny
    # model and a LoRA adapter in the same process, and transformers and peft load both with our logits.
    out = tmp_path / "runs"
    r = run_python(f"""
        import kernels                                   # Hugging Face's package, a dependency of transformers
        assert hasattr(kernels, "get_kernel"), kernels.__file__
        import peft, torch, transformers
        from transformers import AutoModelForCausalLM
        from minitrain.kernels import fused_linear_cross_entropy
        from minitrain.model.checkpoint import load_model
        from minitrain.model.lora import load_adapter
        from minitrain.trainer import train_lora, train_pretrain

        common = ["--prepared_dir", "{out}/prepared", "--report_to", "none", "--eval_interval", "0",
                  "--sample_prompts", "", "--max_seq_len", "64", "--batch_size", "4", "--warmup_steps", "1"]
        train_pretrain.main(common + ["--out_dir", "{out}/pretrain", "--max_steps", "3"])
        train_lora.main(common + ["--init_from", "{out}/pretrain/final", "--out_dir", "{out}/lora",
                                  "--max_steps", "3", "--eval_tasks", "", "--learning_rate", "1e-2"])

        ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77]])
        ours, _ = load_model("{out}/pretrain/final")
        theirs = AutoModelForCausalLM.from_pretrained("{out}/pretrain/final").eval()
        with torch.no_grad():
            base = ours.eval()(ids).logits
            torch.testing.assert_close(theirs(ids).logits, base, atol=1e-4, rtol=1e-4)
            adapted = load_adapter(ours, "{out}/lora/final").eval()(ids).logits
            theirs_adapted = peft.PeftModel.from_pretrained(theirs, "{out}/lora/final").eval()(ids).logits
            torch.testing.assert_close(theirs_adapted, adapted, atol=1e-4, rtol=1e-4)
        print("adapter moved the logits by", (adapted - base).abs().max().item())
        """, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    moved = float(r.stdout.strip().splitlines()[-1].split()[-1])
    assert moved > 1e-4          # the adapter was trained, so the agreement above is not base against base


def test_a_script_run_by_path_from_another_directory_finds_its_defaults(tmp_path):
    # the recipe, the data mixture and the tokenizer resolve against the repository; the data is built in the cwd
    r = subprocess.run([sys.executable, str(REPO / "trainer" / "train_sft.py"), "--init_from",
                        str(REPO / "tests" / "assets" / "mini-pretrained"), "--max_steps", "1", "--report_to", "none",
                        "--sample_prompts", "", "--eval_interval", "0", "--eval_tasks", "", "--out_dir", "out"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=script_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"data (sft, {REPO / 'config' / 'data' / 'sft' / 'default.yaml'}):" in r.stdout
    assert (tmp_path / "data" / "embedded" / "sft.jsonl").is_file()
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
