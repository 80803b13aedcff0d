"""Compare evaluation results side by side: accuracy and 80% interval per task, Pareto dominance, Pareto frontier.

    python eval/compare.py results/sft.json results/dpo.json results/grpo.json
    python eval/compare.py results/*.json --names sft,dpo,grpo --json results/compare.json

Each FILE is an `eval/evaluate.py --json` result. A model is named by its file name without .json (the full path
when two file names are equal) unless --names is given. Model A Pareto-dominates model B when A's accuracy is no
worse on every task and better on at least one; the Pareto frontier holds the models no other model dominates.
Dominance is judged on the tasks every file evaluated (the others are shown, not judged) and on point estimates:
the table's 80% intervals say how much of a difference the sample sizes can resolve. Settings that differ between
files (temperature, num_samples, ...) are listed, since they make accuracies incomparable.

Paired changes: where the files hold per-problem scores (evaluate.py writes them), every pair of models, in the
files' order, is compared problem by problem on the problems both evaluated: +gained/-lost counts the problems the
later model scores higher/lower, and p is the two-sided exact sign test (McNemar's exact test for 0/1 scores). A
pairing sees what two independent intervals cannot: two models that differ on few problems differ significantly
even when their intervals overlap. "all" pools every common task's problems.
"""

import argparse
import json
import math
import os
import sys

from minitrain.dataset.files import write_atomic
from minitrain.eval.cli import OneLineParser, UsageError, run_cli
from minitrain.eval.stats import dominance_pairs, paired_changes, pareto_frontier

INTERVAL = "ci80"
COMPARED_SETTINGS = ("num_samples", "samples_per_problem", "temperature", "top_k", "top_p", "min_p",
                     "max_new_tokens", "eval_seed")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="result files written by eval/evaluate.py --json")
    p.add_argument("--names", default="", help="comma-separated model names, one per FILE (default: file names)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the comparison as one JSON object to OUT")
    args = p.parse_args(argv)
    if len(args.files) < 2:
        raise UsageError("give at least two result files to compare")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UsageError(f"--json {args.json}: directory {os.path.dirname(os.path.abspath(args.json))} does not exist")
    if args.json and os.path.isdir(args.json):
        raise UsageError(f"--json {args.json}: is a directory; give a file name")
    return args


def is_number(x) -> bool:
    """A finite JSON number (true/false are not numbers here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_result(path: str) -> dict:
    """An evaluate.py result file, checked for the fields compare needs (UsageError naming file and field)."""
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, not a result file")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: file not found")
    try:
        with open(path) as f:
            result = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(result, dict) or not isinstance(result.get("tasks"), dict) or not result["tasks"]:
        raise UsageError(f"{path}: field 'tasks' is missing or empty (not an eval/evaluate.py --json result)")
    for task, summary in result["tasks"].items():
        accuracy = summary.get("accuracy") if isinstance(summary, dict) else None
        interval = summary.get(INTERVAL) if isinstance(summary, dict) else None
        if not is_number(accuracy) or not 0 <= accuracy <= 1:
            raise UsageError(f"{path}: field 'tasks.{task}.accuracy' must be a number in [0, 1]")
        if not (isinstance(interval, list) and len(interval) == 2 and all(is_number(x) for x in interval)
                and 0 <= interval[0] <= interval[1] <= 1):
            raise UsageError(f"{path}: field 'tasks.{task}.{INTERVAL}' must be a list [lower, upper] with "
                             f"0 <= lower <= upper <= 1")
    if not isinstance(result.get("settings", {}), dict):
        raise UsageError(f"{path}: field 'settings' must be an object")
    for field in ("model", "adapter"):
        if not isinstance(result.get(field), (str, type(None))):
            raise UsageError(f"{path}: field '{field}' must be a path or null")
    return result


def model_names(files: list[str], names: str) -> list[str]:
    if names:
        given = [name.strip() for name in names.split(",")]
        if len(given) != len(files) or any(not name for name in given) or len(set(given)) != len(given):
            raise UsageError(f"--names: need {len(files)} distinct non-empty names, one per file, got {names!r}")
        return given
    stems = [os.path.splitext(os.path.basename(path))[0] for path in files]
    if len(set(stems)) == len(stems):
        return stems
    if len(set(files)) != len(files):
        raise UsageError("the same result file is given twice")
    return list(files)


def compare(results: dict[str, dict]) -> dict:
    """The comparison of named results {name: evaluate.py result}: table, common tasks, dominance, frontier."""
    tasks = []
    for result in results.values():
        tasks += [task for task in result["tasks"] if task not in tasks]
    common = [task for task in tasks if all(task in r["tasks"] for r in results.values())]
    table = {name: {task: {"accuracy": r["tasks"][task]["accuracy"], INTERVAL: r["tasks"][task][INTERVAL],
                           "num_samples": r["tasks"][task].get("num_samples")}
                    for task in tasks if task in r["tasks"]} for name, r in results.items()}
    differing = {}
    for key in COMPARED_SETTINGS:
        values = {name: r.get("settings", {}).get(key) for name, r in results.items()}
        if len({json.dumps(v) for v in values.values()}) > 1:
            differing[key] = values
    comparison = {"models": {name: {"model": r.get("model"), "adapter": r.get("adapter")}
                             for name, r in results.items()},
                  "tasks": tasks, "common_tasks": common, "table": table, "differing_settings": differing,
                  "dominates": [], "frontier": []}
    if common:
        accuracies = {name: {task: r["tasks"][task]["accuracy"] for task in common} for name, r in results.items()}
        comparison["dominates"] = [list(pair) for pair in dominance_pairs(accuracies)]
        comparison["frontier"] = pareto_frontier(accuracies)
    comparison["paired"] = paired_comparisons(results, common)
    return comparison


def per_problem(result: dict, task: str) -> dict | None:
    """{question: score} of a task, when the file holds them as numbers (older files do not)."""
    scores = result["tasks"][task].get("per_problem")
    if isinstance(scores, dict) and scores and all(is_number(v) for v in scores.values()):
        return scores
    return None


def paired_comparisons(results: dict[str, dict], tasks: list[str]) -> list[dict]:
    """[{"before", "after", "tasks": {task or "all": paired_changes}}] for every pair of models (files' order) on the
    common tasks whose per-problem scores both files hold; [] when none do."""
    names, pairs = list(results), []
    for i, before in enumerate(names):
        for after in names[i + 1:]:
            changes, pooled_before, pooled_after = {}, {}, {}
            for task in tasks:
                a, b = per_problem(results[before], task), per_problem(results[after], task)
                if a is None or b is None:
                    continue
                changes[task] = paired_changes(a, b)
                pooled_before.update({(task, q): v for q, v in a.items()})
                pooled_after.update({(task, q): v for q, v in b.items()})
            if len(changes) > 1:
                changes["all"] = paired_changes(pooled_before, pooled_after)
            if changes:
                pairs.append({"before": before, "after": after, "tasks": changes})
    return pairs


def line_of(cells: list[str], widths: list[int]) -> str:
    """A table line: first column left-aligned, the others right-aligned."""
    return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(cells, widths))).rstrip()


def format_comparison(c: dict) -> str:
    names = list(c["table"])
    header = ["model", *c["tasks"]]
    rows = [[name, *(f"{cell['accuracy']:.3f} [{cell[INTERVAL][0]:.3f}, {cell[INTERVAL][1]:.3f}]"
                     if (cell := c["table"][name].get(task)) else "-" for task in c["tasks"])] for name in names]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    out = ["accuracy [80% interval] per task", line_of(header, widths), *(line_of(r, widths) for r in rows), ""]
    for name, where in c["models"].items():
        out.append(f"{name}: {where['model']}{' + ' + where['adapter'] if where.get('adapter') else ''}")
    if not c["common_tasks"]:
        out.append("\nno task is evaluated in every file: nothing to judge dominance on")
        return "\n".join(out)
    skipped = [task for task in c["tasks"] if task not in c["common_tasks"]]
    out.append(f"\nPareto dominance on {', '.join(c['common_tasks'])}"
               + (f" (not judged, missing from some files: {', '.join(skipped)})" if skipped else ""))
    dominating = {tuple(pair) for pair in c["dominates"]}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            verdict = f"{a} dominates {b}" if (a, b) in dominating else \
                f"{b} dominates {a}" if (b, a) in dominating else "neither dominates"
            out.append(f"  {a} vs {b}: {verdict}")
    out.append(f"Pareto frontier: {', '.join(c['frontier'])}")
    if c.get("paired"):
        columns = list(c["paired"][0]["tasks"])
        header = ["change", *columns]
        rows = [[f"{p['before']} -> {p['after']}",
                 *(f"+{x['gained']}/-{x['lost']} p={x['p']:.2g}" if (x := p["tasks"].get(t)) else "-"
                   for t in columns)] for p in c["paired"]]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        out.append("\npaired on the same problems: +problems gained/-lost, exact sign test p (McNemar)")
        out += [line_of(header, widths), *(line_of(r, widths) for r in rows)]
    for key, values in c["differing_settings"].items():
        out.append(f"note: settings differ, {key}: " + ", ".join(f"{n} {json.dumps(v)}" for n, v in values.items()))
    return "\n".join(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = model_names(args.files, args.names)
    comparison = compare({name: read_result(path) for name, path in zip(names, args.files)})
    comparison["files"] = dict(zip(names, args.files))
    print(format_comparison(comparison))
    if args.json:
        write_atomic(args.json, json.dumps(comparison, indent=2) + "\n")
        print(f"wrote {args.json}")
    return comparison


def cli(argv=None) -> int:
    """main as a command: bad input is one `error: ...` line on stderr and exit status 2, never a traceback."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
