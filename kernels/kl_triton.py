"""Triton row op of the fused linear KL / generalised JSD (same contract as kl.kl_rows_torch).

One program per row of the student and teacher [C, V] chunks; X = log Q (student), Y = log P (teacher), all fp32.
Pass 1: both lse's. Pass 2: the row's divergence and sum_j Q_j g_j. Pass 3 (when a gradient is wanted): overwrite
the student row with grad_scale / T * d_j, where d_j = Q_j - P_j (forward KL) or Q_j (g_j - sum_k Q_k g_k).
MODE: 0 forward KL(P || Q), 1 reverse KL(Q || P), 2 generalised JSD with weight beta.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from minitrain.kernels.cross_entropy_triton import block_v, num_warps
from minitrain.kernels.logprobs_triton import _row_lse


@triton.jit
def _log_mixture(log_p, log_q, log_beta, log_one_minus_beta):
    """log M = log(beta P + (1 - beta) Q), computed in log space."""
    a = log_p + log_beta
    b = log_q + log_one_minus_beta
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _kl_rows_kernel(student_ptr, student_stride, teacher_ptr, teacher_stride, grad_scale_ptr, loss_ptr, V,
                    inv_temperature, beta, log_beta, log_one_minus_beta,
                    MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_ptr = student_ptr + row * student_stride
    t_ptr = teacher_ptr + row * teacher_stride
    lse_q = _row_lse(s_ptr, V, inv_temperature, BLOCK_V)
    lse_p = _row_lse(t_ptr, V, inv_temperature, BLOCK_V)

    loss = 0.0
    q_dot_g = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < V
        log_q = tl.load(s_ptr + offs, mask=in_row, other=0.0).to(tl.float32) * inv_temperature - lse_q
        log_p = tl.load(t_ptr + offs, mask=in_row, other=0.0).to(tl.float32) * inv_temperature - lse_p
        q = tl.exp(log_q)
        if MODE == 0:
            term = tl.exp(log_p) * (log_p - log_q)
            g = log_q                     # unused by forward KL's gradient
        elif MODE == 1:
            g = log_q - log_p
            term = q * g
        else:
            log_m = _log_mixture(log_p, log_q, log_beta, log_one_minus_beta)
            term = beta * tl.exp(log_p) * (log_p - log_m) + (1.0 - beta) * q * (log_q - log_m)
            g = (1.0 - beta) * (log_q - log_m)
        loss += tl.sum(tl.where(in_row, term, 0.0), axis=0)
        q_dot_g += tl.sum(tl.where(in_row, q * g, 0.0), axis=0)
    tl.store(loss_ptr + row, loss)

    if WRITE_GRAD:
        scale = tl.load(grad_scale_ptr + row).to(tl.float32) * inv_temperature
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_row = offs < V
            log_q = tl.load(s_ptr + offs, mask=in_row, other=0.0).to(tl.float32) * inv_temperature - lse_q
            log_p = tl.load(t_ptr + offs, mask=in_row, other=0.0).to(tl.float32) * inv_temperature - lse_p
            q = tl.exp(log_q)
            if MODE == 0:
                grad = q - tl.exp(log_p)
            elif MODE == 1:
                grad = q * (log_q - log_p - q_dot_g)
            else:
                log_m = _log_mixture(log_p, log_q, log_beta, log_one_minus_beta)
                grad = q * ((1.0 - beta) * (log_q - log_m) - q_dot_g)
            tl.store(s_ptr + offs, (grad * scale).to(student_ptr.dtype.element_ty), mask=in_row)


# A torch.library custom op: torch.compile keeps the launch as one opaque op that writes into the student logits.
@torch.library.custom_op("minitrain::kl_rows", mutates_args=("student_logits",))
def kl_rows_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, grad_scale: Optional[torch.Tensor],
                   temperature: float, beta: float) -> torch.Tensor:
    """See kl.kl_rows_torch: per-row divergence [C] fp32; with grad_scale, student_logits is overwritten."""
    C, V = student_logits.shape
    if student_logits.stride(1) != 1 or teacher_logits.stride(1) != 1:
        raise ValueError("kl_rows_triton: logits rows must be contiguous")
    loss = torch.empty(C, dtype=torch.float32, device=student_logits.device)
    if C == 0:
        return loss
    mode = 0 if beta == 0.0 else 1 if beta == 1.0 else 2
    mixture_logs = (math.log(beta), math.log(1.0 - beta)) if mode == 2 else (0.0, 0.0)
    block = block_v(V)
    _kl_rows_kernel[(C,)](student_logits, student_logits.stride(0), teacher_logits, teacher_logits.stride(0),
                          loss if grad_scale is None else grad_scale.float().contiguous(), loss, V,
                          1.0 / temperature, float(beta), *mixture_logs,
                          MODE=mode, WRITE_GRAD=grad_scale is not None, BLOCK_V=block, num_warps=num_warps(block))
    return loss


@kl_rows_triton.register_fake
def _(student_logits, teacher_logits, grad_scale, temperature, beta):
    return student_logits.new_empty(student_logits.shape[0], dtype=torch.float32)
