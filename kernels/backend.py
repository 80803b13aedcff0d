"""Which implementation runs (Triton or chunked PyTorch), how big a chunk is, and small helpers every kernel shares.

Backend: the environment variable KERNELS_BACKEND=triton|torch forces one. Unset, CUDA tensors use Triton and
everything else uses the chunked PyTorch path. Triton on CPU tensors works only under TRITON_INTERPRET=1 (Triton's
interpreter, which is how the CPU tests run the kernels); asking for it otherwise is an error, not a fallback.

Chunk size: the loss heads process the N rows in chunks so that the [chunk, V] logits (and what the backend keeps
beside them) fit in a memory budget, KERNELS_CHUNK_MB megabytes (default 256). The budget, not the vocabulary to
hidden-size ratio, decides the chunk, so peak memory stays flat as N grows.

Row blocks: on a CPU the PyTorch row ops walk each chunk in blocks of rows that fit in the cache (`row_blocks`).
"""

import os

import torch

BACKENDS = ("triton", "torch")
DEFAULT_CHUNK_MB = 256


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on this device (see the module docstring)."""
    forced = os.environ.get("KERNELS_BACKEND", "")
    if forced and forced not in BACKENDS:
        raise ValueError(f"KERNELS_BACKEND={forced!r}: expected one of {', '.join(BACKENDS)}")
    backend = forced or ("triton" if device.type == "cuda" else "torch")
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"KERNELS_BACKEND=triton needs CUDA tensors (got {device.type}); "
                           "set TRITON_INTERPRET=1 to run the Triton kernels on CPU, or KERNELS_BACKEND=torch")
    return backend


def chunk_budget_bytes() -> int:
    value = os.environ.get("KERNELS_CHUNK_MB", str(DEFAULT_CHUNK_MB))
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"KERNELS_CHUNK_MB={value!r}: expected a number of megabytes") from None
    if megabytes <= 0:
        raise ValueError(f"KERNELS_CHUNK_MB={value!r}: must be > 0")
    return int(megabytes * 2**20)


def chunk_rows(n_rows: int, vocab: int, bytes_per_logit: int) -> int:
    """Rows per chunk so that rows x vocab x bytes_per_logit stays within the budget (at least 1, at most n_rows)."""
    rows = chunk_budget_bytes() // max(1, vocab * bytes_per_logit)
    return max(1, min(n_rows, rows))


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the logits matmul runs in: autocast's when autocast is on, else the (shared) input dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them or use autocast")
    return hidden.dtype


# A [V, H] fp32 temporary per chunk would cost as much as the weight gradient itself, so the fp32 accumulation of a
# low-precision chunk product goes through vocabulary slices of this many rows.
_ACCUMULATE_SLICE_ROWS = 8192


# The torch row ops make several passes over a chunk of logits (upcast, max, exp, sum, scale, scatter, downcast).
# A chunk sized by the memory budget is far larger than a CPU's caches, so every pass would stream it from memory;
# walking it in blocks of about this many bytes of fp32 logits keeps the passes in cache. Pretraining the mini model
# (V = 6400) in bf16 on 2 cores: 11% less time a step. Rows are independent: cross-entropy and log-probs come out
# bit-identical; the KL's row sums are a batched matmul, whose last bit can depend on the block.
CPU_ROW_BLOCK_BYTES = 4 * 2**20


def row_blocks(logits: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) row ranges covering logits [C, V] for a torch row op: cache-sized blocks on CPU; on other
    devices one block (there each extra block is only more kernel launches)."""
    n_rows, vocab = logits.shape
    rows = CPU_ROW_BLOCK_BYTES // (4 * vocab) if logits.device.type == "cpu" else n_rows
    rows = max(1, rows)
    return [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight [V, H] fp32 += grad_logits.T [V, C] @ hidden [C, H], accumulated in fp32 across chunks."""
    if grad_logits.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.T, hidden.float())
        return
    for start in range(0, grad_weight.shape[0], _ACCUMULATE_SLICE_ROWS):
        end = min(start + _ACCUMULATE_SLICE_ROWS, grad_weight.shape[0])
        grad_weight[start:end] += (grad_logits[:, start:end].T @ hidden).float()


def check_2d(name: str, tensor: torch.Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {rows}")
    if cols is not None and tensor.shape[1] != cols:
        raise ValueError(f"{name} has {tensor.shape[1]} columns, expected {cols}")


def check_labels(labels: torch.Tensor, rows: int) -> None:
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"labels must have shape [{rows}], got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
