"""The whole path in one command: tokenizer, pretraining, SFT, preference pairs from the SFT model, DPO and GRPO,
then evaluation of every stage.

Commands, from the repository root after `pip install -r requirements.txt -e .`:

    # the default (config/pipeline/default.yaml): the mini model on the embedded data, CPU, about 18 minutes in fp32
    python trainer/pipeline.py

    # the same in fp32 (on a CPU without native bfloat16, no avx512_bf16 or AMX in /proc/cpuinfo's flags, the
    # default does this by itself and says so: emulated bf16 would take hours)
    python trainer/pipeline.py --dtype float32 --out_dir out/pipeline-fp32

    # the same path from another seed (every stage's data order, initialisation and sampling)
    python trainer/pipeline.py --seed 7 --out_dir out/pipeline-seed7

    # some stages only (a stage whose output exists is skipped unless --force; later stages start from it)
    python trainer/pipeline.py --stages sft,dpo,grpo --force

    # on GPUs: every stage through torchrun
    python trainer/pipeline.py --device cuda --nproc_per_node 8 --out_dir out/pipeline-gpu

Each stage runs the standalone script exactly as a user would (the printed command can be pasted into a shell), so
this file doubles as the documentation of the path; its output goes to OUT_DIR/<stage>/log.txt. A stage starts
from the previous stage's OUT_DIR/<stage>/final. Then eval/evaluate.py scores every stage's checkpoint on the
held-out problems (OUT_DIR/eval/<stage>.json) and eval/compare.py prints them side by side with the Pareto
frontier (OUT_DIR/eval/compare.json). The table of accuracies is also written to OUT_DIR/results.md.

The stages and their flags live in one YAML (--config): `stages` in order, each with a `script`, its `args` (any
flag of that script), and `init_from: <earlier stage>`; `evaluation` holds eval/evaluate.py's flags. A stage that
makes data instead of a model (trainer/make_pairs.py) names its file, `output: pairs.jsonl`: it is done when that
file exists and is not evaluated, and a later stage reads it with `data_from: <that stage>` (its --data_path). The
optional `tokenizer` stage (train_tokenizer.py) runs only with --train_tokenizer; otherwise the shipped tokenizer is
used.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import yaml

from minitrain import REPO_ROOT
from minitrain.eval.cli import OneLineParser, UsageError
from minitrain.trainer.optim import NO_NATIVE_BF16, cpu_has_native_bf16

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "config", "pipeline", "default.yaml")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="pipeline YAML (stages, their flags, evaluation)")
    p.add_argument("--stages", default="", help="comma-separated stages to run (default: all of the config's)")
    p.add_argument("--out_dir", default=None, help="where every stage writes (default: the config's out_dir)")
    p.add_argument("--device", default="cpu", help="cpu or cuda, passed to every stage and to evaluation")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype of every training stage, in place of the config's (the default config says "
                        "bfloat16: use float32 on a CPU without native bf16)")
    p.add_argument("--nproc_per_node", type=int, default=1, help="processes per stage (torchrun when > 1)")
    p.add_argument("--force", action="store_true", help="rerun the chosen stages even when their output exists")
    p.add_argument("--seed", type=int, default=None,
                   help="--seed of every stage (data order, initialisation, sampling), in place of each script's own "
                        "(42); the held-out problems do not change")
    p.add_argument("--train_tokenizer", action="store_true", help="train a tokenizer first instead of the shipped one")
    p.add_argument("--report_to", default="none", choices=["none", "wandb"], help="logging of every stage")
    p.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    args = p.parse_args(argv)
    if args.nproc_per_node < 1:
        raise UsageError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    return args


def load_config(path: str) -> dict:
    """The pipeline YAML, checked: stages with a known script and args, init_from naming an earlier stage that
    trains a model, data_from one that writes data (its `output`)."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: pipeline config not found")
    with open(path) as f:
        try:
            config = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(config.get("stages"), list) or not config["stages"]:
        raise UsageError(f"{path}: key 'stages' must be a non-empty list")
    names, outputs = [], {}
    for i, stage in enumerate(config["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or \
                not isinstance(stage.get("script"), str):
            raise UsageError(f"{where} needs 'name' and 'script'")
        if not os.path.isfile(os.path.join(REPO_ROOT, stage["script"])):
            raise UsageError(f"{where}: script {stage['script']} not found")
        if not isinstance(stage.get("args", {}), dict):
            raise UsageError(f"{where}: 'args' must be a mapping of flags to values")
        if stage.get("init_from") is not None and stage["init_from"] not in names:
            raise UsageError(f"{where}: init_from {stage['init_from']!r} is not an earlier stage")
        if stage.get("init_from") in outputs:
            raise UsageError(f"{where}: init_from {stage['init_from']!r} writes data, not a model (data_from reads it)")
        if stage.get("data_from") is not None and stage["data_from"] not in outputs:
            raise UsageError(f"{where}: data_from {stage['data_from']!r} is not an earlier stage with an 'output'")
        if stage.get("output") is not None:
            if not isinstance(stage["output"], str) or not stage["output"]:
                raise UsageError(f"{where}: 'output' must be the file name the stage writes into its directory")
            outputs[stage["name"]] = stage["output"]
        names.append(stage["name"])
    if not isinstance(config.get("evaluation", {}), dict):
        raise UsageError(f"{path}: key 'evaluation' must be a mapping of eval/evaluate.py flags")
    return config


def stage_dtype(config_dtype: str | None, forced: str | None, device: str, native_bf16: bool) -> str | None:
    """The --dtype a stage runs with: the pipeline's --dtype when given, else the config's, except that bfloat16
    becomes float32 on a CPU without native bf16, where emulated bf16 autocast is about 25x slower (the default
    pipeline would take hours, not minutes). The pipeline prints that choice before the first stage."""
    if forced:
        return forced
    if config_dtype == "bfloat16" and device == "cpu" and not native_bf16:
        return "float32"
    return config_dtype


def flags(args: dict) -> list[str]:
    """{"max_steps": 10, "packing": True} -> ["--max_steps", "10", "--packing", "true"]."""
    out = []
    for key, value in args.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def shown(command: list[str]) -> str:
    """A command as a user would type it (python rather than the interpreter's full path)."""
    return shlex.join(["python" if part == sys.executable else part for part in command])


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_logged(command: list[str], log_path: str) -> tuple[int, float]:
    """Run a command from the repository root with its output in log_path; (exit status, seconds)."""
    started = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        status = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    return status, time.time() - started


def last_metrics(out_dir: str) -> str:
    """The last train and eval records of a stage, as a short text for its progress line."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return ""
    last = {}
    for line in open(path):
        record = json.loads(line)
        last[record["kind"]] = record
    parts = []
    if "train" in last:
        parts.append(f"loss {last['train']['loss']:.3f}")
        if "reward" in last["train"]:
            parts.append(f"reward {last['train']['reward']:.3f}")
        if "rewards/accuracies" in last["train"]:
            parts.append(f"rewards/accuracies {last['train']['rewards/accuracies']:.2f}")
    if "eval" in last:
        parts += [f"eval {k} {v:.3f}" for k, v in last["eval"].items() if k not in ("step", "kind")]
    return ", ".join(parts)


def tail(path: str, lines: int = 5) -> str:
    with open(path) as f:
        return "".join(f.readlines()[-lines:])


def results_table(out_dir: str, stages: list[str]) -> str:
    """Markdown table: accuracy [80% interval] of every task per stage, and of all their problems pooled."""
    from minitrain.eval.stats import jeffreys_interval
    rows, tasks = [], []
    for stage in stages:
        path = os.path.join(out_dir, "eval", f"{stage}.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            result = json.load(f)
        tasks = tasks or [(t, s["num_samples"]) for t, s in result["tasks"].items()]
        summaries = [result["tasks"][t] for t, _ in tasks]
        cells = [f"{s['accuracy']:.3f} [{s['ci80'][0]:.3f}, {s['ci80'][1]:.3f}]" for s in summaries]
        if len(tasks) > 1:   # every problem of every task as one sample (greedy: one completion a problem)
            right = sum(s["accuracy"] * s["num_samples"] for s in summaries)
            total = sum(s["num_samples"] for s in summaries)
            low, high = jeffreys_interval(right, total - right)
            cells.append(f"{right / total:.3f} [{low:.3f}, {high:.3f}]")
        rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    names = [f"{t} ({n} problems)" for t, n in tasks]
    if len(tasks) > 1:
        names.append(f"all {sum(n for _, n in tasks)} pooled")
    header = "| stage | " + " | ".join(names) + " |"
    return "\n".join([header, "|" + " --- |" * (len(names) + 1), *rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    out_dir = args.out_dir or config.get("out_dir", "out/pipeline")
    all_stages = [s for s in config["stages"] if s["name"] != "tokenizer" or args.train_tokenizer]
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()] or [s["name"] for s in all_stages]
    unknown = sorted(set(chosen) - {s["name"] for s in all_stages})
    if unknown:
        raise UsageError(f"--stages: unknown stage(s) {unknown}; the config has "
                            f"{', '.join(s['name'] for s in all_stages)}")
    if not args.dry_run:
        os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
    tokenizer_dir = os.path.join(out_dir, "tokenizer") if args.train_tokenizer else None
    started = time.time()
    print(f"pipeline: {', '.join(chosen)} -> {out_dir} ({args.device}, {args.nproc_per_node} process(es) per stage)")
    native_bf16 = args.device != "cpu" or cpu_has_native_bf16()
    if not args.dtype and not native_bf16 and any(s.get("args", {}).get("dtype") == "bfloat16" for s in all_stages):
        print(f"pipeline: {NO_NATIVE_BF16}, so the config's bfloat16 stages run in float32 (emulated bf16 is about "
              "25x slower); the models differ from the README's bf16 ones. --dtype bfloat16 forces bf16.")

    # ---- training stages, in order ----
    for number, stage in enumerate(all_stages, start=1):
        name = stage["name"]
        stage_dir = os.path.join(out_dir, name)
        done = os.path.exists(os.path.join(stage_dir, stage.get("output") or
                                           ("final" if name != "tokenizer" else "tokenizer.json")))
        if name not in chosen:
            continue
        if done and not args.force:
            print(f"[{number}/{len(all_stages)}] {name}: skipped, {stage_dir} exists (--force reruns it)")
            continue
        if not args.dry_run:
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.makedirs(stage_dir)
        command = launcher(1 if name == "tokenizer" else args.nproc_per_node) + [stage["script"]]
        stage_args = dict(stage.get("args", {}))
        if name == "tokenizer":
            stage_args["out_dir"] = stage_dir
        else:
            stage_args.update(out_dir=stage_dir, device=args.device)
            if args.seed is not None:
                stage_args["seed"] = args.seed
            if not stage.get("output"):                 # a data stage logs nothing to wandb
                stage_args["report_to"] = args.report_to
            dtype = stage_dtype(stage_args.get("dtype"), args.dtype, args.device, native_bf16)
            if dtype:
                stage_args["dtype"] = dtype
            if stage.get("init_from"):
                stage_args["init_from"] = os.path.join(out_dir, stage["init_from"], "final")
            if stage.get("data_from"):
                source = next(s for s in all_stages if s["name"] == stage["data_from"])
                stage_args["data_path"] = os.path.join(out_dir, source["name"], source["output"])
            elif tokenizer_dir:
                stage_args["tokenizer"] = tokenizer_dir
        command += flags(stage_args)
        print(f"[{number}/{len(all_stages)}] {name}: {shown(command)}", flush=True)
        if args.dry_run:
            continue
        status, seconds = run_logged(command, os.path.join(stage_dir, "log.txt"))
        if status != 0:
            print(f"[{number}/{len(all_stages)}] {name}: FAILED (exit status {status}) after {seconds:.0f}s; last lines "
                  f"of {stage_dir}/log.txt:\n{tail(os.path.join(stage_dir, 'log.txt'))}", file=sys.stderr)
            return 1
        summary = tail(os.path.join(stage_dir, "log.txt"), 2).strip().replace("\n", "; ") if stage.get("output") \
            else last_metrics(stage_dir)
        print(f"[{number}/{len(all_stages)}] {name}: done in {seconds / 60:.1f} min ({summary})", flush=True)

    # ---- evaluation of every stage's checkpoint, then the comparison ----
    trained = [s["name"] for s in all_stages if s["name"] != "tokenizer"
               and os.path.isdir(os.path.join(out_dir, s["name"], "final"))]
    results = []
    for name in trained:
        result = os.path.join(out_dir, "eval", f"{name}.json")
        if os.path.isfile(result) and name not in chosen and not args.force:
            results.append(result)
            continue
        command = [sys.executable, "eval/evaluate.py", "--model", os.path.join(out_dir, name, "final"),
                   "--device", args.device, "--json", result] + flags(config.get("evaluation", {}))
        print(f"eval {name}: {shown(command)}", flush=True)
        if args.dry_run:
            continue
        status, seconds = run_logged(command, os.path.join(out_dir, "eval", f"{name}.log"))
        if status != 0:
            print(f"eval {name}: FAILED (exit status {status}):\n{tail(os.path.join(out_dir, 'eval', name + '.log'))}",
                  file=sys.stderr)
            return 1
        results.append(result)
    if args.dry_run or not results:
        return 0
    table = results_table(out_dir, trained)
    print("\naccuracy on held-out problems per stage (80% intervals, Jeffreys):\n" + table)
    if len(results) >= 2:
        command = [sys.executable, "eval/compare.py", *results, "--json", os.path.join(out_dir, "eval",
                                                                                       "compare.json")]
        comparison = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        print("\n" + comparison.stdout.rstrip())
        if comparison.returncode != 0:
            print(comparison.stderr, file=sys.stderr)
            return 1
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(f"\npipeline done in {(time.time() - started) / 60:.1f} min: {out_dir}/results.md")
    return 0


def cli(argv=None) -> int:
    try:
        return main(argv)
    except UsageError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
