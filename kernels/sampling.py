"""Token sampling with temperature, top-k, top-p and min-p, without sorting the vocabulary.

Filters apply in Hugging Face's order: temperature, top-k, top-p over what top-k kept (renormalised), min-p. Every
filter keeps the tokens at or above a threshold, so the kept set is found by thresholds, never by a sort:
- top-k: the k-th largest scaled logit (torch.topk, a selection, in the PyTorch path, which then works on the k
  candidates alone; a bisection in Triton);
- top-p: the smallest threshold t such that the mass of kept tokens strictly above t is < top_p, found by
  bisection over the float32 bit patterns (ordered as integers), so it is exact after at most 33 steps (the PyTorch
  path, once it holds the few candidates that can survive, reads it off their cumulative sum instead);
- min-p: keep p_j >= min_p * p_max, i.e. exp(s_j - s_max) >= min_p.
Then one uniform number u per row picks the token by inverse CDF over the kept tokens in vocabulary order, which is
an exact draw from the filtered distribution (the order of the vocabulary does not matter for that).
kernels.reference.filtered_probs_reference is the naive definition, including the tie rules.

Conventions (scalars or per-row tensors [B]):
- temperature: > 0 scales the logits; 0 means greedy (argmax) for that row. A negative scalar is an error; a
  negative entry of a per-row tensor is treated as 0.
- top_k <= 0 is off (and top_k >= V keeps everything); top_p >= 1 is off, top_p <= 0 keeps only the most likely
  token(s); min_p <= 0 is off.
- A row holding a NaN or +inf logit, or no finite logit at all, has no distribution: its result is -1 (not a token
  id, so misuse fails loudly downstream). The sampler never raises for it, so the Triton path stays free of host
  syncs (the PyTorch path reads which filters are on, and k, on the host).
- The same generator state gives the same tokens (one torch.rand draw of B numbers per call).
"""

import torch

from minitrain.kernels.backend import check_2d, resolve_backend

_NEG_INF = float("-inf")


def _per_row(value, B, dtype, device, name):
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.expand(B)
        if value.shape != (B,):
            raise ValueError(f"{name} must be a scalar or a tensor of shape [{B}], got {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype)
    return torch.full((B,), value, dtype=dtype, device=device)


def ordered_keys(s: torch.Tensor) -> torch.Tensor:
    """int64 keys with the same order as the float32 values s (no NaN; -0.0 folded into +0.0)."""
    bits = torch.where(s == 0, 0.0, s).view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()


# Top-p without top-k: candidate counts tried before the bisection over the whole vocabulary (see sample_torch).
_NUCLEUS_CANDIDATES = (256, 4096)


def _in_vocab_order(indices, *tensors):
    """Candidates [B, m] (vocabulary indices, and tensors aligned with them) reordered by index: the draw walks the
    vocabulary in order, so compacted and full draws pick the same token from the same u. Sorts m indices per row,
    never the vocabulary."""
    order = indices.argsort(dim=-1)
    return tuple(t.gather(1, order) for t in (indices, *tensors))


def _top_p_on_sorted(values, weight, keep, top_p, use_p, total):
    """Top-p over candidates sorted by descending value: a token stays when the mass of the tokens strictly above it
    is < top_p * total, or when it is a maximum. Tied tokens share the mass above their first (searchsorted)."""
    cumulative = weight.double().cumsum(dim=-1)                              # [B, m]
    first_of_tie = torch.searchsorted((-values).contiguous(), (-values).contiguous(), side="left")
    mass_above = (cumulative - weight.double()).gather(1, first_of_tie)      # [B, m]
    total = cumulative[:, -1] if total is None else total.double()
    target = top_p.double().clamp(min=0.0) * total                           # [B]
    return keep & (~use_p[:, None] | (mass_above < target[:, None]) | (values == values[:, :1]))


def sample_torch(logits, temperature, top_k, top_p, min_p, u):
    """The PyTorch path. logits [B, V]; settings are per-row tensors [B]; u [B] uniform in [0, 1). -> [B] int64.

    Every filter is a threshold over [B, V]. When every row uses top-k, the filters after it run on the top-k
    candidates [B, k] (torch.topk, a selection, returns them sorted, so top-p is a cumulative sum); so does top-p
    without top-k when the top 256 (or 4096) tokens already hold top_p of the mass strictly above their smallest
    value, which makes every token outside them one that top-p removes. Otherwise the top-p threshold is bisected
    over the whole vocabulary. With no filter on any row (plain temperature sampling, as RL rollouts use) the draw
    reads exp(s - s_max) directly: five passes over [B, V]. Reading which filters are on (and k) from per-row
    tensors costs a host sync here; the Triton path has none.
    """
    B, V = logits.shape
    x = logits.float()                                                       # [B, V] (logits itself when fp32)
    row_max = x.amax(dim=-1)                                                 # [B]: NaN, +inf or -inf when invalid
    invalid = ~torch.isfinite(row_max)                                       # a NaN, a +inf, or no finite logit
    if bool(invalid.any()):
        x = torch.where(torch.isnan(x), _NEG_INF, x)                         # keep the math finite for invalid rows
    greedy = temperature <= 0                                                # [B]
    greedy_tokens = x.argmax(dim=-1) if bool(greedy.any()) else None
    temperature = torch.where(greedy, 1.0, temperature)                     # [B]
    s = x if bool((temperature == 1.0).all()) else x / temperature[:, None]  # [B, V] scaled logits, never written
    # max(x / t) = max(x) / t exactly (division by t > 0 is monotone under rounding): no second pass over s
    s_max = (row_max / temperature)[:, None]                                 # [B, 1]
    s_max = torch.where(torch.isfinite(s_max), s_max, 0.0)
    use_k = (top_k > 0) & (top_k < V)
    use_p = top_p < 1.0
    use_min_p = min_p > 0.0
    if not (bool(use_k.any()) or bool(use_p.any()) or bool(use_min_p.any())):
        # no filter: every token keeps its unnormalised probability exp(s - s_max) (0 for -inf logits)
        return _draw(torch.sub(s, s_max).exp_(), None, u, greedy, greedy_tokens, invalid)

    keep = s > _NEG_INF                                                      # [B, V]
    candidates = None               # (values [B, m] descending, their vocabulary indices, kept, mass of all kept)
    if bool(use_k.any()):
        k = torch.where(use_k, top_k, 1)
        k_max = int(k.max())
        values, indices = torch.topk(s, k_max, dim=-1)                       # [B, k_max], descending
        kth = torch.where(use_k, values.gather(1, (k - 1)[:, None]).squeeze(1), _NEG_INF)[:, None]   # [B, 1]
        ties_outside = ((s >= kth).sum(dim=-1) > k_max) & ~invalid           # tokens tied with the k-th left out
        if bool(use_k.all()) and not bool(ties_outside.any()):
            candidates = (values, indices, (values > _NEG_INF) & (values >= kth), None)
        else:
            keep &= s >= kth
    elif bool((use_p | invalid).all()):
        total = torch.where(keep, torch.exp(s - s_max), 0.0).sum(dim=-1)     # [B]
        for m in _NUCLEUS_CANDIDATES:
            if m >= V:
                break
            values, indices = torch.topk(s, m, dim=-1)                       # [B, m], descending
            smallest = values[:, -1:]                                        # [B, 1]
            mass_above = torch.where(values > smallest, torch.exp(values - s_max), 0.0).sum(dim=-1)
            if bool(((mass_above >= top_p.clamp(min=0.0) * total) | invalid).all()):
                candidates = (values, indices, values > _NEG_INF, total)
                break

    if candidates is not None:                                               # work on [B, m] candidates
        values, indices, keep, total = candidates
        weight = torch.where(keep, torch.exp(values - s_max), 0.0)          # unnormalised probabilities
        if bool(use_p.any()):
            keep = _top_p_on_sorted(values, weight, keep, top_p, use_p, total)
        index, keep, weight = _in_vocab_order(indices, keep, weight)
    else:                                                                    # work on [B, V]
        index = None
        weight = torch.where(keep, torch.exp(s - s_max), 0.0)               # unnormalised probabilities
        if bool(use_p.any()):
            keys = ordered_keys(s)
            target = top_p.clamp(min=0.0) * weight.sum(dim=-1)               # [B] mass to stay below
            lo = keys.masked_fill(~keep, torch.iinfo(torch.int64).max).min(dim=-1).values - 1   # mass above: all
            hi = ordered_keys(s_max).squeeze(1)                              # mass above the max: 0
            lo = torch.minimum(lo, hi - 1)                                   # rows with nothing kept
            for _ in range(33):                                              # key range < 2^33: 33 halvings
                mid = lo + (hi - lo) // 2
                below = (weight * (keys > mid[:, None])).sum(dim=-1) < target
                hi = torch.where(below, mid, hi)
                lo = torch.where(below, lo, mid)
            keep &= ~use_p[:, None] | (keys >= hi[:, None])

    keep &= ~use_min_p[:, None] | (weight >= min_p[:, None])
    weight = torch.where(keep, weight, 0.0)
    return _draw(weight, index, u, greedy, greedy_tokens, invalid)


def _draw(weight, index, u, greedy, greedy_tokens, invalid):
    """The token by inverse CDF: weight [B, m] unnormalised probabilities (0 = filtered out), index [B, m] their
    vocabulary ids (None: the whole vocabulary), u [B] uniform in [0, 1)."""
    cdf = torch.cumsum(weight, dim=-1, dtype=torch.float64)                  # [B, m]
    point = u.double() * cdf[:, -1]                                          # [B]
    tokens = torch.searchsorted(cdf, point[:, None], right=True).squeeze(1)  # first index with cdf > point
    m = cdf.shape[1]
    if bool((tokens >= m).any()):                                            # u * total rounded up to the total
        last_positive = m - 1 - (weight > 0).flip(-1).int().argmax(dim=-1)   # the last token with mass
        tokens = torch.minimum(tokens, last_positive)
    if index is not None:
        tokens = index.gather(1, tokens[:, None]).squeeze(1)
    if greedy_tokens is not None:
        tokens = torch.where(greedy, greedy_tokens, tokens)
    return torch.where(invalid, -1, tokens)


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    """Draw one token per row of logits [B, V] from the filtered distribution; returns int64 [B].

    temperature, top_k, top_p, min_p: Python scalars or per-row tensors [B] (conventions in the module docstring:
    temperature 0 = greedy, top_k 0 / top_p 1.0 / min_p 0.0 = off; invalid rows give -1).
    generator: a torch.Generator on the logits' device, for reproducible draws.
    """
    check_2d("logits", logits)
    B, V = logits.shape
    for name, value, low, high in (("temperature", temperature, 0.0, None), ("top_p", top_p, 0.0, 1.0),
                                   ("min_p", min_p, 0.0, 1.0), ("top_k", top_k, 0, None)):
        if not isinstance(value, torch.Tensor) and (value < low or (high is not None and value > high)):
            raise ValueError(f"sample: {name}={value} is out of range "
                             f"[{low}, {'inf' if high is None else high}]")
    device = logits.device
    temperature = _per_row(temperature, B, torch.float32, device, "temperature")
    top_k = _per_row(top_k, B, torch.int64, device, "top_k")
    top_p = _per_row(top_p, B, torch.float32, device, "top_p")
    min_p = _per_row(min_p, B, torch.float32, device, "min_p")
    u = torch.rand(B, generator=generator, device=device, dtype=torch.float64)   # [B]
    if resolve_backend(device) == "triton":
        from minitrain.kernels.sampling_triton import sample_triton
        return sample_triton(logits, temperature, top_k, top_p, min_p, u)
    return sample_torch(logits, temperature, top_k, top_p, min_p, u)
