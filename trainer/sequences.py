"""Sequences for the preference and RL methods: per-token log-probs, rollouts, reference log-probs computed once.

    gather_logprobs      log p(x_t+1 | x_<=t) [B, T-1] through the fused kernel: no [B, T, V] logits are held
    reference_logprobs   the same under the frozen reference (or the LoRA base), without gradients
    completion_logprobs  the log-probs of given completions' tokens, one list per completion, without gradients
    sample_completions   one sampled completion per prompt (KV cache, fused sampler), batch_size prompts at a time:
                         the token lists and whether each stopped at EOS, not laid out (for callers that score the
                         text, or that pack their own micro-batches with pack_sequences)
    rollout              the same for one batch, laid out by pack_sequences as a Rollout: [left padding | prompt |
                         completion | right padding], completion_mask lined up with gather_logprobs
    check_rollout_flags  an RL config's --init_from, lengths and sampling flags (its validate calls it)
    step_token_count     the completion tokens of a whole optimizer step, all ranks: the divisor of a global token mean
    masked_mean          the mean of values where mask is 1

Reference log-probs computed once (preference pairs, train_dpo.py --precompute_ref_logps): live_reference_logps sums
a batch's reference log-probs over its loss_mask; compute_reference_logps does so for every pair of a dataset, the
ranks sharing the work; cached_reference_logps keeps the result in a file named by reference_fingerprint.

The objectives built on these live in the method scripts: PPO-clip in train_ppo.py, the k3 KL in train_grpo.py.
"""

import hashlib
import json
import os
from dataclasses import dataclass

from safetensors import safe_open
from safetensors.torch import save_file
import torch
import torch.distributed as tdist
import torch.nn as nn

from minitrain.dataset.files import file_sha256
from minitrain.kernels import fused_linear_logprobs
from minitrain.model.checkpoint import weight_files
from minitrain.model.generate import GenerationOutput, generate
from minitrain.model.lora import adapters_disabled, has_lora
from minitrain.model.transformer import unwrap
from minitrain.trainer import batches
from minitrain.trainer.configuration import FlagError
from minitrain.trainer.distributed import all_gather_rows, broadcast_text, is_distributed
from minitrain.trainer.sharding import full_weights


def gather_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    temperature: float = 1.0, with_entropy: bool = False):
    """log p(input_ids[:, t + 1] | input_ids[:, :t + 1]) for t = 0 .. T-2: [B, T-1] (and the entropy, [B, T-1]).

    The model returns its hidden states only; the fused kernel applies lm_head.weight chunk by chunk (temperature
    divides the logits), so no [B, T, V] tensor is held. Call it on the wrapped model (DDP, compile): the forward
    pass goes through the wrapper, so gradients are all-reduced.
    """
    out = model(input_ids, attention_mask=attention_mask, compute_logits=False)
    hidden = out.hidden_states[:, :-1]                                          # [B, T-1, H]
    B, T1, H = hidden.shape
    result = fused_linear_logprobs(hidden.reshape(B * T1, H), unwrap(model).lm_head.weight,
                                   input_ids[:, 1:].reshape(B * T1), temperature=temperature,
                                   return_entropy=with_entropy)
    if with_entropy:
        logp, entropy = result
        return logp.view(B, T1), entropy.view(B, T1)
    return result.view(B, T1)


@dataclass
class Rollout:
    """Prompts with their sampled completions, laid out for one forward pass.

    Row b is [left padding | prompt | completion | right padding], the completion starting at column P for every
    row. completion_mask[b, t] = 1 where input_ids[b, t + 1] is a completion token (the EOS included): it lines up
    with gather_logprobs' output.
    """
    input_ids: torch.Tensor         # [B, P + C]
    attention_mask: torch.Tensor    # [B, P + C], 1 = real token
    completion_mask: torch.Tensor   # [B, P + C - 1] float
    completions: list[list[int]]    # each row's new tokens
    finished: torch.Tensor          # [B] bool: the row stopped at EOS (False: it ran out of max_new_tokens)
    prompt_length: int              # P

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)                                     # [B]


def pack_sequences(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Lay out prompts (left-padded to P) followed by their completions (right-padded), for one forward pass.

    Returns input_ids [B, P + C], attention_mask [B, P + C] (1 = real token), completion_mask [B, P + C - 1]
    (1 where input_ids[:, t + 1] is a completion token, lined up with gather_logprobs) and P.
    """
    B, P = len(prompts), max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    input_ids = torch.full((B, P + C), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P + C, dtype=torch.long)
    completion_mask = torch.zeros(B, P + C - 1)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[b, P - len(prompt):P] = torch.tensor(prompt)
        input_ids[b, P:P + len(completion)] = torch.tensor(completion, dtype=torch.long)
        attention_mask[b, P - len(prompt):P + len(completion)] = 1
        completion_mask[b, P - 1:P - 1 + len(completion)] = 1
    return input_ids.to(device), attention_mask.to(device), completion_mask.to(device), P


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature, eos_token_id,
                       pad_token_id: int, batch_size: int | None = None, generator: torch.Generator | None = None,
                       top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> GenerationOutput:
    """Sample one completion per prompt, batch_size prompts per generate call (None: all at once; KV cache, the
    fused sampler; rows stop at EOS on their own). Returns the completions' token lists and whether each stopped at
    EOS, in the prompts' order; nothing is laid out for a forward pass (rollout does that). Under FSDP every rank
    holds the whole model meanwhile, since the ranks' completions stop at different lengths."""
    raw = unwrap(model)                                  # generate restores its training mode
    completions, finished = [], []
    step = batch_size or max(1, len(prompts))
    with full_weights(raw):
        for start in range(0, len(prompts), step):
            out = generate(raw, prompts[start:start + step], max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, min_p=min_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                           generator=generator)
            completions += out.completions
            finished += out.finished
    return GenerationOutput(completions=completions, finished=finished)


@torch.no_grad()
def rollout(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature, eos_token_id,
            pad_token_id: int, generator: torch.Generator | None = None, top_k: int = 0, top_p: float = 1.0,
            min_p: float = 0.0) -> Rollout:
    """Sample one completion per prompt (batched, KV cache, the fused sampler; rows stop at EOS on their own), laid
    out for one forward pass. A caller that only needs the completions, or packs its own micro-batches, calls
    sample_completions instead."""
    out = sample_completions(model, prompts, max_new_tokens, temperature, eos_token_id, pad_token_id,
                             generator=generator, top_k=top_k, top_p=top_p, min_p=min_p)
    device = next(unwrap(model).parameters()).device
    input_ids, attention_mask, completion_mask, P = pack_sequences(prompts, out.completions, pad_token_id, device)
    return Rollout(input_ids, attention_mask, completion_mask, out.completions,
                   torch.tensor(out.finished, device=device), P)


@torch.no_grad()
def completion_logprobs(model: nn.Module, prompts: list[list[int]], completions: list[list[int]],
                        pad_token_id: int, temperature: float = 1.0) -> list[list[float]]:
    """log p(token) of each completion token given its prompt, one list per completion (no gradient; the forward
    pass skips any DDP wrapper: nothing is all-reduced)."""
    if not prompts:
        return []
    raw = unwrap(model)
    ids, attention, mask, _ = pack_sequences(prompts, completions, pad_token_id, next(raw.parameters()).device)
    logp = gather_logprobs(raw, ids, attention, temperature).float()                         # [B, P + C - 1]
    return [logp[b][mask[b].bool()].tolist() for b in range(len(prompts))]


def check_rollout_flags(cfg) -> None:
    """An RL config's rollout flags, FlagError (which parse_config reports) when one is out of range: --init_from (RL
    starts from a trained model), the lengths, --generation_batch_size, --top_k, --top_p and the sampling temperature,
    with its schedule (--temperature_start / _end / _warmup_steps) where the config has one."""
    if not cfg.init_from:
        raise FlagError("init_from", "is required: RL starts from a trained checkpoint "
                                     "(e.g. --init_from out/sft/final)")
    for name, low in (("max_prompt_length", 1), ("max_new_tokens", 1), ("generation_batch_size", 1), ("top_k", 0),
                      ("temperature_warmup_steps", 0)):
        if getattr(cfg, name, low) < low:
            raise FlagError(name, f"must be at least {low}, got {getattr(cfg, name)}")
    for name in ("temperature", "temperature_start", "temperature_end"):
        value = getattr(cfg, name, None)
        if value is not None and not value > 0:
            raise FlagError(name, f"must be positive, got {value}")
    if (getattr(cfg, "temperature_start", None) is None) != (getattr(cfg, "temperature_end", None) is None):
        raise FlagError("temperature_start", "and --temperature_end go together")
    if not 0 < cfg.top_p <= 1:
        raise FlagError("top_p", f"must be in (0, 1], got {cfg.top_p}")


def step_token_count(masks: list[torch.Tensor], device: torch.device) -> float:
    """The target tokens of one whole optimizer step: the masks of every micro-batch of this rank, summed over all
    ranks (one all-reduce). A micro-batch's summed loss divided by it, times the number of ranks (DDP averages the
    ranks' gradients), gives the token mean over the global batch: DAPO's token-level loss and TRL's GKD."""
    total = torch.zeros(1, device=device, dtype=torch.float64)
    for m in masks:                       # summed on the device: one host sync in all, at .item()
        total += m.sum()
    if is_distributed():
        tdist.all_reduce(total)
    return total.item()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def reference_logprobs(reference: nn.Module | None, model: nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """gather_logprobs of the reference policy: the frozen copy, or the policy with its LoRA adapters off."""
    if reference is not None:
        return gather_logprobs(reference, input_ids, attention_mask, temperature)
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    with adapters_disabled(raw):
        logp = gather_logprobs(raw, input_ids, attention_mask, temperature)
    raw.train(was_training)
    return logp


# ---- reference log-probs computed once (preference pairs) ---------------------------------------------------------

@torch.no_grad()
def live_reference_logps(reference, model, batch: dict) -> torch.Tensor:
    """The reference's log-probs summed over each row's loss_mask ([rows], [2B] for a batch of pairs): the frozen copy,
    or (reference None, LoRA) the policy with its adapters off."""
    logp = reference_logprobs(reference, model, batch["input_ids"], batch["attention_mask"]).float()
    return (logp * batch["loss_mask"]).sum(-1)


def reference_fingerprint(data_files: dict[str, str], checkpoint: str, tokenizer_path: str, max_seq_len: int,
                          dtype: torch.dtype, model_overrides: dict | None = None) -> dict:
    """What the reference log-probs depend on: the prepared files' bytes, the reference checkpoint (its resolved
    path, config.json's bytes, and each weight file's size and modification time: a checkpoint rewritten in place
    changes them), model fields given as flags, the tokenizer, --max_seq_len (it decides truncation and drops) and
    the compute dtype."""
    weights = [{"file": os.path.basename(p), "size": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns}
               for p in weight_files(checkpoint)]
    return {"data": {split: file_sha256(path) for split, path in data_files.items()},
            "reference": {"path": os.path.realpath(checkpoint), "weights": weights,
                          "config_sha256": file_sha256(os.path.join(checkpoint, "config.json"))},
            "model_overrides": model_overrides or {}, "tokenizer_sha256": file_sha256(tokenizer_path),
            "max_seq_len": max_seq_len, "dtype": str(dtype).replace("torch.", "")}


def reference_cache_path(directory: str, fingerprint: dict) -> str:
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(directory, f"ref_logps-{key}.safetensors")


@torch.no_grad()
def compute_reference_logps(model, datasets: dict, batch_size: int, collate, dist, amp) -> dict[str, torch.Tensor]:
    """{split: [N, 2]} reference sums (chosen, rejected) of every pair of each PreferenceDataset (batched by collate:
    chosen rows first, then rejected), in one pass of `model` as the reference
    (adapters off under LoRA). Rank r computes pairs r, r + W, ...; the results are all-gathered."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    out = {}
    for split, data in datasets.items():
        mine = list(range(dist.rank, len(data), dist.world_size))
        per_rank = -(-len(data) // dist.world_size)                          # ceil(N / W)
        local = torch.zeros(per_rank, 2, device=dist.device)
        for start in range(0, len(mine), batch_size):
            indices = mine[start:start + batch_size]
            batch = batches.load_batch(data, indices, dist.device, collate)
            with amp:
                sums = live_reference_logps(None if has_lora(raw) else raw, raw, batch)
            B = len(indices)
            local[start:start + B] = torch.stack([sums[:B], sums[B:]], dim=1)
        gathered = all_gather_rows(local[None])                                  # [W, per_rank, 2]
        out[split] = gathered.transpose(0, 1).reshape(-1, 2)[:len(data)].cpu()   # pair k W + r <- rank r, slot k
    raw.train(was_training)
    return out


def cached_reference_logps(path: str, fingerprint: dict, compute, dist) -> tuple[dict[str, torch.Tensor], bool]:
    """The reference log-probs saved at `path` when their fingerprint matches (reused: True), else compute() and
    save them there (rank 0 writes, atomically). Rank 0 decides, so that every rank takes part in compute() or
    none does; the file is read by every rank, like the prepared data (a filesystem the ranks share)."""
    expected = json.dumps(fingerprint, sort_keys=True)
    matches = "no"
    if dist.is_main and os.path.isfile(path):
        with safe_open(path, framework="pt") as f:
            matches = "yes" if (f.metadata() or {}).get("fingerprint") == expected else "no"
    if broadcast_text(matches, dist.device) == "yes":
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, True
    tensors = compute()
    if dist.is_main:
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"fingerprint": expected})
        os.replace(tmp, path)
    if is_distributed():
        tdist.barrier()
    return tensors, False

