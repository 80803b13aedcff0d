"""Fused linear KL / generalised JSD between a student head and a teacher head, for distillation.

Both heads' logits are built chunk by chunk (never [N, V] whole). With Q = softmax(student / T) (log Q = X) and
P = softmax(teacher / T) (log P = Y), the per-token loss is the generalised Jensen-Shannon divergence
    JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M),   M = beta P + (1 - beta) Q     (Agarwal et al. 2024)
with beta = 0 defined as forward KL(P || Q) and beta = 1 as reverse KL(Q || P) (TRL's GKD and Liger's convention).
The loss is the mean over rows where mask is true, a scalar, so the student gradients are computed during the
forward pass (as in cross_entropy.py) and backward only scales them. The teacher is a constant: it gets no gradient.

Gradient with respect to the student's s = logits / T, written d_j = Q_j (g_j - sum_k Q_k g_k):
    forward KL   d_j = Q_j - P_j
    reverse KL   g_j = X_j - Y_j
    JSD          g_j = (1 - beta) (X_j - log M_j)
The row op exists twice with the same contract: below in PyTorch, and as a Triton kernel in kl_triton.py.
"""

import math

import torch

from minitrain.kernels.backend import accumulate_weight_grad, check_2d, chunk_rows, compute_dtype, resolve_backend, row_blocks


def _log_softmax_(buffer, temperature, scratch):
    """buffer [C, V] fp32 <- log_softmax(buffer / temperature), in place; scratch [C, V] is overwritten."""
    if temperature != 1.0:
        buffer.div_(temperature)
    row_max = buffer.amax(dim=-1, keepdim=True)                              # [C, 1]
    row_max.masked_fill_(~torch.isfinite(row_max), 0.0)
    buffer.sub_(row_max)
    return buffer.sub_(torch.exp(buffer, out=scratch).sum(dim=-1, keepdim=True).log_())


def _row_dot(a, b):
    """sum_j a[i, j] b[i, j] for [C, V] tensors, without a [C, V] product (a batched matrix-vector product)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)                # [C]


def kl_rows_torch(student_logits, teacher_logits, grad_scale, temperature, beta):
    """Per-row divergence [C] (fp32); when grad_scale [C] is given, student_logits is overwritten with
    grad_scale[i] * d loss_i / d student_logits[i, :]. Both logits are used as scratch space (in place when fp32);
    beside them it keeps one fp32 buffer for KL, two for the JSD, and an upcast of each low-precision input, each
    the size of a block of rows on CPU (kernels.backend.row_blocks) and of the chunk elsewhere.
    """
    loss = torch.empty(student_logits.shape[0], dtype=torch.float32, device=student_logits.device)   # [C]
    for start, end in row_blocks(student_logits):
        loss[start:end] = _kl_block_torch(student_logits[start:end], teacher_logits[start:end],
                                          None if grad_scale is None else grad_scale[start:end], temperature, beta)
    return loss


def _kl_block_torch(student_logits, teacher_logits, grad_scale, temperature, beta):
    """kl_rows_torch on one block of rows (student_logits [B, V], a view it writes the gradient into)."""
    X = student_logits if student_logits.dtype == torch.float32 else student_logits.float()   # [C, V]
    Y = teacher_logits if teacher_logits.dtype == torch.float32 else teacher_logits.float()   # [C, V]
    scratch = torch.empty_like(X)                                            # [C, V]
    _log_softmax_(X, temperature, scratch)                                   # X = log Q
    _log_softmax_(Y, temperature, scratch)                                   # Y = log P
    if beta == 0.0:                                                          # KL(P || Q); d = Q - P
        p = torch.exp(Y, out=scratch)
        loss = _row_dot(p, Y.sub_(X))
        grad = X.exp_().sub_(p) if grad_scale is not None else None
    elif beta == 1.0:                                                        # KL(Q || P); g = X - Y
        q = torch.exp(X, out=scratch)
        g = X.sub_(Y)
        loss = _row_dot(q, g)                                                # = sum_j Q_j g_j
        grad = g.sub_(loss[:, None]).mul_(q) if grad_scale is not None else None
    else:                                                                    # JSD; g = (1 - beta) (X - log M)
        log_m = torch.add(Y, math.log(beta), out=scratch)
        torch.logaddexp(log_m, X + math.log(1.0 - beta), out=log_m)          # [C, V] log M
        p = torch.exp(Y)                                                     # [C, V]
        loss_p = _row_dot(p, Y.sub_(log_m))                                  # KL(P || M)
        q = torch.exp(X, out=p)
        x_minus_m = X.sub_(log_m)
        loss_q = _row_dot(q, x_minus_m)                                      # KL(Q || M) = sum_j Q_j g_j / (1 - beta)
        loss = beta * loss_p + (1.0 - beta) * loss_q
        grad = x_minus_m.sub_(loss_q[:, None]).mul_(q).mul_(1.0 - beta) if grad_scale is not None else None
    if grad is not None:
        grad.mul_((grad_scale.float() / temperature)[:, None])
        if grad is not student_logits:
            student_logits.copy_(grad)
    return loss


def _row_op(backend):
    if backend == "triton":
        from minitrain.kernels.kl_triton import kl_rows_triton
        return kl_rows_triton, 0
    # fp32 [C, V] buffers beside the two logits: the upcasts of low-precision logits, the scratch, and for the JSD
    # one more (plus a transient for log M)
    return kl_rows_torch, 20


class FusedLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature, beta,
                dtype, teacher_dtype, backend, grad_enabled):
        kl_rows, extra_bytes = _row_op(backend)
        N, H = student_hidden.shape
        V = student_weight.shape[0]
        # (forward runs with grad mode off, so whether the caller records a graph comes in as grad_enabled)
        need_hidden, need_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        mask = mask.bool()
        n_valid = mask.sum().clamp(min=1)                                   # a tensor: no host sync
        row_weight = mask.float() / n_valid                                  # [N]
        with torch.autocast(student_hidden.device.type, enabled=False):
            ws = student_weight.to(dtype)                                    # [V, H]
            wt = teacher_weight.to(teacher_dtype)                            # [V, Ht]
            loss_rows = torch.empty(N, dtype=torch.float32, device=student_hidden.device)
            grad_hidden = torch.empty_like(student_hidden) if need_hidden else None
            grad_weight = torch.zeros(V, H, dtype=torch.float32, device=student_weight.device) if need_weight else None
            rows = chunk_rows(N, V, ws.element_size() + wt.element_size() + extra_bytes)
            for start in range(0, N, rows):
                end = min(start + rows, N)
                hs = student_hidden[start:end].to(dtype)                     # [C, H]
                student_logits = hs @ ws.T                                   # [C, V]
                teacher_logits = teacher_hidden[start:end].to(teacher_dtype) @ wt.T   # [C, V]
                scale = row_weight[start:end] if (need_hidden or need_weight) else None
                loss_rows[start:end] = kl_rows(student_logits, teacher_logits, scale, temperature, beta)
                if grad_hidden is not None:
                    grad_hidden[start:end] = student_logits @ ws
                if grad_weight is not None:
                    accumulate_weight_grad(grad_weight, student_logits, hs)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.consumed = False
        return (loss_rows * row_weight).sum()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError("fused_linear_kl: a second backward through the same graph is not supported "
                               "(the weight gradient is scaled in place)")
        ctx.consumed = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output)
        return (grad_hidden, grad_weight) + (None,) * 9


def fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature=1.0,
                    beta=0.5):
    """Generalised JSD (beta in [0, 1]; 0 = forward KL(teacher || student), 1 = reverse KL) between the student
    head softmax(student_hidden @ student_weight.T / T) and the teacher head, mean over rows where mask is true
    (0 when none is). student_hidden [N, H], student_weight [V, H], teacher_hidden [N, Ht], teacher_weight [V, Ht],
    mask [N] (bool or 0/1). Returns an fp32 scalar, differentiable with respect to the student's hidden and weight.
    The teacher must not require grad (run it under torch.no_grad()): it is treated as a constant.
    """
    check_2d("student_hidden", student_hidden)
    check_2d("student_weight", student_weight, cols=student_hidden.shape[1])
    check_2d("teacher_hidden", teacher_hidden, rows=student_hidden.shape[0])
    check_2d("teacher_weight", teacher_weight, rows=student_weight.shape[0], cols=teacher_hidden.shape[1])
    if mask.dim() != 1 or mask.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"mask must have shape [{student_hidden.shape[0]}], got {tuple(mask.shape)}")
    if torch.is_grad_enabled() and (teacher_hidden.requires_grad or teacher_weight.requires_grad):
        raise ValueError("fused_linear_kl: the teacher gets no gradient; pass teacher tensors that do not require "
                         "grad (compute them under torch.no_grad() or .detach() them)")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta}: must be in [0, 1]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    backend = resolve_backend(student_hidden.device)
    dtype = compute_dtype(student_hidden, student_weight)
    teacher_dtype = compute_dtype(teacher_hidden, teacher_weight)
    return FusedLinearKL.apply(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                               float(temperature), float(beta), dtype, teacher_dtype, backend,
                               torch.is_grad_enabled())
