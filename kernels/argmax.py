"""Greedy tokens of a linear head, without the [N, V] logits: argmax_v (hidden @ weight.T)[:, v].

The rows go a chunk at a time, sized by the loss heads' memory budget (KERNELS_CHUNK_MB, kernels/backend.py), so
peak memory stays flat as N grows. One PyTorch path on every device: an argmax has no backward and reads each chunk
once, so a Triton kernel would save little. Distillation reads it for the student-teacher agreement.
"""

import torch

from minitrain.kernels.backend import chunk_rows


@torch.no_grad()
def fused_linear_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """argmax_v (hidden @ weight.T)[:, v] for hidden [N, H], weight [V, H]: [N] long (the first of equal maxima)."""
    N, V = hidden.shape[0], weight.shape[0]
    out = torch.empty(N, dtype=torch.long, device=hidden.device)
    rows = chunk_rows(N, V, 4) if N else 1
    for start in range(0, N, rows):
        out[start:start + rows] = (hidden[start:start + rows].to(weight.dtype) @ weight.T).argmax(dim=-1)  # [C]
    return out
