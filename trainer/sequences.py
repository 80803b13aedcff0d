"""Sequences for the preference and RL methods: per-token log-probabilities and rollouts.

    gather_logprobs      log p(x_t+1 | x_<=t) [B, T-1] through the fused kernel: no [B, T, V] logits are held
    reference_logprobs   the same under the frozen reference (or the LoRA base), without gradients
    rollout              sampled completions (KV cache, fused sampler) laid out by pack_sequences as a Rollout:
                         [left padding | prompt | completion | right padding], completion_mask lined up with
                         gather_logprobs
    step_token_count     the completion tokens of a whole optimizer step, all ranks: the divisor of a global token mean
    masked_mean          the mean of values where mask is 1

The objectives built on these live in the method scripts: PPO-clip in train_ppo.py, the k3 KL in train_grpo.py.
"""

from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn as nn

from minitrain.kernels import fused_linear_logprobs
from minitrain.model.generate import generate
from minitrain.model.lora import adapters_disabled
from minitrain.model.transformer import unwrap
from minitrain.trainer.distributed import is_distributed


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
def rollout(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature, eos_token_id,
            pad_token_id: int, generator: torch.Generator | None = None, top_k: int = 0, top_p: float = 1.0,
            min_p: float = 0.0) -> Rollout:
    """Sample one completion per prompt (batched, KV cache, the fused sampler; rows stop at EOS on their own)."""
    raw = unwrap(model)
    was_training = raw.training
    out = generate(raw, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator)
    raw.train(was_training)
    device = next(raw.parameters()).device
    input_ids, attention_mask, completion_mask, P = pack_sequences(prompts, out.completions, pad_token_id, device)
    return Rollout(input_ids, attention_mask, completion_mask, out.completions,
                   torch.tensor(out.finished, device=device), P)


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
