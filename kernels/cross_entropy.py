"""Fused linear cross-entropy: the loss of hidden @ weight.T against labels without ever holding the [N, V] logits.

How it works (the trick of Liger-Kernel's FusedLinearCrossEntropy, Hsu et al. 2024):
  for each chunk of rows:   logits = hidden_chunk @ weight.T                    # [C, V], C from a memory budget
                            loss_rows, d loss / d logits  (a row op, written into the logits buffer in place)
                            grad_hidden_chunk = d_logits @ weight                 # [C, H]
                            grad_weight += d_logits.T @ hidden_chunk              # [V, H], fp32 accumulator
With reduction "mean" or "sum" the loss is a scalar, so its gradient is known up to the scalar grad_output while
the forward runs: the gradients are computed there, in the same pass, and backward only scales them. With
reduction "none" the upstream gradient differs per token, so backward recomputes the logits chunk by chunk.

The row op exists twice with the same contract: `ce_rows_torch` below (plain PyTorch, the CPU default) and the
Triton kernel in cross_entropy_triton.py (the CUDA default). Per-token loss, with s the (softcapped) logits:
    loss = (1 - eps) * (lse - s_y) + eps * (lse - mean_j s_j) + z * lse^2,    lse = logsumexp_j s_j
    d loss / d s_j = p_j * (1 + 2 z lse) - (1 - eps) [j = y] - eps / V,       p = softmax(s)
    softcap c:  s = c tanh(x / c),  d s / d x = 1 - (s / c)^2
"""

import torch

from minitrain.kernels.backend import (accumulate_weight_grad, check_2d, check_labels, chunk_rows, compute_dtype,
                                        resolve_backend, row_blocks)

REDUCTIONS = ("mean", "sum", "none")


def ce_rows_torch(logits, labels, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row loss [C] (fp32) of logits [C, V]; rows labelled ignore_index give 0.

    When grad_scale [C] is given, logits is overwritten with grad_scale[i] * d loss_i / d logits[i, :]. That path
    works in place in one fp32 buffer (the logits themselves when they are fp32), plus one for the softcap, and
    takes a single exp pass: e = exp(s - max), lse = max + log(sum e), p = e / sum e. On CPU it goes block by block
    of rows (kernels.backend.row_blocks), so the buffers are the size of a block.
    """
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)   # [C]
    for start, end in row_blocks(logits):
        loss[start:end] = _ce_block_torch(logits[start:end], labels[start:end],
                                          None if grad_scale is None else grad_scale[start:end], ignore_index,
                                          label_smoothing, z_loss, softcap)
    return loss


def _ce_block_torch(logits, labels, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    """ce_rows_torch on one block of rows (logits [B, V], a view it writes the gradient into)."""
    V = logits.shape[1]
    valid = labels != ignore_index                                           # [C]
    safe_labels = torch.where(valid, labels, 0).long()[:, None]              # [C, 1]
    if grad_scale is None:                                                   # loss only: leave logits as they are
        s = logits.float()                                                   # [C, V]
        if softcap is not None:
            s = torch.tanh(s / softcap).mul_(softcap)
        lse = torch.logsumexp(s, dim=-1)                                     # [C]
        s_mean = s.mean(dim=-1) if label_smoothing else None
        return _ce_loss(lse, s.gather(1, safe_labels).squeeze(1), s_mean, valid, label_smoothing, z_loss)
    s = logits if logits.dtype == torch.float32 else logits.float()         # [C, V] fp32 work buffer
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(s / softcap)                                       # [C, V]
        torch.mul(tanh, softcap, out=s)
    row_max = s.amax(dim=-1, keepdim=True)                                   # [C, 1]
    row_max.masked_fill_(~torch.isfinite(row_max), 0.0)                      # (as logsumexp does for inf rows)
    s_label = s.gather(1, safe_labels).squeeze(1)                            # [C], read before s is overwritten
    s_mean = s.mean(dim=-1) if label_smoothing else None                     # [C]
    e = s.sub_(row_max).exp_()                                               # [C, V] exp(s - max), in place
    sum_e = e.sum(dim=-1)                                                    # [C]
    lse = row_max.squeeze(1) + sum_e.log()                                   # [C]
    loss = _ce_loss(lse, s_label, s_mean, valid, label_smoothing, z_loss)
    scale = torch.where(valid, grad_scale.float(), torch.zeros_like(lse))     # [C]
    grad = e.mul_(((1.0 + 2.0 * z_loss * lse) * scale / sum_e)[:, None])     # p (1 + 2 z lse) scale
    grad.scatter_add_(1, safe_labels, (-(1.0 - label_smoothing) * scale)[:, None])
    if label_smoothing:
        grad.sub_((label_smoothing / V * scale)[:, None])
    if tanh is not None:
        grad.addcmul_(grad, tanh.square_(), value=-1.0)                      # chain rule: * (1 - tanh^2)
    if grad is not logits:
        logits.copy_(grad)
    return loss


def _ce_loss(lse, s_label, s_mean, valid, label_smoothing, z_loss):
    """Per-row loss [C] from lse, the label's logit and (for label smoothing) the mean logit; 0 on ignored rows."""
    loss = (1.0 - label_smoothing) * (lse - s_label)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - s_mean)
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def _row_op(backend):
    if backend == "triton":
        from minitrain.kernels.cross_entropy_triton import ce_rows_triton
        return ce_rows_triton, 0
    # the torch row op keeps at most three fp32 [C, V] temporaries beside the logits (the upcast of low-precision
    # logits, the softcap's tanh and its argument); without softcap and in fp32 it works in the logits alone
    return ce_rows_torch, 12


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper around the chunk loop; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, label_smoothing, z_loss, softcap, dtype,
                backend, grad_enabled):
        ce_rows, extra_bytes = _row_op(backend)
        N, H = hidden.shape
        V = weight.shape[0]
        # (forward runs with grad mode off, so whether the caller records a graph comes in as grad_enabled)
        need_hidden, need_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        grads_now = (need_hidden or need_weight) and reduction != "none"
        valid = labels != ignore_index                                       # [N]
        n_valid = valid.sum().clamp(min=1)                                   # a tensor: no host sync
        row_weight = valid.float() / n_valid if reduction == "mean" else valid.float()  # [N]

        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)                                             # [V, H]
            loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if grads_now and need_hidden else None          # [N, H]
            grad_weight = (torch.zeros(V, H, dtype=torch.float32, device=weight.device)
                           if grads_now and need_weight else None)                                 # [V, H]
            rows = chunk_rows(N, V, w.element_size() + extra_bytes)
            for start in range(0, N, rows):
                end = min(start + rows, N)
                h = hidden[start:end].to(dtype)                              # [C, H]
                logits = h @ w.T                                             # [C, V]
                scale = row_weight[start:end] if grads_now else None
                loss_rows[start:end] = ce_rows(logits, labels[start:end], scale, ignore_index, label_smoothing,
                                               z_loss, softcap)
                if grad_hidden is not None:                                  # logits now hold d loss / d logits
                    grad_hidden[start:end] = logits @ w
                if grad_weight is not None:
                    accumulate_weight_grad(grad_weight, logits, h)

        ctx.reduction, ctx.ignore_index, ctx.dtype, ctx.backend = reduction, ignore_index, dtype, backend
        ctx.label_smoothing, ctx.z_loss, ctx.softcap = label_smoothing, z_loss, softcap
        ctx.grads_now, ctx.consumed = grads_now, False
        if grads_now:
            ctx.save_for_backward(grad_hidden, grad_weight)
        else:
            ctx.save_for_backward(hidden, weight, labels)
        if reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads_now:
            if ctx.consumed:
                raise RuntimeError("fused_linear_cross_entropy: a second backward through the same graph is not "
                                   "supported (the weight gradient is scaled in place)")
            ctx.consumed = True
            grad_hidden, grad_weight = ctx.saved_tensors
            if grad_hidden is not None:
                grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight = grad_weight.mul_(grad_output)
            return (grad_hidden, grad_weight) + (None,) * 9
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden, grad_weight = _recompute_backward(ctx, hidden, weight, labels, grad_output.float())
        return (grad_hidden, grad_weight) + (None,) * 9


def _recompute_backward(ctx, hidden, weight, labels, grad_rows):
    """Gradients for reduction='none': recompute each chunk's logits, scale each row by its upstream gradient."""
    ce_rows, extra_bytes = _row_op(ctx.backend)
    N, H = hidden.shape
    V = weight.shape[0]
    dtype = ctx.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(V, H, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        rows = chunk_rows(N, V, w.element_size() + extra_bytes)
        for start in range(0, N, rows):
            end = min(start + rows, N)
            h = hidden[start:end].to(dtype)
            logits = h @ w.T                                                 # [C, V]
            ce_rows(logits, labels[start:end], grad_rows[start:end], ctx.ignore_index, ctx.label_smoothing,
                    ctx.z_loss, ctx.softcap)
            if grad_hidden is not None:
                grad_hidden[start:end] = logits @ w
            if grad_weight is not None:
                accumulate_weight_grad(grad_weight, logits, h)
    return grad_hidden, grad_weight


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                               z_loss=0.0, softcap=None):
    """Cross-entropy of hidden @ weight.T against labels, forward and backward, without materialising [N, V].

    hidden [N, H], weight [V, H], labels [N] (int64; ignore_index rows contribute nothing).
    reduction: "mean" (over non-ignored rows; 0 when every row is ignored), "sum", or "none" (per-token [N]).
    label_smoothing: eps of F.cross_entropy. z_loss: coefficient of lse^2 (PaLM). softcap: c in c * tanh(x / c).
    Returns an fp32 loss. Under autocast the matmuls run in the autocast dtype; the softmax math is always fp32 and
    the weight gradient accumulates in fp32 across chunks. No host synchronisation.
    """
    check_2d("hidden", hidden)
    check_2d("weight", weight, cols=hidden.shape[1])
    check_labels(labels, hidden.shape[0])
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: must be in [0, 1]")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap={softcap}: must be > 0 (or None for no softcap)")
    backend = resolve_backend(hidden.device)
    dtype = compute_dtype(hidden, weight)
    return FusedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction, float(label_smoothing),
                                         float(z_loss), None if softcap is None else float(softcap), dtype, backend,
                                         torch.is_grad_enabled())
