"""The transformer every training method shares: a decoder-only causal language model.

Features (each switched by a ModelConfig field):
- token embedding, pre-norm blocks with RMSNorm, final RMSNorm, output head tied to the embedding or not
- rotary position embedding (RoPE), with linear, YaRN and Llama-3-style frequency scaling for longer contexts
- grouped-query attention through F.scaled_dot_product_attention, with padding masks and a preallocated KV cache
- optional QK-norm (Qwen3) and optional q/k/v bias (Qwen2)
- SwiGLU MLP, or a mixture-of-experts MLP: top-k routing, normalised weights, load-balancing auxiliary loss
- gradient checkpointing per block

Parameter names equal Hugging Face's (model.layers.0.self_attn.q_proj.weight, ...) so a checkpoint is the state
dict itself. Shapes: B batch, T new tokens, S keys (cache + new), H hidden, nh/nkv query/key-value heads, hd head dim.
The training loss never builds the [B*T, V] logits: it goes through kernels.fused_linear_cross_entropy.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minitrain.kernels import fused_linear_cross_entropy
from minitrain.model.config import ModelConfig

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding (Su et al. 2021, arXiv 2104.09864)
# ---------------------------------------------------------------------------------------------------------------

def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies theta^(-2i/d) for i < d/2, rescaled for context extension, and the attention scale factor.

    linear: every frequency divided by `factor` (position interpolation, Chen et al. 2023).
    llama3: long wavelengths (> original_len / low_freq_factor) divided by factor, short ones kept, a smooth ramp
            between (Llama 3.1).
    yarn:   per-frequency blend of interpolation and extrapolation by a linear ramp between the dimensions that
            rotate beta_slow and beta_fast times over the original context, plus cos/sin scaled by
            0.1 * ln(factor) + 1 (Peng et al. 2023, arXiv 2309.00071).
    """
    dim, base = config.resolved_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # [hd/2]
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif kind == "yarn":
        factor = scaling["factor"]
        old_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if scaling.get("attention_factor") is not None:
            attention_factor = scaling["attention_factor"]
        elif scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

        def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times into old_len
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation_weight = 1 - ramp   # 1 for high frequencies (kept), 0 for low ones (interpolated)
        inv_freq = inv_freq / factor * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq.float(), attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed on the fly from fp32 frequencies (kept as a plain attribute, not a buffer, so that
    casting the model to bf16 never rounds them)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.inv_freq, self.attention_factor = rope_frequencies(config)  # [hd/2] fp32

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos, sin of shape [B, T, hd] for integer positions [B, T]."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, hd/2]
        angles = torch.cat([freqs, freqs], dim=-1)                 # [B, T, hd]
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) by the position's angle. x: [B, nh, T, hd], cos/sin: [B, T, hd]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Attention with a KV cache
# ---------------------------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer, allocated once for `max_len` positions: [B, nkv, max_len, hd] each."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.resolved_head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0      # positions filled so far (the same for every row: padding is explicit)
        self.max_len = max_len
        # Compiled decoding (model/generate.py) writes at a position held in a tensor [1] and attends over the whole
        # cache, future positions masked out, so that every step has the same shapes. None: write after `length`.
        self.write_at: torch.Tensor | None = None

    def update(self, layer: int, k, v):
        """Write new keys/values [B, nkv, T, hd] after the filled ones; return all keys/values so far [B, nkv, S, hd]."""
        if self.write_at is not None:   # fixed shapes: write T = 1 position, return all max_len of them
            self.keys[layer].index_copy_(2, self.write_at, k.to(self.keys[layer].dtype))
            self.values[layer].index_copy_(2, self.write_at, v.to(self.values[layer].dtype))
            return self.keys[layer].to(k.dtype), self.values[layer].to(v.dtype)
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} needed")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end].to(k.dtype), self.values[layer][:, :, :end].to(v.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        self.dropout = config.dropout
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)     # [B, T, nh, hd]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, nkv, hd]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)                # [B, nkv, S, hd]
        # grouped-query attention: each key/value head serves n_heads / n_kv_heads query heads. Without gradients
        # (generation, reference models, evaluation) SDPA reads the shared heads in place (enable_gqa: the same
        # output bits, and no copy of the whole cache at every new token); with gradients they are copied out, so
        # the backward sums the groups' key/value gradients in the order training has always had.
        groups = self.n_heads // self.n_kv_heads
        in_place = groups > 1 and not torch.is_grad_enabled()
        if groups > 1 and not in_place:
            k = k.repeat_interleave(groups, dim=1)                      # [B, nh, S, hd]
            v = v.repeat_interleave(groups, dim=1)
        dropout = self.dropout if self.training else 0.0
        if mask is None:   # plain causal attention over T == S (training without padding): the fused fast path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=in_place)
        else:                                                           # [B, nh, T, hd]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=in_place)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


# ---------------------------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU, or a mixture of SwiGLU experts
# ---------------------------------------------------------------------------------------------------------------

class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, arXiv 2002.05202)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (Qwen3-MoE layout). The router's logits are kept for the load-balancing loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)   # the router
        self.experts = nn.ModuleList(SwiGLU(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.router_logits = None

    def forward(self, x):
        B, T, H = x.shape
        x = x.reshape(-1, H)                                                  # [N, H]
        router_logits = self.gate(x)                                          # [N, E]
        self.router_logits = router_logits
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)           # [N, E]
        weights, experts = probs.topk(self.top_k, dim=-1)                     # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(experts == e)                       # tokens routed to expert e
            if token_idx.numel() == 0:
                continue
            y = expert(x[token_idx]) * weights[token_idx, slot, None]         # [n_e, H]
            out.index_add_(0, token_idx, y)
        return out.view(B, T, H)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None):
    """Switch-Transformer auxiliary loss (Fedus et al. 2021, arXiv 2101.03961), as Hugging Face computes it.

    Over the tokens of all layers together: E * sum_e f_e * P_e, where f_e is the fraction of (token, slot) routings
    that pick expert e and P_e the mean router probability of e; with uniform routing it equals top_k, its minimum.
    token_mask [B*T] (1 = real token) excludes padding.
    """
    logits = torch.cat(router_logits, dim=0)                                  # [L*N, E]
    num_experts = logits.shape[-1]
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    _, selected = probs.topk(top_k, dim=-1)                                   # [L*N, k]
    expert_mask = F.one_hot(selected, num_experts).float()                    # [L*N, k, E]
    if token_mask is None:
        tokens_per_expert = expert_mask.mean(dim=0)                           # [k, E]
        prob_per_expert = probs.mean(dim=0)                                   # [E]
    else:
        m = token_mask.float().repeat(len(router_logits))                     # [L*N]
        tokens_per_expert = (expert_mask * m[:, None, None]).sum(0) / m.sum()
        prob_per_expert = (probs * m[:, None]).sum(0) / m.sum()
    return num_experts * (tokens_per_expert * prob_per_expert[None]).sum()


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.num_experts else SwiGLU(config.hidden_size, config.intermediate_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, kv_cache):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class TransformerBody(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None           # mean next-token loss (+ weighted MoE aux loss), when labels given
    logits: torch.Tensor | None = None         # [B, T, V] (or the last logits_to_keep positions); None with labels
    hidden_states: torch.Tensor | None = None  # final normed hidden states [B, T, H]
    aux_loss: torch.Tensor | None = None       # MoE load-balancing loss (unweighted), None for dense models
    temperature: torch.Tensor | None = None    # [B, T] (or the kept positions) from model.decoding_heads, if any
    top_p: torch.Tensor | None = None          # [B, T] likewise, when the heads include a top-p head


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = TransformerBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.decoding_heads = None   # optional per-token temperature/top-p heads (model/decoding_heads.py)
        self.init_weights()

    def init_weights(self):
        """Initialisation:
        | parameter                          | init                                   |
        | embeddings, q/k/v, gate/up, router | normal(0, initializer_range)           |
        | o_proj, down_proj                  | normal(0, initializer_range / sqrt(2L)) (GPT-2: residual branches) |
        | untied lm_head                     | normal(0, initializer_range)           |
        | biases                             | 0                                      |
        | norm weights                       | 1                                      |
        """
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(module.weight, 0.0, residual_std if last in ("o_proj", "down_proj") else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def enable_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.gradient_checkpointing = enabled

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count (tied weights once). active_only: only the top-k experts of each MoE layer count."""
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if active_only and self.config.num_experts:
            per_expert = sum(p.numel() for p in self.model.layers[0].mlp.experts[0].parameters())
            inactive = self.config.num_experts - self.config.num_experts_per_tok
            total -= self.config.num_hidden_layers * inactive * per_expert
        return total

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, kv_cache: KVCache | None = None,
                logits_to_keep: int | None = None, compute_logits: bool = True) -> CausalLMOutput:
        """input_ids, attention_mask (1 = real token, 0 = padding), position_ids, labels: [B, T].

        With a KV cache, attention_mask covers every position so far ([B, cache length + T]). For sequences that pack
        several documents, attention_mask may hold document numbers instead (1, 1, 2, 2, 2, 3, 0 = padding): a token
        then attends only within its own document; pass position_ids that restart at each document.
        labels are aligned with input_ids and shifted here: position t predicts labels[t + 1]; -100 is ignored.
        compute_logits=False returns the final hidden states only, for losses that apply lm_head.weight themselves
        through a fused kernel (log-probabilities of DPO and RL) without ever holding [B, T, V] logits.
        With decoding heads attached, out.temperature / out.top_p hold their predictions at every position (at the
        kept positions when logits_to_keep is given).
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:   # left padding: count real tokens only
                position_ids = (attention_mask.ne(0).long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        mask = build_attention_mask(attention_mask, T, past, input_ids.device)  # [B, 1, T, S] bool or None

        x = self.model.embed_tokens(input_ids)                                  # [B, T, H]
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        hidden = self.model.norm(x)                                             # [B, T, H]

        aux_loss = None
        if self.config.num_experts:
            token_mask = attention_mask[:, -T:].ne(0).reshape(-1) if attention_mask is not None else None
            aux_loss = load_balancing_loss([blk.mlp.router_logits for blk in self.model.layers],
                                           self.config.num_experts_per_tok, token_mask)
        kept = hidden if logits_to_keep is None else hidden[:, -logits_to_keep:]     # [B, T or kept, H]
        temperature = top_p = None
        if self.decoding_heads is not None:                                     # [B, T or kept] each, or None
            temperature, top_p = self.decoding_heads(hidden if labels is not None else kept)
        if labels is not None:
            shift_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])         # [B*(T-1), H]
            shift_labels = labels[:, 1:].reshape(-1)                            # [B*(T-1)]
            loss = fused_linear_cross_entropy(shift_hidden, self.lm_head.weight, shift_labels,
                                              ignore_index=IGNORE_INDEX)
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
            return CausalLMOutput(loss=loss, hidden_states=hidden, aux_loss=aux_loss, temperature=temperature,
                                  top_p=top_p)
        if not compute_logits:
            return CausalLMOutput(hidden_states=hidden, aux_loss=aux_loss, temperature=temperature, top_p=top_p)
        return CausalLMOutput(logits=self.lm_head(kept), hidden_states=hidden, aux_loss=aux_loss,
                              temperature=temperature, top_p=top_p)


def build_attention_mask(attention_mask, T: int, past: int, device):
    """Boolean mask [B, 1, T, S] (True = may attend): causal, and only to keys of the query's own document.

    attention_mask [B, S] numbers each token's document (0 = padding; a plain 0/1 padding mask is one document), so
    a real token never attends to padding nor, in a packed sequence, to another document. None when there is no
    mask and no cache (then attention uses the fused causal path). Every query may attend to its own position, so no
    row is all False (which would give NaN); the outputs of padding queries are unused.
    """
    if attention_mask is None and past == 0:
        return None
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]                   # [T, 1]
    k_pos = torch.arange(S, device=device)[None, :]                         # [1, S]
    mask = (k_pos <= q_pos)[None, None]                                     # [1, 1, T, S]
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :S]                            # [B, 1, 1, S]
        queries = attention_mask[:, None, past:S, None]                     # [B, 1, T, 1]
        mask = (mask & (keys == queries)) | (k_pos == q_pos)[None, None]
    return mask


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and torch.compile wrappers (any nesting)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
