# Shared fixtures of the test suite.
#
# trained_checkpoints: a tiny model pretrained and then fine-tuned on the embedded data by the real scripts, once per
# test session (about a minute and a half on 2 CPU cores), for the tests of the methods that start from an SFT model
# (DPO, RL, distillation). Tests must copy what they change; the directories are shared. Under pytest-xdist (the
# default, pyproject.toml) the workers share one copy: the first to need it trains it, the others wait on a lock.
# prepared_pretrain: the embedded pretrain mixture prepared and tokenized once per session (~25 s each time a run
# prepares it), shared the same way; runs whose claim is not about data preparation copy it and pass --use_prepared.
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Refuse to run with the repository root on sys.path (`pytest` puts the current directory there): its
    folders would import under generic names, and kernels/ would hide Hugging Face's `kernels` package from
    transformers and peft."""
    spec = importlib.util.find_spec("kernels")
    # REPO / "kernels", not REPO: a virtual environment inside the repository (.venv) holds Hugging Face's package
    if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(REPO / "kernels"):
        pytest.exit(f"the repository root {REPO} is on sys.path, so kernels/ shadows Hugging Face's `kernels` "
                    "package: run the tests with `pytest tests` (not `pytest` from the root)", returncode=4)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml) runs one named file in this process: --dist loadfile hands a whole file to one
    worker anyway, so the pool would only add its start-up. A directory or several files get the pool; an explicit
    `-n N` or PYTEST_XDIST_AUTO_NUM_WORKERS decides as usual."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    files = {Path(config.invocation_params.dir, arg.split("::")[0]).resolve() for arg in config.args}
    return 0 if len(files) == 1 and next(iter(files)).is_file() else None


def script_env() -> dict:
    """The environment the tests run training scripts in: one thread per process, wandb off, and Python's fault
    handler on, so that a crash (a segfault in a rank) prints each thread's Python stack into the failure."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONFAULTHANDLER": "1"}


def run_script(script: str, *args: str, ranks: int = 1, timeout: int = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run trainer/<script> (or any repo-relative script) as a user would: python, or torchrun with `ranks`; `env`
    adds variables to script_env()'s."""
    path = script if "/" in script else f"trainer/{script}"
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]
    return subprocess.run(launcher + [path, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**script_env(), **(env or {})})


def pytest_collection_modifyitems(config, items):
    """Order the test files for pytest-xdist, which hands whole files to the workers in this order (--dist loadfile
    and --no-loadscope-reorder, pyproject.toml): first one file that needs trained_checkpoints, so that one worker
    trains it while the others run the files that do not need it (those with a slow-marked test first); the other
    files that need it come last, when it is ready, instead of workers waiting on its lock. A test that needs
    trained_checkpoints (or prepared_pretrain) is marked slow here even where its file forgot to, so `-m "not slow"`
    never trains it."""
    files: dict = {}
    for item in items:
        files.setdefault(item.path, []).append(item)
        if ({"trained_checkpoints", "prepared_pretrain"} & set(getattr(item, "fixturenames", ()))
                and not item.get_closest_marker("slow")):
            item.add_marker(pytest.mark.slow)    # these fixtures run scripts (minutes): never in the fast lane
    needs = [path for path, tests in files.items()
             if any("trained_checkpoints" in getattr(t, "fixturenames", ()) for t in tests)]

    def rank(path) -> float:
        if path in needs:
            return 0 if path == needs[0] else 2
        return 1 if any(t.get_closest_marker("slow") for t in files[path]) else 1.5

    items[:] = [item for path in sorted(files, key=rank) for item in files[path]]


def script_error(main, argv: list[str], capsys) -> str:
    """The error a training script's main(argv) reports in this process: SystemExit 2 and one `error: ...` line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def cli_error(cli, argv: list[str], capsys) -> str:
    """The error an eval script's cli(argv) reports: exit status 2 and one `error: ...` line on stderr."""
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A directory every xdist worker of this run shares (guard it with FileLock(str(dir) + ".lock"))."""
    if os.environ.get("PYTEST_XDIST_WORKER"):         # one directory for all workers of this run
        return tmp_path_factory.getbasetemp().parent / name
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def prepared_pretrain(tmp_path_factory) -> Path:
    """A --prepared_dir holding the embedded pretrain mixture prepared and tokenized (its token cache built) by the
    real script in a 1-step run, once per test session: preparing it takes ~25 s of every run that does. For the
    runs whose claim is not about preparation; they take a copy (copy_prepared) and pass --use_prepared."""
    root = shared_dir(tmp_path_factory, "prepared_pretrain")
    with FileLock(str(root) + ".lock"):
        if not (root / "warmup" / "final").is_dir():
            r = run_script("train_pretrain.py", "--prepared_dir", str(root / "prepared"), "--out_dir",
                           str(root / "warmup"), "--max_steps", "1", "--max_seq_len", "64", "--batch_size", "2",
                           "--eval_interval", "0", "--eval_batches", "1", "--sample_prompts", "",
                           "--report_to", "none")
            assert r.returncode == 0, r.stderr
    return root / "prepared"


def copy_prepared(prepared: Path, into: Path) -> str:
    """A private copy of a shared --prepared_dir (runs may write caches beside the data); returns its path."""
    shutil.copytree(prepared, into)
    return str(into)


@pytest.fixture(scope="session")
def trained_checkpoints(tmp_path_factory, prepared_pretrain) -> dict[str, str]:
    """{"pretrain": DIR, "sft": DIR, "prepared": DIR}: the tiny model after a short pretraining and SFT."""
    root = shared_dir(tmp_path_factory, "trained")
    with FileLock(str(root) + ".lock"):
        if not (root / "sft" / "final").is_dir():
            train_checkpoints(root, prepared_pretrain)
    return {"pretrain": str(root / "pretrain" / "final"), "sft": str(root / "sft" / "final"),
            "prepared": str(root / "prepared")}


def train_checkpoints(root: Path, prepared_pretrain: Path) -> None:
    prepared = str(root / "prepared")
    shutil.rmtree(prepared, ignore_errors=True)     # left by an interrupted earlier attempt
    copy_prepared(prepared_pretrain, Path(prepared))
    common = ["--prepared_dir", prepared, "--report_to", "none", "--log_interval", "50", "--eval_interval", "0",
              "--eval_batches", "2", "--sample_prompts", ""]
    r = run_script("train_pretrain.py", *common, "--use_prepared", "--out_dir", str(root / "pretrain"),
                   "--max_steps", "300", "--batch_size", "16", "--max_seq_len", "128", "--learning_rate", "5e-3", "--warmup_steps", "20")
    assert r.returncode == 0, r.stderr
    r = run_script("train_sft.py", *common, "--init_from", str(root / "pretrain" / "final"), "--out_dir",
                   str(root / "sft"), "--max_steps", "200", "--batch_size", "16", "--max_seq_len", "128",
                   "--learning_rate", "2e-3", "--warmup_steps", "10", "--eval_tasks", "")
    assert r.returncode == 0, r.stderr
