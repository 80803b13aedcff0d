"""Task evaluation: generate answers to held-out task problems in batches and score them.

    from minitrain.eval.task_eval import evaluate_tasks, task_metrics
    results = evaluate_tasks(model, tokenizer, ["arithmetic", "sat"], num_samples=100)
    results["arithmetic"]["accuracy"], results["arithmetic"]["ci80"], results["aggregate"]["accuracy"]
    task_metrics(results)     # {"eval/arithmetic/accuracy": ..., "eval/sat/accuracy": ..., "eval/aggregate/...": ...}

What trainers call for --eval_tasks (trainer/evaluation.py) and eval/evaluate.py builds its report on. Each problem
(eval/tasks, drawn from an evaluation seed, so never one the training data holds) becomes the chat prompt
tokenizer.chat_prompt_ids(problem.messages()); model.generate.generate answers every prompt in batches, a row
stopping at <|im_end|>; task.score reads the decoded answer. Statistics: eval/stats.py. learned_decoding=True
samples every token with the temperature (and top-p) the model's decoding heads predict (model/generate.py).
"""

import math
import time

import torch

from minitrain.eval.stats import DEFAULT_LEVEL, summarize, weighted_aggregate
from minitrain.eval.tasks import EVAL_SEED, TRAIN_SEED_BASE, get_task
from minitrain.model.generate import generate

AGGREGATE = "aggregate"      # the key of the weighted aggregate, beside the task names, in evaluate_tasks' result


class PromptTooLong(ValueError):
    """A prompt plus max_new_tokens does not fit the model's max_position_embeddings."""


def parse_task_names(text: str) -> list[str]:
    """"arithmetic, sat:n_vars=6" -> ["arithmetic", "sat:n_vars=6"]; ValueError on an empty list, a repeated or an
    unknown task (get_task checks names and options)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("no task given")
    for name in names:
        get_task(name)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"task listed twice: {', '.join(repeated)}")
    return names


def generate_completions(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                         temperature: float, top_k: int, top_p: float, min_p: float,
                         generator: torch.Generator | None, learned_decoding: bool = False, compiled: bool = False
                         ) -> tuple[list[str], list[bool]]:
    """Decoded completions (special tokens dropped) of every prompt and whether each stopped at EOS.

    Prompts are batched longest first, so a batch's rows have similar lengths and little left padding; the results
    come back in the prompts' order.
    """
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts, finished = [""] * len(prompts), [False] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        out = generate(model, [prompts[i] for i in rows], max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, min_p=min_p, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                       generator=generator, learned_decoding=learned_decoding, compiled=compiled)
        for i, ids, done in zip(rows, out.completions, out.finished):
            texts[i], finished[i] = tokenizer.decode(ids), done
    return texts, finished


def held_out_prompts(tokenizer, task_name: str, num_samples: int, eval_seed: int = EVAL_SEED):
    """(task, problems, prompt ids) of num_samples distinct held-out problems of a task (all the task has when that
    is fewer: arithmetic:level=1 holds 12). Distinct, because a repeated problem adds no information under greedy
    decoding yet counts as a new draw in the interval."""
    task = get_task(task_name)
    problems = task.make_problems(num_samples, eval_seed, distinct=True)
    return task, problems, [tokenizer.chat_prompt_ids(problem.messages()) for problem in problems]


@torch.no_grad()
def evaluate_task(model, tokenizer, task, problems, prompts: list[list[int]], samples_per_problem: int = 1,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                  max_new_tokens: int = 128, batch_size: int = 32, generator: torch.Generator | None = None,
                  level: float = DEFAULT_LEVEL, keep_samples: bool = False, learned_decoding: bool = False,
                  compiled: bool = False) -> dict:
    """Summary (eval/stats.summarize) of one task on its problems (prompts[i] = problem i's chat prompt), with
    samples_per_problem completions each.

    Adds "finished_rate" (fraction of completions that stopped at EOS rather than at max_new_tokens),
    "distinct_problems" (equal to num_samples for held_out_prompts' problems, which never repeat), "per_problem"
    ({question: mean score}, which eval/compare.py pairs across models) and "seconds".
    keep_samples: also return "samples", one {"id", "question", "completion", "score"} per completion.
    """
    started = time.perf_counter()
    jobs = [(p, s) for p in range(len(problems)) for s in range(samples_per_problem)]   # (problem, sample) pairs
    texts, finished = generate_completions(model, tokenizer, [prompts[p] for p, _ in jobs], max_new_tokens,
                                           batch_size, temperature, top_k, top_p, min_p, generator,
                                           learned_decoding, compiled)
    scores = [[0.0] * samples_per_problem for _ in problems]
    for (p, s), text in zip(jobs, texts):
        scores[p][s] = task.score(problems[p], text)
    summary = summarize(scores, level)
    summary["finished_rate"] = sum(finished) / len(finished)
    summary["distinct_problems"] = len({problem.question for problem in problems})
    # each problem's mean score by question: eval/compare.py pairs two models' results on the same problems
    summary["per_problem"] = {problem.question: sum(s) / len(s) for problem, s in zip(problems, scores)}
    summary["seconds"] = time.perf_counter() - started
    if keep_samples:
        summary["samples"] = [{"id": problems[p].id, "question": problems[p].question, "completion": text,
                               "score": scores[p][s]} for (p, s), text in zip(jobs, texts)]
    return summary


def check_settings(num_samples: int, samples_per_problem: int = 1, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, min_p: float = 0.0, max_new_tokens: int = 128, batch_size: int = 32,
                   eval_seed: int = EVAL_SEED, flag_prefix: str = "", learned_decoding: bool = False) -> None:
    """ValueError naming the setting (as flag_prefix + name, "--num_samples" for a CLI) when one is out of range."""
    def f(name: str) -> str:   # a setting's name as the caller spells it
        return f"{flag_prefix}{name}"

    checks = [
        (num_samples >= 1, f"{f('num_samples')} must be >= 1, got {num_samples}"),
        (samples_per_problem >= 1, f"{f('samples_per_problem')} must be >= 1, got {samples_per_problem}"),
        (math.isfinite(temperature) and temperature >= 0, f"{f('temperature')} must be >= 0, got {temperature}"),
        (samples_per_problem == 1 or temperature > 0 or learned_decoding,
         f"{f('samples_per_problem')} {samples_per_problem} needs {f('temperature')} > 0 or learned decoding (greedy "
         f"decoding gives every sample the same answer)"),
        (top_k >= 0, f"{f('top_k')} must be >= 0, got {top_k}"),
        (0 < top_p <= 1, f"{f('top_p')} must be in (0, 1], got {top_p}"),
        (0 <= min_p <= 1, f"{f('min_p')} must be in [0, 1], got {min_p}"),
        (max_new_tokens >= 1, f"{f('max_new_tokens')} must be >= 1, got {max_new_tokens}"),
        (batch_size >= 1, f"{f('batch_size')} must be >= 1, got {batch_size}"),
        (0 <= eval_seed < TRAIN_SEED_BASE,
         f"{f('eval_seed')} must be in [0, {TRAIN_SEED_BASE}) (seeds from {TRAIN_SEED_BASE} on draw training "
         f"problems), got {eval_seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def prepare_task_prompts(tokenizer, task_names: list[str], num_samples: int, max_new_tokens: int,
                         max_positions: int, eval_seed: int = EVAL_SEED) -> dict[str, tuple]:
    """{task: (task, problems, prompt ids)} of each task's held-out problems; PromptTooLong when the longest prompt
    plus max_new_tokens does not fit max_positions (trainers call this at start-up to fail before training)."""
    prepared = {name: held_out_prompts(tokenizer, name, num_samples, eval_seed) for name in task_names}
    longest = max(len(prompt) for _, _, prompts in prepared.values() for prompt in prompts)
    if longest + max_new_tokens > max_positions:
        raise PromptTooLong(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                            f"model's max_position_embeddings ({max_positions})")
    return prepared


@torch.no_grad()
def evaluate_tasks(model, tokenizer, task_names: list[str], num_samples: int, samples_per_problem: int = 1,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                   max_new_tokens: int = 128, batch_size: int = 32, seed: int = 0, device=None,
                   eval_seed: int = EVAL_SEED, task_weights: dict[str, float] | None = None,
                   level: float = DEFAULT_LEVEL, keep_samples: bool = False, learned_decoding: bool = False,
                   compiled: bool = False) -> dict:
    """Evaluate `model` on each task of task_names; returns {task_name: summary, ..., "aggregate": aggregate}.

    A summary (eval/stats.summarize and evaluate_task) holds accuracy, ci80, mean, std, median, success_rate,
    num_samples (problems), pass@k (samples_per_problem > 1), finished_rate, ... The aggregate is the
    task_weights-weighted mean of accuracy, mean and success_rate (equal weights when None) with the normalised
    weights. seed seeds the sampling generator (unused when greedy); device: the model's, by default that of its
    parameters. Every setting, task and prompt length is checked (ValueError) before anything is generated. The
    model is put in eval mode and given back in the mode it came in. learned_decoding: the model's decoding heads
    set each token's temperature (and top-p); temperature is then unused (ValueError for a model without heads).
    """
    check_settings(num_samples, samples_per_problem, temperature, top_k, top_p, min_p, max_new_tokens, batch_size,
                   eval_seed, learned_decoding=learned_decoding)
    if AGGREGATE in task_names:
        raise ValueError(f"'{AGGREGATE}' is not a task name")
    if len(set(task_names)) != len(task_names):
        raise ValueError(f"a task is listed twice: {', '.join(task_names)}")
    if task_weights is not None:
        weighted_aggregate({name: {} for name in task_names}, task_weights, fields=())   # checks the weights
    inner = getattr(model, "_orig_mod", model)           # torch.compile wrapper
    limit = getattr(inner, "module", inner).config.max_position_embeddings   # DistributedDataParallel wrapper
    if learned_decoding and getattr(getattr(inner, "module", inner), "decoding_heads", None) is None:
        raise ValueError("learned decoding needs a model with decoding heads (trainer/train_sft.py --train_temp)")
    prepared = prepare_task_prompts(tokenizer, task_names, num_samples, max_new_tokens, limit, eval_seed)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        results = {name: evaluate_task(model, tokenizer, task, problems, prompts, samples_per_problem, temperature,
                                       top_k, top_p, min_p, max_new_tokens, batch_size, generator, level,
                                       keep_samples, learned_decoding, compiled)
                   for name, (task, problems, prompts) in prepared.items()}
    finally:
        model.train(was_training)
    return {**results, AGGREGATE: weighted_aggregate(results, task_weights)}


def task_metrics(results: dict, prefix: str = "eval/", fields: tuple[str, ...] = ("accuracy",)) -> dict[str, float]:
    """Flatten evaluate_tasks' result into scalar metrics: {"eval/<task>/accuracy": x, "eval/aggregate/accuracy": y}.

    Fields a summary lacks (pass@4 without samples) are skipped."""
    return {f"{prefix}{name}/{field}": float(summary[field])
            for name, summary in results.items() for field in fields if field in summary}
