"""Loss-head kernels and the sampler: Triton kernels, chunked PyTorch paths, and naive references.

    fused_linear_cross_entropy(hidden, weight, labels, ...)   training loss, never builds [N, V] logits
    fused_linear_logprobs(hidden, weight, labels, ...)        per-token log p(label) (+ entropy) for DPO/RL
    fused_linear_kl(student_hidden, student_weight, ...)      forward/reverse KL and generalised JSD for distillation
    fused_linear_argmax(hidden, weight)                       the head's greedy token per row (chunked PyTorch only)
    sample(logits, temperature, top_k, top_p, min_p, ...)     sort-free sampling with Hugging Face's filter order

Backends (kernels/backend.py): CUDA tensors run the Triton kernels, everything else the chunked PyTorch path;
KERNELS_BACKEND=triton|torch forces one (Triton on CPU needs TRITON_INTERPRET=1). KERNELS_CHUNK_MB sets the
per-chunk memory budget of the loss heads (default 256). kernels/reference.py holds the naive definitions the tests
compare against; kernels/bench.py measures time and memory against plain PyTorch.
"""

from minitrain.kernels.argmax import fused_linear_argmax
from minitrain.kernels.cross_entropy import fused_linear_cross_entropy
from minitrain.kernels.kl import fused_linear_kl
from minitrain.kernels.logprobs import fused_linear_logprobs
from minitrain.kernels.sampling import sample

__all__ = ["fused_linear_cross_entropy", "fused_linear_logprobs", "fused_linear_kl", "fused_linear_argmax", "sample"]
