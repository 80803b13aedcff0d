"""Triton sampler (same contract as sampling.sample_torch): filters by thresholds, draws by inverse CDF, no sort.

Each program owns BLOCK_B rows and streams them in [BLOCK_B, BLOCK_V] tiles; nothing of size B x V is written.
With s = logits / T and e = exp(s - s_max):
  pass 1      s_max, the argmax (for greedy rows), and whether the row holds a NaN / +inf / no finite logit;
  top-k       bisection over the float32 bit patterns (as ordered integers, `_ordered_key`) for the largest t with
              count(key >= t) >= k: that t is the k-th largest logit exactly (33 counting passes);
  top-p       bisection for the smallest t with sum(e over kept tokens with key > t) < top_p * sum(e over kept)
              (33 summing passes); tokens at or above t stay, so ties stay or go together;
  min-p       e >= min_p, i.e. p >= min_p * p_max;
  draw        a running cumulative sum over the kept e; the token is the first where it exceeds u * total.
The bisection loops run only for tiles where some row uses that filter.
"""

import torch
import triton
import triton.language as tl

from minitrain.kernels.backend import triton_interpreting

KEY_NEG_INF = tl.constexpr(-2139095041)          # _ordered_key(-inf); a tl.constexpr, as a jit global must be


@triton.jit
def _ordered_key(s):
    """int64 key with the order of the float32 s (-0.0 folded into +0.0): flip the magnitude bits of negatives."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _load_scaled(row_ptr, offs, in_tile, inv_temperature):
    """s = logits * (1 / T) for a [BLOCK_B, BLOCK_V] tile, with NaN, +inf (rows that give -1 anyway) and padding
    read as -inf so that the arithmetic stays finite."""
    x = tl.load(row_ptr[:, None] + offs[None, :], mask=in_tile, other=-float("inf")).to(tl.float32)
    x = tl.where((x != x) | (x == float("inf")), -float("inf"), x)
    return x * inv_temperature[:, None]


@triton.jit
def _sample_kernel(logits_ptr, stride_row, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, u_ptr, out_ptr, B, V,
                   BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)                # [BLOCK_B]
    row_ok = rows < B
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + rows, mask=row_ok, other=1.0)
    greedy = temperature <= 0.0
    inv_temperature = 1.0 / tl.where(greedy, 1.0, temperature)
    top_k = tl.load(top_k_ptr + rows, mask=row_ok, other=0)
    top_p = tl.load(top_p_ptr + rows, mask=row_ok, other=1.0)
    min_p = tl.load(min_p_ptr + rows, mask=row_ok, other=0.0)
    u = tl.load(u_ptr + rows, mask=row_ok, other=0.0)
    use_k = (top_k > 0) & (top_k < V)
    use_p = top_p < 1.0

    # pass 1: max, first argmax, validity
    best = tl.full([BLOCK_B], -float("inf"), tl.float32)
    best_index = tl.zeros([BLOCK_B], tl.int64)
    bad = tl.zeros([BLOCK_B], tl.int32)
    any_finite = tl.zeros([BLOCK_B], tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_tile = row_ok[:, None] & (offs[None, :] < V)
        x = tl.load(row_ptr[:, None] + offs[None, :], mask=in_tile, other=-float("inf")).to(tl.float32)
        bad = tl.maximum(bad, tl.max(((x != x) | (x == float("inf"))).to(tl.int32), axis=1))
        x = tl.where((x != x) | (x == float("inf")), -float("inf"), x)
        any_finite = tl.maximum(any_finite, tl.max((x > -float("inf")).to(tl.int32), axis=1))
        block_best = tl.max(x, axis=1)
        block_index = tl.argmax(x, axis=1).to(tl.int64) + start
        better = block_best > best
        best_index = tl.where(better, block_index, best_index)
        best = tl.where(better, block_best, best)
    s_max = tl.where(any_finite > 0, best * inv_temperature, 0.0)           # x -> x / T is monotone
    key_max = _ordered_key(s_max)

    # top-k: largest key t with count(key >= t) >= k
    threshold = tl.full([BLOCK_B], KEY_NEG_INF, tl.int64)
    if tl.max(use_k.to(tl.int32), axis=0) > 0:
        lo = tl.full([BLOCK_B], KEY_NEG_INF, tl.int64)                      # count(key >= lo) = V >= k
        hi = key_max + 1                                                     # count(key >= hi) = 0 < k
        for _ in range(33):
            mid = lo + (hi - lo) // 2
            count = tl.zeros([BLOCK_B], tl.int32)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                in_tile = row_ok[:, None] & (offs[None, :] < V)
                key = _ordered_key(_load_scaled(row_ptr, offs, in_tile, inv_temperature))
                count += tl.sum((in_tile & (key >= mid[:, None])).to(tl.int32), axis=1)
            enough = count >= top_k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        threshold = tl.where(use_k, lo, threshold)

    # top-p over the top-k survivors: smallest key t with mass(key > t) < top_p * mass(all survivors)
    if tl.max(use_p.to(tl.int32), axis=0) > 0:
        total = tl.zeros([BLOCK_B], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_tile = row_ok[:, None] & (offs[None, :] < V)
            s = _load_scaled(row_ptr, offs, in_tile, inv_temperature)
            kept = (s > -float("inf")) & (_ordered_key(s) >= threshold[:, None])
            total += tl.sum(tl.where(kept, tl.exp(s - s_max[:, None]), 0.0), axis=1)
        target = tl.maximum(top_p, 0.0) * total
        lo = threshold - 1                                                   # mass above lo: all of it
        hi = tl.maximum(key_max, lo + 1)                                     # mass above the max: 0
        for _ in range(33):
            mid = lo + (hi - lo) // 2
            mass = tl.zeros([BLOCK_B], tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                in_tile = row_ok[:, None] & (offs[None, :] < V)
                s = _load_scaled(row_ptr, offs, in_tile, inv_temperature)
                key = _ordered_key(s)
                above = (s > -float("inf")) & (key >= threshold[:, None]) & (key > mid[:, None])
                mass += tl.sum(tl.where(above, tl.exp(s - s_max[:, None]), 0.0), axis=1)
            below = mass < target
            hi = tl.where(below, mid, hi)
            lo = tl.where(below, lo, mid)
        threshold = tl.where(use_p, hi, threshold)

    # min-p and the total mass of what is kept
    total = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_tile = row_ok[:, None] & (offs[None, :] < V)
        s = _load_scaled(row_ptr, offs, in_tile, inv_temperature)
        e = tl.exp(s - s_max[:, None])
        kept = (s > -float("inf")) & (_ordered_key(s) >= threshold[:, None]) & ((min_p[:, None] <= 0.0) |
                                                                               (e >= min_p[:, None]))
        total += tl.sum(tl.where(kept, e, 0.0), axis=1)

    # draw: first token whose running cumulative mass exceeds u * total
    point = u * total
    running = tl.zeros([BLOCK_B], tl.float32)
    found = tl.full([BLOCK_B], V, tl.int64)
    last_kept = tl.full([BLOCK_B], -1, tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_tile = row_ok[:, None] & (offs[None, :] < V)
        s = _load_scaled(row_ptr, offs, in_tile, inv_temperature)
        e = tl.exp(s - s_max[:, None])
        kept = (s > -float("inf")) & (_ordered_key(s) >= threshold[:, None]) & ((min_p[:, None] <= 0.0) |
                                                                               (e >= min_p[:, None]))
        weight = tl.where(kept, e, 0.0)
        cumulative = tl.cumsum(weight, axis=1) + running[:, None]
        hit = kept & (cumulative > point[:, None])
        found = tl.minimum(found, tl.min(tl.where(hit, offs[None, :], V), axis=1).to(tl.int64))
        last_kept = tl.maximum(last_kept, tl.max(tl.where(kept, offs[None, :], -1), axis=1).to(tl.int64))
        running += tl.sum(weight, axis=1)
    token = tl.where(found < V, found, last_kept)                            # u * total rounded up past the end
    token = tl.where(greedy, best_index, token)
    token = tl.where((bad > 0) | (any_finite == 0), -1, token)
    tl.store(out_ptr + rows, token, mask=row_ok)


# A torch.library custom op, so that torch.compile keeps the launch as one opaque op.
@torch.library.custom_op("minitrain::sample", mutates_args=())
def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """See sampling.sample_torch. logits [B, V]; per-row settings [B]; u [B] uniform. -> [B] int64."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return tokens
    if triton_interpreting():       # the interpreter runs programs one after another: many rows per program
        block_b = min(triton.next_power_of_2(B), 1024)
        block_v = min(triton.next_power_of_2(V), max(32, 65536 // block_b))
    else:                           # a GPU: one row per program, wide tiles
        block_b = 1
        block_v = min(triton.next_power_of_2(V), 4096)
    _sample_kernel[(triton.cdiv(B, block_b),)](
        logits, logits.stride(0), temperature.float().contiguous(), top_k.clamp(max=V).to(torch.int32).contiguous(),
        top_p.float().contiguous(), min_p.float().contiguous(), u.float().contiguous(), tokens, B, V,
        BLOCK_B=block_b, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
    return tokens


@sample_triton.register_fake
def _(logits, temperature, top_k, top_p, min_p, u):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)
