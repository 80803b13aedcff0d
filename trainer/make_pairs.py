"""Preference pairs from your own model: sample k answers per prompt, score them, keep the best and the worst.

Commands, from the repository root after `pip install -e .` (and an SFT run in out/sft):

    # the tiny SFT model on 200 of the embedded RL prompts (verifiable answers), on CPU, in about two minutes
    python trainer/make_pairs.py --max_prompts 200

    # one GPU: your model and prompt mixture, 8 answers each, partial credit plus a format bonus
    python trainer/make_pairs.py --init_from out/sft-small/final --device cuda --samples_per_prompt 8 \\
        --data_config config/data/rlaif/default.yaml --reward_funcs tiered,format --reward_weights 1,0.2 \\
        --out_dir data/pairs-small

    # 8 GPUs: the prompts are split over the ranks, rank 0 writes the files
    torchrun --standalone --nproc_per_node 8 trainer/make_pairs.py --init_from out/sft-base/final --device cuda

    # then train on them (the output is a dpo data file)
    python trainer/train_dpo.py --data_path data/pairs/pairs.jsonl

Prompts come through the rlaif phase like every RL trainer's (config/data/rlaif/, --data_config or --data_path: rows
of {"prompt"} or {"messages"} with the fields the rewards read, e.g. "task" and "answer"); the training split of the
prepared mixture is used. Each prompt is answered --samples_per_prompt times (sequences.sample_completions,
--generation_batch_size at a time, sampled at --temperature / --top_k / --top_p); answers that run out of
--max_new_tokens before <|im_end|> are left out unless --keep_unfinished, and so are answers whose text would change
the prompt's tokens (one starting with a space; the DPO reader refuses them). The answers are scored with --reward_funcs /
--reward_weights (trainer/rewards.py: exact_answer, format, tiered, length_penalty, or module:function). The
highest-scoring answer becomes `chosen`, the lowest `rejected` (the first of equals); a prompt whose answers all score
within --min_score_gap of each other teaches nothing and is skipped (counted).

Output, in --out_dir:
    pairs.jsonl     {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...], "id",
                    "score_chosen", "score_rejected"}: the canonical dpo row (extra keys are ignored by the reader)
    manifest.json   the model, k, sampling settings, rewards, counts (prompts, answers, unfinished, skipped) and the
                    spread of the scores, and the sha256 of pairs.jsonl
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import torch

from minitrain.dataset.files import write_atomic
from minitrain.dataset.prompts import PromptDataset
from minitrain.model.checkpoint import check_model_dir, load_tokenizer, load_weights
from minitrain.model.config import ConfigError, load_model_config
from minitrain.model.transformer import CausalLM
from minitrain.trainer import batches, distributed, optim, sequences
from minitrain.trainer.configuration import USER_ERRORS, FlagError, RunConfig, fail, parse_config
from minitrain.trainer.distributed import print0
from minitrain.trainer.rewards import RewardError, parse_reward_flags


@dataclass
class PairsConfig(RunConfig):
    """Sample k answers per prompt from a model, score them, write the best and the worst as a preference pair."""

    # ---- shared flags (RunConfig: config file, model, prompt mixture) set to what a bare run uses ----
    init_from: str = "out/sft/final"
    # ---- prompts ----
    max_prompts: int = field(default=0, metadata={"help": "answer only the first N prompts; 0 = all"})
    max_prompt_length: int = field(default=192, metadata={"help": "longer prompts are dropped (and counted)"})
    # ---- sampling ----
    samples_per_prompt: int = field(default=4, metadata={"help": "k: answers sampled per prompt (at least 2)"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest answer"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0: the k answers must "
                                                              "differ)"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens only; 0 = all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1 = off"})
    generation_batch_size: int = field(default=64, metadata={"help": "sequences generated together"})
    keep_unfinished: bool = field(default=False, metadata={"help": "also rank answers cut at --max_new_tokens"})
    # ---- scoring ----
    reward_funcs: str = field(default="exact_answer", metadata={
        "help": "comma-separated built-ins (exact_answer, format, tiered, length_penalty) or module:function"})
    reward_weights: str = field(default="", metadata={"help": "comma-separated weights; empty = 1 each"})
    min_score_gap: float = field(default=0.0, metadata={"help": "skip prompts whose best and worst scores differ by "
                                                                "this or less (0: skip only all-equal ones)"})
    # ---- output and runtime (TrainConfig's flags; not in RunConfig, which holds only TrainConfig's first fields) ----
    out_dir: str = field(default="data/pairs", metadata={"help": "pairs.jsonl and manifest.json are written here"})
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 42

    def validate(self) -> None:
        for name, low in (("samples_per_prompt", 2), ("max_new_tokens", 1), ("generation_batch_size", 1),
                          ("max_prompts", 0), ("max_prompt_length", 1), ("top_k", 0)):
            if getattr(self, name) < low:
                raise FlagError(name, f"must be at least {low}, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise FlagError("temperature", f"must be positive (greedy answers would all be equal), got "
                                           f"{self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FlagError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.min_score_gap < 0:
            raise FlagError("min_score_gap", f"must not be negative, got {self.min_score_gap}")
        if not self.init_from:
            raise FlagError("init_from", "is required: the model whose answers are ranked")
        super().validate()
        try:
            parse_reward_flags(self.reward_funcs, self.reward_weights)
        except RewardError as e:
            raise FlagError("reward_funcs", str(e)) from None


def load_policy(cfg: PairsConfig, device: torch.device):
    """The --init_from model (fp32, eval mode) and its tokenizer."""
    check_model_dir(cfg.init_from)
    model = CausalLM(load_model_config(cfg.init_from, cfg.model_overrides))
    load_weights(model, cfg.init_from)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.init_from)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"{tokenizer.path}: vocabulary of {tokenizer.vocab_size} tokens does not fit the model")
    return model.to(device).eval(), tokenizer


def best_and_worst(scores: list[float]) -> tuple[int, int]:
    """Positions of the highest and the lowest score (the first of equals)."""
    return scores.index(max(scores)), scores.index(min(scores))


def keeps_the_prompt(tokenizer, messages: list[dict], answer: str) -> bool:
    """Whether the answer, written as text after the prompt, leaves the prompt's tokens as they are. A sampled answer
    that starts with a space merges with the newline before it, and the DPO reader refuses such a pair
    (dataset/preference.py, tokenize_pair); those answers are left out, as unfinished ones are."""
    prompt = tokenizer.chat_prompt_ids(messages)
    ids, _ = tokenizer.render_chat(messages + [{"role": "assistant", "content": answer}])
    return ids[:len(prompt)] == prompt


def make_pairs(prompts: PromptDataset, indices: list[int], model, tokenizer, reward, cfg: PairsConfig, amp,
               generator: torch.Generator) -> list[dict]:
    """One record per prompt of `indices`: its k answers, whether each finished, whether each keeps the prompt's
    tokens (keeps_the_prompt), and their scores."""
    k = cfg.samples_per_prompt
    jobs = [i for i in indices for _ in range(k)]                  # each prompt k times, side by side
    with amp:
        out = sequences.sample_completions(model, [prompts.ids[i] for i in jobs], cfg.max_new_tokens, cfg.temperature,
                                           tokenizer.eos_id, tokenizer.pad_id, cfg.generation_batch_size,
                                           generator=generator, top_k=cfg.top_k, top_p=cfg.top_p)
    completions, finished = [tokenizer.decode(c) for c in out.completions], out.finished
    scores, _ = reward([prompts.text(i) for i in jobs], completions, prompts.columns(jobs)) if jobs else ([], {})
    keeps = [keeps_the_prompt(tokenizer, prompts[i]["messages"], text) for i, text in zip(jobs, completions)]
    return [{"i": i, "answers": completions[n * k:(n + 1) * k], "finished": finished[n * k:(n + 1) * k],
             "keeps_prompt": keeps[n * k:(n + 1) * k], "scores": scores[n * k:(n + 1) * k]}
            for n, i in enumerate(indices)]


def select_pair(record: dict, cfg: PairsConfig) -> tuple[int, int] | str:
    """(chosen, rejected) positions among a prompt's answers, or why the prompt is skipped."""
    usable = [j for j, done in enumerate(record["finished"])
              if (done or cfg.keep_unfinished) and record["keeps_prompt"][j]]
    if len(usable) < 2:
        return "too_few_finished"
    scores = [record["scores"][j] for j in usable]
    best, worst = best_and_worst(scores)
    if scores[best] - scores[worst] <= cfg.min_score_gap:
        return "alike"
    if record["answers"][usable[best]] == record["answers"][usable[worst]]:
        return "alike"
    return usable[best], usable[worst]


def run(cfg: PairsConfig) -> None:
    dist = distributed.setup_distributed(cfg.device)
    reward = parse_reward_flags(cfg.reward_funcs, cfg.reward_weights)
    distributed.seed_everything(cfg.seed)
    model, tokenizer = load_policy(cfg, dist.device)
    print0(f"model: {model.num_parameters():,} parameters, from {cfg.init_from}")
    data, prompts = batches.prepare_prompts(cfg, tokenizer, dist)
    total = min(len(prompts), cfg.max_prompts) if cfg.max_prompts else len(prompts)
    mine = list(range(dist.rank, total, dist.world_size))
    amp = optim.autocast_context(dist.device, optim.resolve_dtype(cfg.dtype, dist.device))
    generator = torch.Generator(dist.device).manual_seed(cfg.seed + dist.rank)
    print0(f"sampling {cfg.samples_per_prompt} answers to each of {total:,} prompts ({dist.world_size} rank(s))")

    started = time.time()
    records = make_pairs(prompts, mine, model, tokenizer, reward, cfg, amp, generator)
    gathered = distributed.all_gather_json(records, dist.device)                 # every rank's records
    seconds = time.time() - started
    if dist.is_main:
        records = sorted((r for part in gathered for r in part), key=lambda r: r["i"])
        write_outputs(records, prompts, cfg, data.summary, seconds)


def write_outputs(records: list[dict], prompts: PromptDataset, cfg: PairsConfig, data_summary: dict,
                  seconds: float) -> None:
    rows, skipped, gaps, chosen_scores, rejected_scores = [], {"alike": 0, "too_few_finished": 0}, [], [], []
    all_scores = [s for r in records for s in r["scores"]]
    for record in records:
        picked = select_pair(record, cfg)
        if isinstance(picked, str):
            skipped[picked] += 1
            continue
        best, worst = picked
        row = prompts[record["i"]]
        rows.append({"prompt": row["messages"], "chosen": [{"role": "assistant", "content": record["answers"][best]}],
                     "rejected": [{"role": "assistant", "content": record["answers"][worst]}], "id": row["id"],
                     "score_chosen": record["scores"][best], "score_rejected": record["scores"][worst]})
        gaps.append(record["scores"][best] - record["scores"][worst])
        chosen_scores.append(record["scores"][best])
        rejected_scores.append(record["scores"][worst])
    os.makedirs(cfg.out_dir, exist_ok=True)
    pairs_path = os.path.join(cfg.out_dir, "pairs.jsonl")
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    write_atomic(pairs_path, body)
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    spread = (lambda xs: (sum((x - mean(xs)) ** 2 for x in xs) / len(xs)) ** 0.5 if xs else None)
    manifest = {
        "model": os.path.realpath(cfg.init_from), "k": cfg.samples_per_prompt,
        "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
                     "max_new_tokens": cfg.max_new_tokens, "keep_unfinished": cfg.keep_unfinished, "seed": cfg.seed},
        "rewards": {"funcs": cfg.reward_funcs, "weights": cfg.reward_weights, "min_score_gap": cfg.min_score_gap},
        "prompts_from": data_summary.get("mixture"),
        "counts": {"prompts": len(records), "prompts_dropped_too_long": prompts.dropped,
                   "answers": sum(len(r["answers"]) for r in records),
                   "unfinished_answers": sum(not f for r in records for f in r["finished"]),
                   "answers_changing_the_prompt": sum(not f for r in records for f in r["keeps_prompt"]),
                   "skipped_alike": skipped["alike"], "skipped_too_few_finished": skipped["too_few_finished"],
                   "pairs": len(rows)},
        "score_spread": {"mean_score": mean(all_scores), "std_score": spread(all_scores),
                         "mean_chosen": mean(chosen_scores), "mean_rejected": mean(rejected_scores),
                         "mean_gap": mean(gaps), "min_gap": min(gaps) if gaps else None,
                         "max_gap": max(gaps) if gaps else None},
        "seconds": seconds, "pairs_file": "pairs.jsonl", "pairs_sha256": hashlib.sha256(body).hexdigest(),
    }
    write_atomic(os.path.join(cfg.out_dir, "manifest.json"), (json.dumps(manifest, indent=1) + "\n").encode())
    c = manifest["counts"]
    print0(f"pairs: {c['pairs']:,} of {c['prompts']:,} prompts ({c['skipped_alike']:,} skipped: answers scored alike; "
           f"{c['skipped_too_few_finished']:,}: fewer than 2 usable answers; {c['answers_changing_the_prompt']:,} "
           f"answers left out: they change the prompt's tokens), mean score gap "
           f"{manifest['score_spread']['mean_gap'] or 0:.3f}, {seconds:.0f}s")
    if not rows:
        print0("warning: no pair written (every prompt's answers scored alike): raise --samples_per_prompt or "
               "--temperature, or use a reward with partial credit (tiered)")
    print0(f"wrote {pairs_path} and {os.path.join(cfg.out_dir, 'manifest.json')}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PairsConfig, argv)
    try:
        run(cfg)
    except USER_ERRORS + (RewardError,) as e:
        fail(str(e))
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
