"""Triton row op of the fused linear cross-entropy (same contract as cross_entropy.ce_rows_torch).

One program per row of the [C, V] logits chunk. Pass 1 streams the row in blocks of BLOCK_V and keeps an online
max and sum of exponentials (Milakov & Gimelshein 2018) to get lse, plus the sum of logits for label smoothing.
Pass 2, only when a gradient is wanted, overwrites the row in place with
    grad_scale * (p_j (1 + 2 z lse) - (1 - eps) [j = y] - eps / V) * (1 - (s_j / c)^2 if softcapped)
so the chunk needs no buffer beside its logits. All math is fp32 whatever the logits' dtype.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from minitrain.kernels.backend import triton_interpreting


@triton.jit
def tanh_fp32(x):
    """tanh from exp (portable across Triton versions and the interpreter); saturates cleanly to +-1."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _ce_rows_kernel(logits_ptr, stride_row, labels_ptr, grad_scale_ptr, loss_ptr, V, ignore_index,
                    label_smoothing, z_loss, softcap,
                    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)

    # pass 1: lse by an online max / sum-exp, and the sum of logits (for label smoothing)
    running_max = -float("inf")
    running_sum = 0.0
    logit_sum = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < V
        s = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            s = softcap * tanh_fp32(s / softcap)
        s = tl.where(in_row, s, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(s, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(s - new_max), axis=0)
        running_max = new_max
        logit_sum += tl.sum(tl.where(in_row, s, 0.0), axis=0)
    lse = running_max + tl.log(running_sum)

    s_label = tl.load(row_ptr + safe_label).to(tl.float32)
    if HAS_SOFTCAP:
        s_label = softcap * tanh_fp32(s_label / softcap)
    loss = (1.0 - label_smoothing) * (lse - s_label) + label_smoothing * (lse - logit_sum / V) + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    # pass 2: d loss / d logits, scaled, written over the logits
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(grad_scale_ptr + row).to(tl.float32), 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_row = offs < V
            x = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            s = x
            if HAS_SOFTCAP:
                t = tanh_fp32(x / softcap)
                s = softcap * t
            p = tl.exp(s - lse)
            grad = p * (1.0 + 2.0 * z_loss * lse) - label_smoothing / V
            grad = grad - tl.where(offs == safe_label, 1.0 - label_smoothing, 0.0)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - t * t)
            tl.store(row_ptr + offs, (grad * scale).to(logits_ptr.dtype.element_ty), mask=in_row)


def block_v(V: int) -> int:
    """Columns per block: 4096 fp32 values per step suits a GPU SM; the CPU interpreter is fastest with fewer,
    larger steps."""
    return min(triton.next_power_of_2(V), 8192 if triton_interpreting() else 4096)


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


# A torch.library custom op, so that torch.compile keeps the launch as one opaque op that writes into logits.
@torch.library.custom_op("minitrain::ce_rows", mutates_args=("logits",))
def ce_rows_triton(logits: torch.Tensor, labels: torch.Tensor, grad_scale: Optional[torch.Tensor], ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: Optional[float]) -> torch.Tensor:
    """See cross_entropy.ce_rows_torch: per-row loss [C] fp32; with grad_scale, logits is overwritten in place."""
    C, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("ce_rows_triton: logits rows must be contiguous")
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C == 0:
        return loss
    block = block_v(V)
    labels = labels.contiguous()
    grad_scale = loss if grad_scale is None else grad_scale.float().contiguous()   # (an unread stand-in when None)
    _ce_rows_kernel[(C,)](
        logits, logits.stride(0), labels, grad_scale, loss, V, ignore_index,
        float(label_smoothing), float(z_loss), 1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None, WRITE_GRAD=grad_scale is not None, BLOCK_V=block,
        num_warps=num_warps(block))
    return loss


@ce_rows_triton.register_fake
def _(logits, labels, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)
