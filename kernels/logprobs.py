"""Fused linear log-probs: per-token log p(label) (and entropy) of softmax(hidden @ weight.T / T), differentiable.

DPO, PPO, GRPO and SPO need log p(label) for every response token, and RL methods often the entropy too. Both are
per-token outputs whose upstream gradients differ per token, so the forward keeps only the inputs and each row's
logsumexp ([N] floats), and backward recomputes each chunk's logits (one extra matmul per chunk, no [N, V] tensor at
any time); with the saved logsumexp, backward reads p = exp(s - lse) in one pass, without a max or a sum.

With s = logits / T, lse = logsumexp(s), p = softmax(s), log p_j = s_j - lse, entropy E = -sum_j p_j log p_j:
    d log p_y / d s_j = [j = y] - p_j
    d E / d s_j       = -p_j (log p_j + E)
and d / d logits = (1 / T) d / d s. Rows whose label is -100 get log-prob 0 and no gradient through it.

The row ops exist twice with the same contract: below in PyTorch, and as Triton kernels in logprobs_triton.py.
"""

import torch

from minitrain.kernels.backend import (accumulate_weight_grad, check_2d, check_labels, chunk_rows, compute_dtype,
                                        resolve_backend, row_blocks)

IGNORE_INDEX = -100


def _scaled_rows(logits, temperature):
    """s = logits / T in one fp32 [C, V] buffer (the logits themselves when fp32), in place."""
    s = logits if logits.dtype == torch.float32 else logits.float()         # [C, V]
    return s.div_(temperature) if temperature != 1.0 else s


def logprob_rows_torch(logits, labels, temperature, want_entropy):
    """(log p(label) [C], entropy [C] or None, lse [C]), fp32, for logits [C, V] (which it uses as scratch space).
    On CPU it goes block by block of rows (kernels.backend.row_blocks)."""
    C = logits.shape[0]
    token_logp, lse = (torch.empty(C, dtype=torch.float32, device=logits.device) for _ in range(2))   # [C]
    entropy = torch.empty(C, dtype=torch.float32, device=logits.device) if want_entropy else None      # [C]
    for start, end in row_blocks(logits):
        block_logp, block_entropy, block_lse = _logprob_block_torch(logits[start:end], labels[start:end],
                                                                    temperature, want_entropy)
        token_logp[start:end], lse[start:end] = block_logp, block_lse
        if want_entropy:
            entropy[start:end] = block_entropy
    return token_logp, entropy, lse


def _logprob_block_torch(logits, labels, temperature, want_entropy):
    """logprob_rows_torch on one block of rows."""
    valid = labels != IGNORE_INDEX
    safe_labels = torch.where(valid, labels, 0).long()[:, None]              # [C, 1]
    s = _scaled_rows(logits, temperature)                                    # [C, V]
    row_max = s.amax(dim=-1, keepdim=True)                                   # [C, 1]
    row_max.masked_fill_(~torch.isfinite(row_max), 0.0)
    shifted = s.sub_(row_max)                                                # [C, V] s - max
    label_shifted = shifted.gather(1, safe_labels).squeeze(1)                # [C] s_y - max
    if want_entropy:
        e = shifted.exp()                                                    # [C, V]
        sum_e = e.sum(dim=-1)                                                # [C]
        log_sum = sum_e.log()
        # E = log(sum e) - sum_j e_j (s_j - max) / sum e: two non-negative terms, no cancellation
        entropy = log_sum - e.mul_(shifted).sum(dim=-1) / sum_e
    else:
        log_sum = shifted.exp_().sum(dim=-1).log()                           # [C]
        entropy = None
    token_logp = label_shifted - log_sum
    lse = row_max.squeeze(1) + log_sum                                       # [C], for the backward
    return torch.where(valid, token_logp, torch.zeros_like(token_logp)), entropy, lse


def logprob_grad_rows_torch(logits, labels, temperature, lse, grad_logp, grad_entropy):
    """Overwrite logits [C, V] with d(sum_i grad_logp_i log p_i(y_i) + grad_entropy_i E_i) / d logits, given each
    row's logsumexp lse [C] from the forward. On CPU it goes block by block of rows (kernels.backend.row_blocks)."""
    for start, end in row_blocks(logits):
        _logprob_grad_block_torch(logits[start:end], labels[start:end], temperature, lse[start:end],
                                  None if grad_logp is None else grad_logp[start:end],
                                  None if grad_entropy is None else grad_entropy[start:end])


def _logprob_grad_block_torch(logits, labels, temperature, lse, grad_logp, grad_entropy):
    """logprob_grad_rows_torch on one block of rows (logits [B, V], a view it writes the gradient into)."""
    valid = labels != IGNORE_INDEX
    safe_labels = torch.where(valid, labels, 0).long()[:, None]
    g = (torch.zeros(labels.shape, dtype=torch.float32, device=labels.device) if grad_logp is None
         else torch.where(valid, grad_logp.float(), 0.0))                    # [C]
    logp = _scaled_rows(logits, temperature).sub_(lse[:, None])              # [C, V] log p = s - lse
    if grad_entropy is None:                                                 # the common case, all in place
        grad = logp.exp_().mul_(-g[:, None])                                 # -g p
    else:
        # d E / d s_j = -p_j (log p_j + E):  grad = -p (g + g_E (log p + E)) + g [j = y]
        p = logp.exp()                                                       # [C, V]
        entropy = -(p * logp).sum(dim=-1, keepdim=True)                      # [C, 1]
        grad = logp.add_(entropy).mul_(grad_entropy.float()[:, None]).add_(g[:, None]).mul_(p).neg_()
    grad.scatter_add_(1, safe_labels, g[:, None])
    if temperature != 1.0:
        grad.div_(temperature)
    if grad is not logits:
        logits.copy_(grad)


def _row_ops(backend):
    """(forward row op, backward row op, fp32 bytes per logit the torch ops add): the forward returns
    (log p(label) [C], entropy [C] or None, lse [C]); the backward overwrites the logits with their gradient."""
    if backend == "triton":
        from minitrain.kernels.logprobs_triton import logprob_grad_rows_triton, logprob_rows_triton
        return logprob_rows_triton, logprob_grad_rows_triton, 0
    # at most three fp32 [C, V] temporaries beside the logits (the upcast of low-precision logits; for the entropy
    # its exp and a product)
    return logprob_rows_torch, logprob_grad_rows_torch, 12


class FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, want_entropy, dtype, backend):
        rows_op, _, extra_bytes = _row_ops(backend)
        N = hidden.shape[0]
        V = weight.shape[0]
        token_logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)     # saved for the backward
        entropy = torch.empty(N, dtype=torch.float32, device=hidden.device) if want_entropy else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)                                             # [V, H]
            rows = chunk_rows(N, V, w.element_size() + extra_bytes)
            for start in range(0, N, rows):
                end = min(start + rows, N)
                logits = hidden[start:end].to(dtype) @ w.T                   # [C, V]
                chunk_logp, chunk_entropy, chunk_lse = rows_op(logits, labels[start:end], temperature, want_entropy)
                token_logp[start:end] = chunk_logp
                lse[start:end] = chunk_lse
                if want_entropy:
                    entropy[start:end] = chunk_entropy
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.dtype, ctx.backend = temperature, dtype, backend
        ctx.set_materialize_grads(False)
        if want_entropy:
            return token_logp, entropy
        return token_logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, labels, lse = ctx.saved_tensors
        _, grad_rows_op, extra_bytes = _row_ops(ctx.backend)
        N, H = hidden.shape
        V = weight.shape[0]
        nothing = (None,) * 5
        if grad_logp is None and grad_entropy is None:
            return (None, None) + nothing
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = (torch.zeros(V, H, dtype=torch.float32, device=weight.device)
                           if ctx.needs_input_grad[1] else None)
            rows = chunk_rows(N, V, w.element_size() + extra_bytes)
            for start in range(0, N, rows):
                end = min(start + rows, N)
                h = hidden[start:end].to(ctx.dtype)                          # [C, H]
                logits = h @ w.T                                             # [C, V]
                grad_rows_op(logits, labels[start:end], ctx.temperature, lse[start:end],
                             None if grad_logp is None else grad_logp[start:end],
                             None if grad_entropy is None else grad_entropy[start:end])
                if grad_hidden is not None:
                    grad_hidden[start:end] = logits @ w
                if grad_weight is not None:
                    accumulate_weight_grad(grad_weight, logits, h)
        return (grad_hidden, grad_weight) + nothing


def fused_linear_logprobs(hidden, weight, labels, temperature=1.0, return_entropy=False):
    """log p(labels) [N] under softmax(hidden @ weight.T / temperature), and the entropy [N] if return_entropy.

    hidden [N, H], weight [V, H], labels [N] int64 (-100: log-prob 0, no gradient). Outputs are fp32 and
    differentiable with respect to hidden and weight; the [N, V] logits are never materialised.
    """
    check_2d("hidden", hidden)
    check_2d("weight", weight, cols=hidden.shape[1])
    check_labels(labels, hidden.shape[0])
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    backend = resolve_backend(hidden.device)
    dtype = compute_dtype(hidden, weight)
    return FusedLinearLogprobs.apply(hidden, weight, labels, float(temperature), bool(return_entropy), dtype, backend)
