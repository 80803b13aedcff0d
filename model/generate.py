"""Batched generation with a KV cache.

Prompts of different lengths are left-padded into one batch; the attention mask hides the padding and position ids
count real tokens only, so every row sees exactly what it would see alone. The KV cache is allocated once for
prompt + max_new_tokens positions (no concatenation per step). Each step applies, in Hugging Face's order:
repetition penalty, then temperature, top-k, top-p and min-p inside kernels.sample (temperature 0 = greedy argmax).
Rows stop independently at an EOS token.

Compiled decoding (compiled=True): after the prompt, every new token runs `decode_step`, compiled with
torch.compile (Inductor) over a cache of fixed length, so a step's shapes never change and it compiles once per
batch size and cache length (a power of two: a chat's growing conversation compiles a few times, not every turn).
Inductor "freezes" the weights (folds them into the compiled code as constants, so that it can repack the matrices
for its own GEMM kernels; on CPU these use both cores, where MKL runs a small matrix-vector product on one). Frozen
weights cost a second copy of the model's matrices, and the compiled step no longer sees changes to the model: so
it is for fixed weights (chat, evaluation, benchmarks), it is compiled again whenever the model or any of its
weights changed (parameter versions are checked at each generate call), and training's rollouts keep the eager
step. A compile takes 10 to 40 s on 2 CPU cores, 11 to 12 s on an H200.

Learned decoding (learned_decoding=True, a model with decoding heads, model/decoding_heads.py): every step reads the
heads' temperature (and top-p, when the model has a top-p head) at each row's last position and passes them to
kernels.sample as per-row tensors [B]; min-p is the ratio the heads were trained for unless min_p > 0 is given.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minitrain.kernels import sample
from minitrain.model.transformer import CausalLM, CausalLMOutput, KVCache


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


def decode_step(model: CausalLM, tokens, position_ids, attention_mask, cache: KVCache) -> torch.Tensor:
    """One new token per row over the whole preallocated cache; returns its logits [B, V].

    tokens, position_ids: [B, 1]; attention_mask: [B, cache.max_len], 1 at every real position so far (the new token
    included), 0 at padding and at the positions not generated yet; cache.write_at: the new token's slot [1]. The same
    computation as CausalLM.forward for one token, with every shape fixed.
    """
    key_mask = attention_mask[:, None, None, :].ne(0)                            # [B, 1, 1, S] may attend
    x = model.model.embed_tokens(tokens)                                         # [B, 1, H]
    cos, sin = model.model.rotary_emb(position_ids, x.dtype)
    for block in model.model.layers:
        x = block(x, cos, sin, key_mask, cache)
    return model.lm_head(model.model.norm(x))[:, -1]                             # [B, V]


# Inductor's settings for the compiled step: frozen weights; on CPU also its own GEMM kernels (C++ templates) timed
# against ATen's at compile time, the faster kept for each matrix shape. On a GPU that autotuning (Triton GEMMs)
# took 75 s a compile on an H200 for the 25.8M model, so there the step keeps cuBLAS and fuses the rest.
def compile_options(device: torch.device) -> dict:
    if device.type == "cpu":
        return {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    return {"freezing": True}


MIN_CACHE = 64   # compiled decoding's cache length: a power of two, at least this (few shapes, so few compiles)
_compiled = {"step": None, "model": None, "versions": None}   # the one compiled step, and what it was compiled for


def compiled_decode_step(model: CausalLM) -> Callable:
    """torch.compile(decode_step) for this model's current weights, compiled again if the model or a weight changed.

    The step closes over the model, so that Inductor sees its weights as constants and can freeze them. Frozen
    weights are copies inside the compiled code, and Dynamo's guards do not look at their values: a step compiled
    for other weights would silently decode with the old ones. So the model and the version counter of every
    parameter (bumped by every in-place write: optimizer steps, load_state_dict) are checked at each generate call,
    and any change resets Dynamo and compiles anew. The last compiled model stays referenced here until the next
    compile.
    """
    versions = tuple(p._version for p in model.parameters())
    if _compiled["step"] is None or _compiled["model"] is not model or _compiled["versions"] != versions:
        torch._dynamo.reset()

        def step(tokens, position_ids, attention_mask, cache):
            return decode_step(model, tokens, position_ids, attention_mask, cache)

        _compiled.update(step=torch.compile(step, dynamic=False), model=model,
                         versions=versions)
    return _compiled["step"]


@torch.no_grad()
def generate(model: CausalLM, prompts: list[list[int]], max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0,
             min_p=0.0, repetition_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int = 0, generator: torch.Generator | None = None,
             stream: Callable[[int, int], None] | None = None, learned_decoding: bool = False,
             compiled: bool = False) -> GenerationOutput:
    """Generate up to max_new_tokens after each prompt (lists of token ids).

    temperature/top_k/top_p/min_p: scalars or per-row tensors [B] (passed to kernels.sample); temperature 0 = greedy.
    learned_decoding: the model's decoding heads set each row's temperature (and top-p) at every step instead.
    stream(row, token_id) is called for every new token of a row that has not finished.
    compiled: run each new token through the compiled decode_step (above; for fixed weights).
    """
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    heads = getattr(model, "decoding_heads", None)
    if compiled and (learned_decoding or model.config.num_experts):
        raise ValueError("generate: compiled decoding covers dense models without learned decoding; pass "
                         "compiled=False for " + ("learned decoding" if learned_decoding else "a mixture of experts"))
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
    # compiled decoding attends over a cache of fixed length: a power of two, so that few lengths are compiled
    cache_len = max(MIN_CACHE, 1 << (total - 1).bit_length()) if compiled else total
    attention_mask = torch.zeros(B, cache_len, dtype=torch.long, device=device)     # [B, P + new (+ unused)]
    for i, p in enumerate(prompts):
        input_ids[i, P - len(p):] = torch.tensor(p, device=device)
        attention_mask[i, P - len(p):P] = 1
    cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
        next(model.parameters()).dtype
    cache = KVCache(model.config, B, cache_len, device, cache_dtype)
    step_fn = compiled_decode_step(model) if compiled else None

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
        if compiled:                                                                 # the same, fixed shapes
            cache.write_at = torch.tensor([P + step], device=device)
            # Inductor reads these settings when it compiles (at a first call or a recompile): torch.compile's
            # options= did not turn freezing on (measured: no gain), a config patch around the call does
            with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True), \
                    torch._inductor.config.patch(compile_options(device)):
                logits = step_fn(next_tokens[:, None], next_position + step, attention_mask, cache)  # [B, V]
            out = CausalLMOutput(logits=logits[:, None])
        else:
            out = model(next_tokens[:, None], attention_mask=attention_mask[:, :P + step + 1],
                        position_ids=next_position + step, kv_cache=cache)            # positions count real tokens
    model.train(was_training)
    return GenerationOutput(completions=completions, finished=finished.tolist())
