"""Evaluation inside a training run: the validation loss, --eval_tasks accuracy, and sample completions.

Generation runs on rank 0 (the other ranks wait); the validation loss is shared out over ranks and all-reduced, so
it does not depend on their number. eval/ holds the stand-alone evaluation tools these call into.
"""


import torch
import torch.distributed as tdist
import torch.nn as nn

from minitrain.eval.task_eval import evaluate_tasks, parse_task_names, prepare_task_prompts
from minitrain.model.config import ConfigError
from minitrain.model.generate import generate
from minitrain.model.transformer import unwrap
from minitrain.trainer.batches import collate_samples, load_batch
from minitrain.trainer.checkpointing import check_finite_weights
from minitrain.trainer.configuration import TrainConfig
from minitrain.trainer.distributed import DistInfo, barrier, is_distributed, print0
from minitrain.trainer.sharding import full_weights


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset, batch_size: int, num_batches: int, dist: DistInfo, amp,
                  collate=collate_samples) -> float:
    """Mean loss of the first `num_batches` batches of the validation set (in order; ranks share the batches).

    Batch b goes to rank b % world_size and the sums are all-reduced, so the value does not depend on the number of
    ranks. An MoE model's load-balancing term is taken out: this is the language-model loss alone.
    """
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    starts = list(range(0, min(len(dataset), num_batches * batch_size), batch_size))
    totals = torch.zeros(2, device=dist.device)                   # [sum of batch losses, batches]
    with full_weights(raw):                                 # under FSDP: the ranks run different numbers of batches
        for b in range(dist.rank, len(starts), dist.world_size):
            indices = list(range(starts[b], min(starts[b] + batch_size, len(dataset))))
            with amp:
                out = raw(**load_batch(dataset, indices, dist.device, collate))
            loss = out.loss if out.aux_loss is None else out.loss - raw.config.router_aux_loss_coef * out.aux_loss
            totals += torch.stack([loss.float(), torch.ones((), device=dist.device)])
    if is_distributed():
        tdist.all_reduce(totals, op=tdist.ReduceOp.SUM)
    raw.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item() if totals[1] > 0 else float("nan")


def check_eval_tasks(cfg: TrainConfig, model: nn.Module, tokenizer) -> None:
    """Before training: --eval_tasks can draw its problems and their prompts fit the model (else a ConfigError)."""
    if not cfg.eval_tasks:
        return
    try:
        prepare_task_prompts(tokenizer, parse_task_names(cfg.eval_tasks), cfg.eval_task_samples,
                             cfg.eval_max_new_tokens, unwrap(model).config.max_position_embeddings)
    except ValueError as e:     # PromptTooLong, a problem space smaller than --eval_task_samples, ...
        raise ConfigError(f"--eval_tasks {cfg.eval_tasks}: {e}") from None


def evaluate_tasks_hook(model: nn.Module, tokenizer, cfg: TrainConfig, dist: DistInfo, amp) -> dict[str, float]:
    """--eval_tasks: accuracy of each task on --eval_task_samples held-out problems, {"<task>/accuracy": x}.

    Runs on rank 0 (generation does not need the other ranks), which the others wait for.
    """
    if not cfg.eval_tasks:
        return {}
    names = parse_task_names(cfg.eval_tasks)
    metrics = {}
    with full_weights(model):                               # under FSDP rank 0 needs every shard
        if dist.is_main:
            raw = unwrap(model)
            was_training = raw.training
            raw.eval()
            with amp:
                results = evaluate_tasks(raw, tokenizer, names, cfg.eval_task_samples,
                                         max_new_tokens=cfg.eval_max_new_tokens)
            raw.train(was_training)
            metrics = {f"{name}/accuracy": float(results[name]["accuracy"]) for name in names}
        barrier()
    return metrics


@torch.no_grad()
def print_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, amp,
                  chat: bool, dist: DistInfo) -> None:
    """Complete each prompt (temperature 0.7, top-k 40) and print it: every rank calls it, rank 0 generates (under
    FSDP with every shard gathered). With chat, each prompt is a user turn in the chat template and the answer stops
    at <|im_end|>. A generator of its own leaves training's RNG be."""
    raw = unwrap(model)
    check_finite_weights(raw, "before printing samples")
    was_training = raw.training
    raw.eval()
    device = next(raw.parameters()).device
    if chat:
        ids = [tokenizer.chat_prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [tokenizer.encode(p) for p in prompts]
    completions = []
    with amp, full_weights(raw):
        if dist.is_main:
            completions = generate(raw, ids, max_new_tokens, temperature=0.7, top_k=40,
                                   eos_token_id=[tokenizer.pad_id, tokenizer.eos_id], pad_token_id=tokenizer.pad_id,
                                   generator=torch.Generator(device).manual_seed(seed)).completions
    raw.train(was_training)
    for prompt, completion in zip(prompts, completions):
        print0(f"  sample: {prompt!r} -> {tokenizer.decode(completion)!r}")
