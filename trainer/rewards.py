"""Rewards for reinforcement learning and for ranking sampled answers, all in one place.

A reward function takes the prompts, the completions and the other fields of the prompt rows, one list per field
(TRL's convention), and returns one float per completion:

    def my_reward(prompts: list[str], completions: list[str], **rows) -> list[float]: ...

--reward_funcs names built-ins or any importable `module:function`; --reward_weights weighs them. Built-ins:

    exact_answer     1.0 when the task's checker accepts the answer, else 0.0 (eval/tasks: rows carry "task",
                     "answer", "id", "meta", as the embedded rlaif.jsonl does)
    format           1.0 for "<think>...</think> <answer>...</answer>" and nothing else, 0.5 for a closed
                     <answer>...</answer> without the think part, 0.0 otherwise
    tiered           partial credit by tiers: perfect 1.0 (right), near 0.6 (the task's closeness >= 0.9), partial
                     0.3 (an answer of the right form, farther off), attempted 0.1 (an <answer> tag whose content
                     is not of the task's form, or a <think> part without an answer), wrong 0.0 (nothing usable)
    length_penalty   -(characters beyond 400) / 400, at most -1: discourages rambling (0 for short answers)

    reward = CombinedReward(["exact_answer", "format"], [1.0, 0.1])
    total, per_function = reward(prompts, completions, rows)   # total[i] = sum_f w_f * f(...)[i]

parse_reward_flags builds that from the two flags; check_reward_flags checks an RL config's reward flags (validate);
score_completions adds a reward model's weighted score (--reward_model, trainer/train_reward.py) to the functions'.
"""

import importlib
import inspect
import math
import re

import torch
import torch.nn as nn

from minitrain.eval.tasks import extract_answer, get_task, problem_from_row
from minitrain.model.config import ConfigError
from minitrain.model.heads import load_reward_model
from minitrain.trainer.configuration import FlagError
from minitrain.trainer.modeling import check_same_tokenizer
from minitrain.trainer.sequences import pack_sequences

FORMAT_FULL = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
TIERS = {"perfect": 1.0, "near": 0.6, "partial": 0.3, "attempted": 0.1, "wrong": 0.0}
NEAR = 0.9                  # closeness at or above which a wrong answer is "near"
LENGTH_FREE_CHARS = 400     # answers up to this many characters carry no length penalty


class RewardError(ValueError):
    """A reward that cannot be built or that returned something unusable; the message names it."""


def row_problem(rows: dict, i: int):
    """The task and Problem of row i of the column lists (needs task, answer, id, meta and the prompt)."""
    missing = [k for k in ("task", "answer") if k not in rows]
    if missing:
        raise RewardError(f"this reward needs prompt rows with fields {missing} (as the embedded rlaif.jsonl has)")
    row = {"task": rows["task"][i], "answer": rows["answer"][i], "id": (rows.get("id") or [""] * (i + 1))[i],
           "meta": (rows.get("meta") or [{}] * (i + 1))[i], "question": rows["question"][i]}
    return get_task(row["task"]), problem_from_row(row)


def with_questions(prompts: list[str], rows: dict) -> dict:
    """Rows with a "question" column (the prompt's last user message) for problem_from_row."""
    return {**rows, "question": rows.get("question", prompts)}


def exact_answer(prompts: list[str], completions: list[str], **rows) -> list[float]:
    rows = with_questions(prompts, rows)
    scores = []
    for i, completion in enumerate(completions):
        task, problem = row_problem(rows, i)
        scores.append(task.score(problem, completion))
    return scores


def format_reward(prompts: list[str], completions: list[str], **rows) -> list[float]:
    return [1.0 if FORMAT_FULL.fullmatch(c) else 0.5 if extract_answer(c) is not None else 0.0 for c in completions]


def tier_of(task, problem, completion: str) -> str:
    answer = extract_answer(completion)
    if answer is None:
        return "attempted" if "<think>" in completion and "</think>" in completion else "wrong"
    if task.score(problem, completion) == 1.0:
        return "perfect"
    closeness = task.closeness(problem, answer)
    if closeness is None:
        return "attempted"
    return "near" if closeness >= NEAR else "partial"


def tiered(prompts: list[str], completions: list[str], **rows) -> list[float]:
    rows = with_questions(prompts, rows)
    return [TIERS[tier_of(*row_problem(rows, i), completion)] for i, completion in enumerate(completions)]


def length_penalty(prompts: list[str], completions: list[str], **rows) -> list[float]:
    return [-min(1.0, max(0, len(c) - LENGTH_FREE_CHARS) / LENGTH_FREE_CHARS) for c in completions]


BUILT_INS = {"exact_answer": exact_answer, "format": format_reward, "tiered": tiered,
             "length_penalty": length_penalty}


def load_reward(spec: str):
    """A built-in name or 'module:function'; RewardError naming the spec when it cannot be loaded."""
    spec = spec.strip()
    if spec in BUILT_INS:
        return BUILT_INS[spec]
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise RewardError(f"reward {spec!r}: not a built-in ({', '.join(BUILT_INS)}) nor module:function")
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as e:
        raise RewardError(f"reward {spec!r}: {e.filename}: line {e.lineno}: syntax error ({e.msg})") from None
    except ImportError as e:
        raise RewardError(f"reward {spec!r}: cannot import {module_name} ({e})") from None
    except Exception as e:     # the module's own code failed while it was imported
        raise RewardError(f"reward {spec!r}: importing {module_name} raised {type(e).__name__}: {e}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RewardError(f"reward {spec!r}: {module_name} has no function {function_name}")
    check_signature(spec, function)
    return function


def check_signature(spec: str, function) -> None:
    """A reward is called as function(prompts, completions, **rows): RewardError now, before any training, when its
    parameters cannot take that call."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return       # a builtin without a readable signature: nothing to check
    takes_rows = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    try:
        signature.bind([], [])
    except TypeError as e:
        takes_rows = False
        why = str(e)
    else:
        why = "it takes no **rows (the other fields of the prompt rows)"
    if not takes_rows:
        raise RewardError(f"reward {spec!r}: signature {function.__name__}{signature} cannot be called as "
                          f"(prompts, completions, **rows): {why}")


class CombinedReward:
    """sum_f w_f * f(prompts, completions, **rows), with each function's own scores kept for logging."""

    def __init__(self, specs: list[str], weights: list[float] | None = None):
        if not specs:
            raise RewardError("no reward function given")
        weights = [1.0] * len(specs) if weights is None else list(weights)
        if len(weights) != len(specs):
            raise RewardError(f"{len(specs)} reward functions but {len(weights)} weights")
        if not all(math.isfinite(w) for w in weights):
            raise RewardError(f"reward weights must be finite numbers, got {weights}")
        self.names = [s.strip() for s in specs]
        self.functions = [load_reward(s) for s in specs]
        self.weights = weights

    def __call__(self, prompts: list[str], completions: list[str], rows: dict) -> tuple[list[float], dict]:
        total = [0.0] * len(completions)
        per_function = {}
        for name, function, weight in zip(self.names, self.functions, self.weights):
            scores = function(prompts, completions, **rows)
            if not isinstance(scores, (list, tuple)) or len(scores) != len(completions):
                raise RewardError(f"reward {name!r} returned {type(scores).__name__} of length "
                                  f"{len(scores) if hasattr(scores, '__len__') else '?'}, expected a list of "
                                  f"{len(completions)} floats")
            scores = [float(s) for s in scores]
            if not all(math.isfinite(s) for s in scores):
                raise RewardError(f"reward {name!r} returned a value that is not finite")
            per_function[name] = scores
            total = [t + weight * s for t, s in zip(total, scores)]
        return total, per_function


def parse_reward_flags(funcs: str, weights: str) -> CombinedReward:
    """--reward_funcs "exact_answer,format" --reward_weights "1,0.1" -> CombinedReward."""
    specs = [s for s in funcs.split(",") if s.strip()]
    try:
        values = [float(w) for w in weights.split(",")] if weights.strip() else None
    except ValueError:
        raise RewardError(f"--reward_weights {weights!r}: expected comma-separated numbers") from None
    return CombinedReward(specs, values)


def check_reward_flags(cfg) -> None:
    """An RL config's --reward_funcs / --reward_weights / --reward_model: something must score the completions, and
    each reward function must load (FlagError otherwise, which parse_config reports)."""
    if not cfg.reward_funcs.strip() and not cfg.reward_model:
        raise FlagError("reward_funcs", "is empty and no --reward_model is given: nothing scores the completions")
    if cfg.reward_funcs.strip():
        try:
            parse_reward_flags(cfg.reward_funcs, cfg.reward_weights)
        except RewardError as e:
            raise FlagError("reward_funcs", str(e)) from None


# ---- reward models (a checkpoint of trainer/train_reward.py scores the completions) ----

def load_frozen_reward_model(path: str, tokenizer, device: torch.device, flag: str = "reward_model") -> nn.Module:
    """A reward model (trainer/train_reward.py, or a Hugging Face *ForSequenceClassification directory) that scores
    the policy's token ids, frozen and in eval mode; ConfigError naming the flag when it cannot read them."""
    check_same_tokenizer(path, tokenizer, flag)
    reward_model, _ = load_reward_model(path, device, with_tokenizer=False)
    if reward_model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"--{flag} {path}: vocab_size {reward_model.config.vocab_size} is smaller than the "
                          f"policy's tokenizer ({tokenizer.vocab_size} tokens)")
    reward_model.requires_grad_(False)
    return reward_model.eval()


def score_completions(reward: CombinedReward | None, reward_model: nn.Module | None, prompts, indices: list[int],
                      completions: list[list[int]], tokenizer, reward_model_weight: float, batch_size: int,
                      amp) -> tuple[list[float], dict[str, list[float]]]:
    """The reward of each completion of prompts[indices] (a PromptDataset): the reward functions on the decoded text
    plus reward_model_weight * the reward model's score; and each part's scores by name ("reward_model" for the
    model's). Either part may be None."""
    total, per_function = [0.0] * len(indices), {}
    if reward is not None:
        total, per_function = reward([prompts.text(i) for i in indices], [tokenizer.decode(c) for c in completions],
                                     prompts.columns(indices))
    if reward_model is not None:        # scored at the last token of prompt + completion
        with amp:
            scores = reward_model_scores(reward_model, [prompts.ids[i] for i in indices], completions,
                                         tokenizer.pad_id, next(reward_model.parameters()).device, batch_size)
        per_function["reward_model"] = scores
        total = [t + reward_model_weight * x for t, x in zip(total, scores)]
    return total, per_function


def reward_model_scores(reward_model: nn.Module, prompts: list[list[int]], completions: list[list[int]],
                        pad_token_id: int, device: torch.device, batch_size: int = 64) -> list[float]:
    """The reward model's score of each prompt + completion, read at the last real token (as PPO reads it)."""
    scores = []
    for start in range(0, len(prompts), batch_size):
        ids, attention, _, _ = pack_sequences(prompts[start:start + batch_size], completions[start:start + batch_size],
                                              pad_token_id, device)
        scores += reward_model(ids, attention).float().tolist()
    return scores
