"""Learned decoding: heads that predict, at every position, the temperature (and top-p) to sample the next token
with, trained by an analytic min-p objective.

    DecodingHeads        temperature: Linear(H, 1) -> softplus + TEMPERATURE_FLOOR (always > 0)
                         top_p:       Linear(H, 1) -> sigmoid (in (0, 1))
                         on the final normed hidden state; CausalLM.forward returns their outputs as
                         out.temperature / out.top_p [B, T] when model.decoding_heads is set (attach_decoding_heads).
    Checkpoints          the heads' tensors sit in model.safetensors as decoding_heads.temperature.weight, ...;
                         config.json gets "minitrain_decoding_heads":
                         {"temperature": true, "top_p": false, "min_p_ratio": 0.1} (model/checkpoint.py). Models without heads save exactly as before; transformers ignores the
                         extra tensors and field.

The objective (ground truth y at position t, logits z = h_t W^T, min-p ratio r):

    min-p keeps token j at temperature T  <=>  p_j >= r p_max  <=>  (z_max - z_j) / T <= ln(1/r)
    T*   = (z_max - z_y) / ln(1/r)                  the smallest temperature whose min-p filter keeps y (0 if y is top)
    loss_T = w_h * max(0, T* - T) + w_r * [y is top-1] * T

T* is a target (no gradient flows through it). The hinge raises T until the ground truth survives min-p; the
penalty pulls T down where the ground truth is already the most likely token (any T keeps it there, and a small T
samples it almost surely). For a context whose next token is top-1 with probability q, the expected loss is
minimised where P(T* > T) = q w_r / w_h: confident contexts get a small T, uncertain ones a T that covers most of
their T* (w_r >= w_h drives every easy-looking context to the floor).

The top-p head is trained the same way against P*, the smallest top-p that keeps y at the temperature it will be
sampled with (the predicted T, detached; 1 without a temperature head):

    P*   = sum_{j: z_j > z_y} softmax(z / T)_j + softmax(z / T)_y     (mass strictly above y, plus y's own)
    loss_p = w_h * max(0, P* - p) + w_r * [y is top-1] * p

The sampler keeps y exactly when the mass strictly above it is < top_p (kernels/sampling.py), which any p >= P*
satisfies.

Which tokens train the heads (goldilocks_select): among the positions with a label, the ground truth's rank
k_y = #{j : z_j > z_y} puts each token in a bucket: easy (k_y = 0), top-k (0 < k_y < K), other (k_y >= K). A batch
contributes num_tokens tokens: round(easy_frac N) easy and round(topk_frac N) top-k ones; a bucket that runs short
is filled from the other top-k bucket, then from any valid token. Without the filter, num_tokens valid tokens are
drawn uniformly. Full logits are built only for those tokens (and, for the ranks, chunk by chunk without gradient).

Shapes: B batch, T positions, H hidden size, V vocabulary, N selected tokens.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
TEMPERATURE_FLOOR = 0.05     # the smallest temperature the head predicts (softplus + floor keeps it positive)
INITIAL_TEMPERATURE = 1.0    # the temperature head starts here everywhere (its weight is small, its bias set)
INITIAL_TOP_P = 0.9          # and the top-p head here
CONFIG_FIELD = "minitrain_decoding_heads"   # config.json field of a checkpoint with heads
RANK_CHUNK_ELEMENTS = 1 << 24                 # logits elements built at once when ranking ground-truth tokens


class DecodingHeads(nn.Module):
    """Per-position temperature and top-p from hidden states [..., H]; either head may be absent (None)."""

    def __init__(self, hidden_size: int, temperature: bool = True, top_p: bool = False, min_p_ratio: float = 0.1,
                 std: float = 0.02):
        super().__init__()
        if not (temperature or top_p):
            raise ValueError("DecodingHeads needs a temperature head, a top-p head or both")
        if not 0 < min_p_ratio < 1:
            raise ValueError(f"min_p_ratio must be in (0, 1), got {min_p_ratio}")
        self.min_p_ratio = float(min_p_ratio)   # the min-p the heads were trained for (generation uses it)
        self.temperature = nn.Linear(hidden_size, 1) if temperature else None
        self.top_p = nn.Linear(hidden_size, 1) if top_p else None
        with torch.no_grad():
            for head, bias in ((self.temperature, math.log(math.expm1(INITIAL_TEMPERATURE - TEMPERATURE_FLOOR))),
                               (self.top_p, math.log(INITIAL_TOP_P / (1 - INITIAL_TOP_P)))):
                if head is not None:
                    nn.init.normal_(head.weight, 0.0, std)
                    head.bias.fill_(bias)

    def describe(self) -> dict:
        """The config.json entry that lets a loader rebuild these heads."""
        return {"temperature": self.temperature is not None, "top_p": self.top_p is not None,
                "min_p_ratio": self.min_p_ratio}

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(temperature, top_p), each [...] float32 or None for an absent head; hidden: [..., H]."""
        temperature = top_p = None
        if self.temperature is not None:   # heads stay float32 in a bf16 model: cast the input (autocast aside)
            x = self.temperature(hidden.to(self.temperature.weight.dtype)).squeeze(-1).float()
            temperature = F.softplus(x) + TEMPERATURE_FLOOR
        if self.top_p is not None:
            top_p = torch.sigmoid(self.top_p(hidden.to(self.top_p.weight.dtype)).squeeze(-1).float())
        return temperature, top_p


def attach_decoding_heads(model: nn.Module, temperature: bool = True, top_p: bool = False,
                          min_p_ratio: float = 0.1) -> DecodingHeads:
    """Give a CausalLM new heads (on its device, float32), as model.decoding_heads; returns them."""
    device = next(model.parameters()).device
    heads = DecodingHeads(model.config.hidden_size, temperature, top_p, min_p_ratio,
                          model.config.initializer_range).to(device)
    model.decoding_heads = heads
    return heads


def heads_from_description(description, hidden_size: int, source: str) -> DecodingHeads:
    """DecodingHeads as a config.json entry describes them; ValueError naming `source` when it is malformed."""
    if not isinstance(description, dict):
        raise ValueError(f"{source}: field '{CONFIG_FIELD}' must be a mapping, got {description!r}")
    flags = {}
    for name in ("temperature", "top_p"):
        value = description.get(name, False)
        if not isinstance(value, bool):
            raise ValueError(f"{source}: field '{CONFIG_FIELD}.{name}' must be true or false, got {value!r}")
        flags[name] = value
    ratio = description.get("min_p_ratio", 0.1)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"{source}: field '{CONFIG_FIELD}.min_p_ratio' must be in (0, 1), got {ratio!r}")
    if not (flags["temperature"] or flags["top_p"]):
        raise ValueError(f"{source}: field '{CONFIG_FIELD}' names no head (temperature and top_p are both false)")
    return DecodingHeads(hidden_size, flags["temperature"], flags["top_p"], ratio)


# ---------------------------------------------------------------------------------------------------------------
# Targets and losses (pure functions)
# ---------------------------------------------------------------------------------------------------------------

def min_p_temperature_target(logits: torch.Tensor, labels: torch.Tensor, min_p_ratio: float) -> torch.Tensor:
    """T* = (z_max - z_y) / ln(1/r): the smallest temperature at which min-p with ratio r keeps the label y.

    logits [N, V], labels [N] -> [N] float32, 0 where y is a most likely token.
    """
    if not 0 < min_p_ratio < 1:
        raise ValueError(f"min_p_ratio must be in (0, 1), got {min_p_ratio}")
    z = logits.float()
    gap = z.max(dim=-1).values - z.gather(1, labels[:, None]).squeeze(1)    # [N] >= 0
    return gap / math.log(1.0 / min_p_ratio)


def top_p_target(logits: torch.Tensor, labels: torch.Tensor, temperature) -> torch.Tensor:
    """P* = sum_{j: z_j > z_y} p_j + p_y with p = softmax(z / T): the smallest top-p of the form "mass up to and
    including y" (the sampler keeps y when the mass strictly above it is < top_p).

    logits [N, V], labels [N], temperature: a scalar or [N] -> [N] float32 in (0, 1].
    """
    z = logits.float()
    t = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature))
    t = t.to(z.device, torch.float32).expand(z.shape[0])[:, None]            # [N, 1]
    p = torch.softmax(z / t, dim=-1)                                         # [N, V]
    z_y = z.gather(1, labels[:, None])                                       # [N, 1]
    above = (p * (z > z_y)).sum(dim=-1)
    return (above + p.gather(1, labels[:, None]).squeeze(1)).clamp(max=1.0)


def temperature_hinge_loss(predicted: torch.Tensor, target: torch.Tensor, easy: torch.Tensor,
                           hinge_weight: float, reg_weight: float) -> torch.Tensor:
    """mean_i [ hinge_weight * max(0, target_i - predicted_i) + reg_weight * easy_i * predicted_i ].

    predicted [N] (with gradient), target [N] (a constant: detached here), easy [N] bool (the label is top-1).
    Also the loss of the top-p head (predicted top-p against P*). An empty N gives 0 that still reaches the head's
    parameters (so that DistributedDataParallel sees them used).
    """
    if predicted.numel() == 0:
        return predicted.sum() * 0.0
    per_token = hinge_weight * (target.detach() - predicted).clamp(min=0) + reg_weight * easy.float() * predicted
    return per_token.mean()


@torch.no_grad()
def ground_truth_ranks(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """k_y = #{j : z_j > z_y} for z = hidden @ weight.T, built in chunks without gradient.

    hidden [N, H], weight [V, H], labels [N] -> [N] int64 (0 = the label is a most likely token).
    """
    ranks = torch.empty(labels.shape[0], dtype=torch.long, device=labels.device)
    step = max(1, RANK_CHUNK_ELEMENTS // weight.shape[0])
    w = weight.float()
    with torch.autocast(hidden.device.type, enabled=False):                       # float32 logits
        for start in range(0, labels.shape[0], step):
            z = hidden[start:start + step].float() @ w.T                           # [n, V]
            z_y = z.gather(1, labels[start:start + step, None])
            ranks[start:start + step] = (z > z_y).sum(dim=-1)
    return ranks


def _random_pick(candidates: torch.Tensor, count: int, generator) -> torch.Tensor:
    """`count` entries of the 1-D index tensor `candidates`, uniformly without replacement."""
    if count <= 0:
        return candidates[:0]
    order = torch.randperm(candidates.numel(), generator=generator, device="cpu").to(candidates.device)
    return candidates[order[:count]]


def goldilocks_select(ranks: torch.Tensor, num_tokens: int, easy_frac: float = 0.1, topk_frac: float = 0.9,
                      topk: int = 10, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """Indices of the tokens that train the heads, and the realised bucket fractions.

    ranks [n] (ground_truth_ranks of the valid tokens). Wants round(easy_frac N) easy tokens (rank 0) and
    round(topk_frac N) top-k ones (0 < rank < topk), N = min(num_tokens, n); a bucket that runs short is filled from
    the other top-k bucket, then the rest (including N - wanted when the fractions sum below 1) from any unselected
    token. Returns (indices [N] into ranks, {"easy": f, "topk": f, "other": f, "selected": N}) where f are the
    fractions of the selected tokens in each bucket. generator: a CPU torch.Generator (None = the global one).
    """
    n = ranks.numel()
    total = min(num_tokens, n)
    easy = torch.nonzero(ranks == 0).squeeze(1)
    middle = torch.nonzero((ranks > 0) & (ranks < topk)).squeeze(1)
    want_easy = round(total * easy_frac)
    want_middle = min(round(total * topk_frac), total - want_easy)
    take_easy, take_middle = min(want_easy, easy.numel()), min(want_middle, middle.numel())
    # a short bucket borrows from the other top-k bucket
    take_middle += min(want_easy - take_easy, middle.numel() - take_middle)
    take_easy += min(want_middle - min(want_middle, middle.numel()), easy.numel() - take_easy)
    chosen = torch.cat([_random_pick(easy, take_easy, generator), _random_pick(middle, take_middle, generator)])
    remaining = total - chosen.numel()
    if remaining > 0:                                   # then any valid token not chosen yet
        free = torch.ones(n, dtype=torch.bool, device=ranks.device)
        free[chosen] = False
        chosen = torch.cat([chosen, _random_pick(torch.nonzero(free).squeeze(1), remaining, generator)])
    picked = ranks[chosen]
    denominator = max(chosen.numel(), 1)
    fractions = {"easy": (picked == 0).sum().item() / denominator,
                 "topk": ((picked > 0) & (picked < topk)).sum().item() / denominator,
                 "other": (picked >= topk).sum().item() / denominator, "selected": float(chosen.numel())}
    return chosen, fractions


# ---------------------------------------------------------------------------------------------------------------
# The objective a trainer calls
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class HeadsObjective:
    """The heads' loss on one batch (temp_objective analytic_min_p_hinge)."""

    min_p_ratio: float = 0.1
    hinge_weight: float = 1.0
    reg_weight: float = 0.5
    num_tokens: int = 256          # tokens per batch that train the heads
    goldilocks: bool = False       # pick them by bucket (goldilocks_select) instead of uniformly
    easy_frac: float = 0.1
    topk_frac: float = 0.9
    topk: int = 10

    def __call__(self, hidden: torch.Tensor, temperature: torch.Tensor | None, top_p: torch.Tensor | None,
                 labels: torch.Tensor, lm_weight: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, statistics) of a batch. hidden [B, T, H] (final normed), temperature/top_p [B, T] (the heads'
        outputs, None for an absent head), labels [B, T] unshifted (position t predicts labels[t + 1], -100 =
        ignored), lm_weight [V, H].

        statistics (sums, so that callers can pool batches): tokens, easy, topk, other (selected tokens per
        bucket), temp_easy_sum / temp_hard_sum (predicted T summed over selected easy / not-top-1 tokens),
        top_p_sum, temp_loss, top_p_loss.
        """
        H = hidden.shape[-1]
        h = hidden[:, :-1].reshape(-1, H)                                        # [B*(T-1), H]
        y = labels[:, 1:].reshape(-1)
        valid = torch.nonzero(y != IGNORE_INDEX).squeeze(1)                      # [n]
        if self.goldilocks:
            ranks = ground_truth_ranks(h[valid], lm_weight, y[valid])
            pick, _ = goldilocks_select(ranks, self.num_tokens, self.easy_frac, self.topk_frac, self.topk, generator)
            rows = valid[pick]
        else:
            rows = _random_pick(valid, min(self.num_tokens, valid.numel()), generator)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            logits = h[rows].detach().float() @ lm_weight.detach().float().T     # [N, V] float32
            target_t = min_p_temperature_target(logits, y[rows], self.min_p_ratio)
            rank = (logits > logits.gather(1, y[rows][:, None])).sum(dim=-1)   # [N]
        easy = rank == 0
        loss = hidden.new_zeros((), dtype=torch.float32)
        stats = {"tokens": float(rows.numel()), "easy": easy.sum().item(),
                 "topk": ((rank > 0) & (rank < self.topk)).sum().item(), "other": (rank >= self.topk).sum().item()}
        sample_t = 1.0
        if temperature is not None:
            t = temperature[:, :-1].reshape(-1)[rows]                            # [N]
            temp_loss = temperature_hinge_loss(t, target_t, easy, self.hinge_weight, self.reg_weight)
            loss = loss + temp_loss
            sample_t = t.detach()
            stats.update(temp_loss=temp_loss.item(), temp_easy_sum=t[easy].sum().item(),
                         temp_hard_sum=t[~easy].sum().item(), target_sum=target_t.sum().item())
        if top_p is not None:
            p = top_p[:, :-1].reshape(-1)[rows]
            with torch.no_grad():
                target_p = top_p_target(logits, y[rows], sample_t)
            p_loss = temperature_hinge_loss(p, target_p, easy, self.hinge_weight, self.reg_weight)
            loss = loss + p_loss
            stats.update(top_p_loss=p_loss.item(), top_p_sum=p.sum().item())
        return loss, stats


def summarize_stats(pooled: dict[str, float]) -> dict[str, float]:
    """Per-token figures from pooled HeadsObjective statistics: bucket fractions, mean predicted T on easy and hard
    tokens, mean top-p and the mean losses per batch (`batches` pooled)."""
    tokens = max(pooled.get("tokens", 0.0), 1.0)
    out = {f"frac_{name}": pooled.get(name, 0.0) / tokens for name in ("easy", "topk", "other")}
    batches = max(pooled.get("batches", 1.0), 1.0)
    if "temp_easy_sum" in pooled:
        out["temp_easy"] = pooled["temp_easy_sum"] / max(pooled["easy"], 1.0)
        out["temp_hard"] = pooled["temp_hard_sum"] / max(pooled["tokens"] - pooled["easy"], 1.0)
        out["temp_target"] = pooled["target_sum"] / tokens
        out["temp_loss"] = pooled["temp_loss"] / batches
    if "top_p_sum" in pooled:
        out["top_p"] = pooled["top_p_sum"] / tokens
        out["top_p_loss"] = pooled["top_p_loss"] / batches
    return out


def pool(into: dict[str, float], stats: dict[str, float]) -> dict[str, float]:
    """Add a batch's statistics to a running sum (counting batches)."""
    for key, value in stats.items():
        into[key] = into.get(key, 0.0) + value
    into["batches"] = into.get("batches", 0.0) + 1
    return into


@torch.no_grad()
def easy_hard_temperatures(hidden: torch.Tensor, temperature: torch.Tensor, labels: torch.Tensor,
                           lm_weight: torch.Tensor) -> dict[str, float]:
    """Sums of predicted T over every labelled position, split by whether the label is the top-1 token:
    {"easy": n, "hard": n, "temp_easy_sum", "temp_hard_sum"} (held-out evaluation of the temperature head)."""
    H = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, H)
    y = labels[:, 1:].reshape(-1)
    t = temperature[:, :-1].reshape(-1)
    valid = torch.nonzero(y != IGNORE_INDEX).squeeze(1)
    easy = ground_truth_ranks(h[valid], lm_weight, y[valid]) == 0
    t = t[valid].float()
    return {"easy": easy.sum().item(), "hard": (~easy).sum().item(), "temp_easy_sum": t[easy].sum().item(),
            "temp_hard_sum": t[~easy].sum().item()}
