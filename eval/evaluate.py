"""Evaluate a checkpoint on verifiable tasks: accuracy with an 80% interval, score statistics, pass@k.

    python eval/evaluate.py --model out/sft/final --tasks arithmetic,sat --num_samples 200
    python eval/evaluate.py --model out/sft/final --tasks arithmetic,sort --num_samples 100 --json results/sft.json
    python eval/evaluate.py --model out/grpo/final --tasks arithmetic:level=4,countdown --num_samples 200 \\
        --samples_per_problem 8 --temperature 0.8 --device cuda --json results/grpo.json      # pass@1, 2, 4, 8
    python eval/evaluate.py --model out/sft/final --adapter out/lora/final --tasks sat --num_samples 100
    python eval/evaluate.py --model out/sft/final --tasks arithmetic,sat --num_samples 100 \\
        --task_weights arithmetic=1,sat=3                                   # weighted aggregate

Tasks (eval/tasks; options after ":", e.g. sat:n_vars=6): arithmetic, sat, sort, countdown. Problems are the
held-out ones of --eval_seed (default eval/tasks EVAL_SEED), never seen in training data, and distinct: a task
whose held-out partition is smaller than --num_samples is evaluated on all of it (arithmetic:level=1 holds 12). Per task: accuracy
(fraction of samples scoring 1), its 80% interval (Jeffreys: equal-tailed interval of the Beta(0.5 + successes,
0.5 + failures) posterior, problems as the independent draws), mean/std/median score, success rate (score > 0),
unbiased pass@k for k = 1, 2, 4, ..., K when --samples_per_problem K > 1, and the fraction of answers that ended
before --max_new_tokens. The aggregate is the --task_weights-weighted mean over tasks (equal weights by default).
--json FILE writes one JSON object {"model", "adapter", "settings", "tasks": {task: {...}}, "aggregate": {...}};
eval/compare.py compares several such files. --samples_jsonl FILE keeps every completion with its score.
--learned_decoding needs a model with decoding heads (trainer/train_sft.py --train_temp); --temperature is then
unused, and --min_p 0 means the min-p ratio the heads were trained for.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
from safetensors import SafetensorError

from minitrain.dataset.files import write_atomic
from minitrain.eval.cli import OneLineParser, UsageError, check_device, load_heads_for_decoding, run_cli
from minitrain.eval.stats import interval_key
from minitrain.eval.task_eval import AGGREGATE, PromptTooLong, check_settings, evaluate_tasks, parse_task_names
from minitrain.eval.tasks import EVAL_SEED, ProblemSpaceError
from minitrain.model.checkpoint import DTYPES, check_model_dir, load_model
from minitrain.model.config import ConfigError


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (ours or a local Hugging Face one)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT layout) applied on top of --model")
    p.add_argument("--tasks", required=True, help="comma-separated tasks, e.g. arithmetic,sat or arithmetic:level=2")
    p.add_argument("--num_samples", type=int, default=100, help="held-out problems per task")
    p.add_argument("--samples_per_problem", type=int, default=1,
                   help="completions per problem (K); K > 1 reports pass@k and needs --temperature > 0")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--learned_decoding", action="store_true",
                   help="sample with the temperature (and top-p) the model's decoding heads predict per token")
    p.add_argument("--compile", action="store_true",
                   help="decode with the compiled step (model/generate.py): 10 to 40 s of compiling per batch shape, "
                        "then faster tokens (the same greedy tokens as the eager step in the tests)")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min_p", type=float, default=0.0, help="drop tokens below min_p x the top probability (0 = off)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="longest answer in tokens")
    p.add_argument("--batch_size", type=int, default=32, help="prompts generated together")
    p.add_argument("--task_weights", default="", help="weights of the aggregate, e.g. arithmetic=1,sat=3 "
                                                      "(default: equal); every task needs one")
    p.add_argument("--eval_seed", type=int, default=EVAL_SEED, help="seed of the held-out problems")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights dtype; auto = as saved in the checkpoint")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as one JSON object to FILE")
    p.add_argument("--samples_jsonl", default=None, metavar="FILE",
                   help='write every completion to FILE, one {"task", "id", "question", "completion", "score"} a line')
    args = p.parse_args(argv)
    try:
        check_settings(args.num_samples, args.samples_per_problem, args.temperature, args.top_k, args.top_p,
                       args.min_p, args.max_new_tokens, args.batch_size, args.eval_seed, flag_prefix="--",
                       learned_decoding=args.learned_decoding)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        args.tasks = parse_task_names(args.tasks)
    except ValueError as e:
        raise UsageError(f"--tasks {args.tasks}: {e}") from None
    args.task_weights = parse_task_weights(args.task_weights, args.tasks)
    check_device(args.device)
    try:
        check_model_dir(args.model)
    except ConfigError as e:
        raise UsageError(f"--model {e}") from None
    if args.adapter is not None and not os.path.isdir(args.adapter):
        raise UsageError(f"--adapter {args.adapter}: adapter directory not found")
    for flag, path in (("--json", args.json), ("--samples_jsonl", args.samples_jsonl)):
        if path is None:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UsageError(f"{flag} {path}: directory {parent} does not exist")
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path}: is a directory; give a file name")
    if args.json and args.samples_jsonl and os.path.abspath(args.json) == os.path.abspath(args.samples_jsonl):
        raise UsageError(f"--json and --samples_jsonl name the same file {args.json}")
    return args


def parse_task_weights(text: str, tasks: list[str]) -> dict[str, float] | None:
    """"arithmetic=1,sat=3" -> {"arithmetic": 1.0, "sat": 3.0}; None for ""; every task exactly once, weights >= 0."""
    if not text.strip():
        return None
    weights = {}
    for item in text.split(","):
        name, sep, value = item.strip().rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not math.isfinite(weight) or weight < 0:
            raise UsageError(f"--task_weights: {item.strip()!r} is not task=weight with a weight >= 0")
        if name not in tasks:
            raise UsageError(f"--task_weights: {name!r} is not one of --tasks ({', '.join(tasks)})")
        if name in weights:
            raise UsageError(f"--task_weights: {name!r} is given twice")
        weights[name] = weight
    missing = [name for name in tasks if name not in weights]
    if missing:
        raise UsageError(f"--task_weights: no weight for {', '.join(missing)}")
    if sum(weights.values()) <= 0:
        raise UsageError("--task_weights: the weights must not all be 0")
    return weights


def load(args):
    try:
        model, tokenizer = load_model(args.model, device=args.device, dtype=DTYPES.get(args.dtype))
    except SafetensorError as e:   # a damaged weights file (load_model names config and tensor errors itself)
        raise UsageError(f"--model {args.model}: a safetensors weights file is unreadable "
                         f"({str(e).splitlines()[0]})") from None
    if args.adapter:
        try:
            from minitrain.model.lora import load_adapter   # LoRA lives in model/lora.py
        except ModuleNotFoundError as e:
            if e.name != "minitrain.model.lora":
                raise
            raise UsageError("--adapter needs model/lora.py (LoRA support), not available in this build") from None
        model = load_adapter(model, args.adapter)
    load_heads_for_decoding(model, args)
    return model.eval(), tokenizer


def settings_of(args) -> dict:
    return {"tasks": args.tasks, "num_samples": args.num_samples, "samples_per_problem": args.samples_per_problem,
            "temperature": args.temperature, "learned_decoding": args.learned_decoding,
            "compiled": args.compile, "top_k": args.top_k,
            "top_p": args.top_p, "min_p": args.min_p,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "eval_seed": args.eval_seed,
            "seed": args.seed, "device": args.device, "dtype": args.dtype, "task_weights": args.task_weights}


def format_table(report: dict) -> str:
    """The terminal table of a report (the --json object)."""
    tasks, key = report["tasks"], interval_key()
    k = report["settings"]["samples_per_problem"]
    pass_keys = [name for name in next(iter(tasks.values())) if name.startswith("pass@")] if k > 1 else []
    header = ["task", "accuracy", "80% interval", "mean", "std", "median", "success", *pass_keys, "ended", "n"]
    rows = []
    for name, s in tasks.items():
        rows.append([name, f"{s['accuracy']:.3f}", f"[{s[key][0]:.3f}, {s[key][1]:.3f}]", f"{s['mean']:.3f}",
                     f"{s['std']:.3f}", f"{s['median']:.3f}", f"{s['success_rate']:.3f}",
                     *[f"{s[p]:.3f}" for p in pass_keys], f"{s['finished_rate']:.2f}",
                     f"{s['num_samples']}" + (f"x{k}" if k > 1 else "")])
    agg = report["aggregate"]
    rows.append([AGGREGATE, f"{agg['accuracy']:.3f}", "", f"{agg['mean']:.3f}", "", "", f"{agg['success_rate']:.3f}",
                 *[""] * len(pass_keys), "", ""])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):   # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    weights = ", ".join(f"{n} {w:.2f}" for n, w in agg["weights"].items())
    return "\n".join([line(header), *(line(r) for r in rows), f"aggregate weights: {weights}",
                      "ended = fraction of answers that stopped at <|im_end|> before --max_new_tokens"])




def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tokenizer = load(args)
    if args.learned_decoding and args.min_p == 0:   # the min-p the heads were trained for (recorded in settings)
        args.min_p = model.decoding_heads.min_p_ratio
    started = time.perf_counter()
    try:
        results = evaluate_tasks(model, tokenizer, args.tasks, args.num_samples, args.samples_per_problem,
                                 args.temperature, args.top_k, args.top_p, args.min_p, args.max_new_tokens,
                                 args.batch_size, args.seed, args.device, args.eval_seed, args.task_weights,
                                 keep_samples=args.samples_jsonl is not None, learned_decoding=args.learned_decoding,
                                 compiled=args.compile)
    except PromptTooLong as e:
        raise UsageError(f"--max_new_tokens {args.max_new_tokens}: {e}") from None
    except ProblemSpaceError as e:   # options that leave (almost) no held-out problem: sort:length=2:max_value=1
        raise UsageError(f"--tasks: {e}") from None
    samples = {name: results[name].pop("samples", []) for name in args.tasks}
    report = {"model": args.model, "adapter": args.adapter, "settings": settings_of(args),
              "tasks": {name: results[name] for name in args.tasks}, "aggregate": results[AGGREGATE],
              "seconds": time.perf_counter() - started}
    k = args.samples_per_problem
    for name in args.tasks:
        if report["tasks"][name]["num_samples"] < args.num_samples:
            print(f"note: {name} holds only {report['tasks'][name]['num_samples']} distinct held-out problems "
                  f"(--num_samples {args.num_samples}); all of them are evaluated")
    print(f"{args.model}{' + ' + args.adapter if args.adapter else ''} | up to {args.num_samples} distinct held-out "
          f"problems per task"
          f"{f' x {k} samples' if k > 1 else ''} | "
          f"{'learned decoding' if args.learned_decoding else f'temperature {args.temperature:g}'} | "
          f"eval_seed {args.eval_seed} | "
          f"{report['seconds']:.1f}s")
    print(format_table(report))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.samples_jsonl:
        write_atomic(args.samples_jsonl, "".join(json.dumps({"task": name, **row}) + "\n"
                                                 for name in args.tasks for row in samples[name]))
        print(f"wrote {args.samples_jsonl}")
    return report


def cli(argv=None) -> int:
    """main as a command: bad input is one `error: ...` line on stderr and exit status 2, never a traceback."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
