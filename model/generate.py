"""Batched generation with a KV cache.

Prompts of different lengths are left-padded into one batch; the attention mask hides the padding and position ids
count real tokens only, so every row sees exactly what it would see alone. The KV cache is allocated once for
prompt + max_new_tokens positions (no concatenation per step). Each step applies, in Hugging Face's order:
repetition penalty, then temperature, top-k, top-p and min-p inside kernels.sample (temperature 0 = greedy argmax).
Rows stop independently at an EOS token.

Learned decoding (learned_decoding=True, a model with decoding heads, model/decoding_heads.py): every step reads the
heads' temperature (and top-p, when the model has a top-p head) at each row's last position and passes them to
kernels.sample as per-row tensors [B]; min-p is the ratio the heads were trained for unless min_p > 0 is given.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minitrain.kernels import sample
from minitrain.model.transformer import CausalLM, KVCache


@dataclass
class GenerationOutput:
    completions: list[list[int]]   # new tokens of each row, the EOS token included when one was produced
    finished: list[bool]           # True where the row stopped at EOS (False: it ran out of max_new_tokens)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): for tokens already in the sequence, logit / p if > 0 else logit * p.

    logits: [B, V] fp32; seen: [B, V] bool.
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] bool: True where the token occurs at a real position (mask 1) of its row.

    Counted with scatter_add, which does not depend on the order of writes: padding adds 0 and so never changes the
    set, even where a prompt really holds the padding token. input_ids, attention_mask: [B, T].
    """
    counts = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.long, device=input_ids.device)   # [B, V]
    counts.scatter_add_(1, input_ids, attention_mask.long())
    return counts > 0


@torch.no_grad()
def generate(model: CausalLM, prompts: list[list[int]], max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0,
             min_p=0.0, repetition_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int = 0, generator: torch.Generator | None = None,
             stream: Callable[[int, int], None] | None = None, learned_decoding: bool = False) -> GenerationOutput:
    """Generate up to max_new_tokens after each prompt (lists of token ids).

    temperature/top_k/top_p/min_p: scalars or per-row tensors [B] (passed to kernels.sample); temperature 0 = greedy.
    learned_decoding: the model's decoding heads set each row's temperature (and top-p) at every step instead.
    stream(row, token_id) is called for every new token of a row that has not finished.
    """
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    heads = getattr(model, "decoding_heads", None)
    if learned_decoding:
        if heads is None:
            raise ValueError("generate: learned_decoding needs a model with decoding heads (train them with "
                             "trainer/train_sft.py --train_temp); this model has none")
        if not (isinstance(min_p, torch.Tensor) or min_p > 0):
            min_p = heads.min_p_ratio
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    total = P + max_new_tokens
    if total > model.config.max_position_embeddings:
        # rotary embeddings extrapolate, but warn the caller by failing loudly rather than degrading silently
        raise ValueError(f"generate: prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({model.config.max_position_embeddings})")
    eos_ids = torch.tensor([] if eos_token_id is None else
                           ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)), device=device)

    input_ids = torch.full((B, P), pad_token_id, dtype=torch.long, device=device)   # [B, P] left-padded
    attention_mask = torch.zeros(B, total, dtype=torch.long, device=device)         # [B, P + new]
    for i, p in enumerate(prompts):
        input_ids[i, P - len(p):] = torch.tensor(p, device=device)
        attention_mask[i, P - len(p):P] = 1
    cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
        next(model.parameters()).dtype
    cache = KVCache(model.config, B, total, device, cache_dtype)

    was_training = model.training
    model.eval()
    seen = None
    if repetition_penalty != 1.0:
        seen = seen_tokens(input_ids, attention_mask[:, :P], model.config.vocab_size)   # [B, V]
    out = model(input_ids, attention_mask=attention_mask[:, :P], kv_cache=cache, logits_to_keep=1)

    next_position = attention_mask[:, :P].sum(-1, keepdim=True)                    # [B, 1] real tokens so far
    completions = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    greedy = isinstance(temperature, (int, float)) and temperature == 0 and not learned_decoding
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()                                           # [B, V]
        if learned_decoding:                                                         # per-row settings [B]
            temperature = out.temperature[:, -1] if out.temperature is not None else temperature
            top_p = out.top_p[:, -1] if out.top_p is not None else top_p
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        if greedy:
            next_tokens = logits.argmax(dim=-1)
        else:
            next_tokens = sample(logits, temperature, top_k, top_p, min_p, generator=generator)  # [B]
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        tokens = next_tokens.tolist()
        active = (~finished).tolist()
        for i in range(B):
            if active[i]:
                completions[i].append(tokens[i])
                if stream is not None:
                    stream(i, tokens[i])
        finished |= torch.isin(next_tokens, eos_ids)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if seen is not None:
            seen.scatter_(1, next_tokens[:, None], True)
        attention_mask[:, P + step] = 1
        out = model(next_tokens[:, None], attention_mask=attention_mask[:, :P + step + 1],
                    position_ids=next_position + step, kv_cache=cache)                # positions count real tokens
    model.train(was_training)
    return GenerationOutput(completions=completions, finished=finished.tolist())
