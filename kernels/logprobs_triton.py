"""Triton row ops of the fused linear log-probs (same contracts as logprobs.logprob_rows_torch and
logprobs.logprob_grad_rows_torch). One program per row; s = logits / T; all math in fp32.

Forward: pass 1 online lse (stored for the backward); log p(y) = s_y - lse; pass 2 (only for the entropy)
E = -sum_j p_j (s_j - lse).
Backward, given the forward's lse: pass 2 again for the entropy's gradient only, then one pass overwrites the row with
    (g_logp ([j = y] - p_j) - g_entropy p_j (log p_j + E)) / T
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from minitrain.kernels.cross_entropy_triton import block_v, num_warps

# a module global read inside @triton.jit must be a tl.constexpr: the compiler refuses plain Python globals (the
# interpreter, TRITON_INTERPRET=1, does not), and tests/test_kernels_triton.py checks every kernel for it
IGNORE_INDEX = tl.constexpr(-100)


@triton.jit
def _row_lse(row_ptr, V, inv_temperature, BLOCK_V: tl.constexpr):
    """logsumexp of one row of logits * inv_temperature, by an online max / sum-exp."""
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        s = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * inv_temperature
        new_max = tl.maximum(running_max, tl.max(s, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(s - new_max), axis=0)
        running_max = new_max
    return running_max + tl.log(running_sum)


@triton.jit
def _row_entropy(row_ptr, V, inv_temperature, lse, BLOCK_V: tl.constexpr):
    """-sum_j p_j log p_j of one row, given its lse (each term small: no cancellation at large logits)."""
    entropy = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < V
        logp = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(tl.float32) * inv_temperature - lse
        entropy -= tl.sum(tl.where(in_row, tl.exp(logp) * logp, 0.0), axis=0)
    return entropy


@triton.jit
def _logprob_rows_kernel(logits_ptr, stride_row, labels_ptr, logp_ptr, entropy_ptr, lse_ptr, V, inv_temperature,
                         WANT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != IGNORE_INDEX
    lse = _row_lse(row_ptr, V, inv_temperature, BLOCK_V)
    tl.store(lse_ptr + row, lse)
    s_label = tl.load(row_ptr + tl.where(valid, label, 0)).to(tl.float32) * inv_temperature
    tl.store(logp_ptr + row, tl.where(valid, s_label - lse, 0.0))
    if WANT_ENTROPY:
        tl.store(entropy_ptr + row, _row_entropy(row_ptr, V, inv_temperature, lse, BLOCK_V))


@triton.jit
def _logprob_grad_rows_kernel(logits_ptr, stride_row, labels_ptr, lse_ptr, grad_logp_ptr, grad_entropy_ptr, V,
                              inv_temperature, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
                              BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != IGNORE_INDEX
    lse = tl.load(lse_ptr + row)
    g_logp = 0.0
    if HAS_GRAD_LOGP:
        g_logp = tl.where(valid, tl.load(grad_logp_ptr + row).to(tl.float32), 0.0)
    g_entropy = 0.0
    entropy = 0.0
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32)
        entropy = _row_entropy(row_ptr, V, inv_temperature, lse, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < V
        logp = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(tl.float32) * inv_temperature - lse
        p = tl.exp(logp)
        grad = g_logp * (tl.where(offs == label, 1.0, 0.0) - p) - g_entropy * p * (logp + entropy)
        tl.store(row_ptr + offs, (grad * inv_temperature).to(logits_ptr.dtype.element_ty), mask=in_row)


def logprob_rows_triton(logits, labels, temperature, want_entropy):
    """See logprobs.logprob_rows_torch: (log p(label) [C], entropy [C] or None, lse [C]), fp32."""
    token_logp, entropy, lse = _logprob_rows_op(logits, labels, temperature, want_entropy)
    return token_logp, entropy if want_entropy else None, lse


# torch.library custom ops, so that torch.compile keeps each launch as one opaque op
@torch.library.custom_op("minitrain::logprob_rows", mutates_args=())
def _logprob_rows_op(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                     want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(label) [C], entropy [C] (or [0] when not wanted), lse [C])."""
    C, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logprob_rows_triton: logits rows must be contiguous")
    token_logp = torch.empty(C, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(C if want_entropy else 0, dtype=torch.float32, device=logits.device)
    lse = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C > 0:
        block = block_v(V)
        _logprob_rows_kernel[(C,)](logits, logits.stride(0), labels.contiguous(), token_logp,
                                   entropy if want_entropy else token_logp, lse, V, 1.0 / temperature,
                                   WANT_ENTROPY=want_entropy, BLOCK_V=block, num_warps=num_warps(block))
    return token_logp, entropy, lse


@_logprob_rows_op.register_fake
def _(logits, labels, temperature, want_entropy):
    C = logits.shape[0]
    return (logits.new_empty(C, dtype=torch.float32), logits.new_empty(C if want_entropy else 0, dtype=torch.float32),
            logits.new_empty(C, dtype=torch.float32))


@torch.library.custom_op("minitrain::logprob_grad_rows", mutates_args=("logits",))
def logprob_grad_rows_triton(logits: torch.Tensor, labels: torch.Tensor, temperature: float, lse: torch.Tensor,
                             grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]) -> None:
    """See logprobs.logprob_grad_rows_torch: overwrite logits [C, V] with the gradient of the weighted outputs."""
    C, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logprob_grad_rows_triton: logits rows must be contiguous")
    if C == 0:
        return
    has_grad_logp, has_grad_entropy = grad_logp is not None, grad_entropy is not None
    labels = labels.contiguous()
    # unread stand-ins for absent upstream gradients (the constexpr flags skip their loads)
    grad_logp = grad_logp.float().contiguous() if has_grad_logp else labels
    grad_entropy = grad_entropy.float().contiguous() if has_grad_entropy else labels
    block = block_v(V)
    _logprob_grad_rows_kernel[(C,)](logits, logits.stride(0), labels, lse.float().contiguous(), grad_logp,
                                    grad_entropy, V, 1.0 / temperature,
                                    HAS_GRAD_LOGP=has_grad_logp, HAS_GRAD_ENTROPY=has_grad_entropy,
                                    BLOCK_V=block, num_warps=num_warps(block))
