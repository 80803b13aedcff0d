# Run: pytest tests/test_kernels_loss.py   (without the torch.compile tests: -m "not slow")
# The chunked PyTorch loss heads (kernels/cross_entropy.py, logprobs.py, kl.py; the CPU default) against the naive
# references in kernels/reference.py: forward and backward in fp32 at tight tolerances, odd shapes over many chunks,
# ignored and all-ignored rows, huge and tiny logits, label smoothing, z-loss, softcap, every reduction, temperature,
# bf16 at least as close to fp32 as PyTorch's own bf16, autocast, chunk sizes set by the memory budget, no host sync,
# and torch.compile equal to eager.
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minitrain.kernels import backend, cross_entropy, fused_linear_cross_entropy, fused_linear_kl, fused_linear_logprobs
from minitrain.kernels.reference import cross_entropy_reference, kl_reference, logprobs_reference

N, H, V = 37, 19, 301          # multiples of no block size


@pytest.fixture(autouse=True)
def torch_backend_small_chunks(monkeypatch):
    """The PyTorch path, with a budget small enough that N=37 rows span many chunks (8 rows of V=301 each)."""
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    monkeypatch.setenv("KERNELS_CHUNK_MB", str(8 * V * 20 / 2**20))


def make_inputs(seed=0, n=N, h=H, v=V, scale=1.0, ignore_every=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, *args, upstream=None, **kwargs):
    out = fn(hidden, weight, *args, **kwargs)
    total = out if out.dim() == 0 else (out * upstream).sum()
    grads = torch.autograd.grad(total, (hidden, weight))
    return out.detach(), grads


def assert_close(actual, expected, atol, rtol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("options", [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(softcap=2.5),
    dict(reduction="none", label_smoothing=0.2, z_loss=1e-3, softcap=4.0),
])
def test_cross_entropy_matches_reference_fp32(options):
    hidden, weight, labels = make_inputs(scale=3.0)
    upstream = torch.linspace(-1.0, 2.0, N)                 # a per-token upstream gradient for reduction="none"
    loss, grads = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, upstream=upstream, **options)
    ref_loss, ref_grads = loss_and_grads(cross_entropy_reference, hidden, weight, labels, upstream=upstream,
                                         **options)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, atol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        assert_close(grad, ref, atol=1e-6)
    assert grads[1].abs().sum() > 0


def test_cross_entropy_matches_pytorch_and_ignores_labels():
    hidden, weight, labels = make_inputs()
    logits = hidden @ weight.T
    for reduction in ("mean", "sum", "none"):
        expected = F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=0.1)
        actual = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, label_smoothing=0.1)
        assert_close(actual, expected, atol=1e-5)
    per_token = fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
    assert (per_token[labels == -100] == 0).all() and (per_token[labels != -100] > 0).all()
    # an ignored row gets no gradient at all
    grad_hidden, = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, labels), hidden)
    assert (grad_hidden[labels == -100] == 0).all() and (grad_hidden[labels != -100].abs().sum(1) > 0).all()


def test_upstream_gradient_scales_the_precomputed_gradients():
    # mean/sum losses compute their gradients during the forward pass; backward must still apply grad_output
    hidden, weight, labels = make_inputs(seed=2)
    g = torch.Generator().manual_seed(2)
    teacher_hidden, teacher_weight = torch.randn(N, 5, generator=g), torch.randn(V, 5, generator=g)
    cases = [(fused_linear_cross_entropy, cross_entropy_reference, (labels,)),
             (fused_linear_kl, kl_reference, (teacher_hidden, teacher_weight, labels != -100))]
    for fn, ref_fn, args in cases:
        grads = torch.autograd.grad(-2.5 * fn(hidden, weight, *args), (hidden, weight))
        ref_grads = torch.autograd.grad(-2.5 * ref_fn(hidden, weight, *args), (hidden, weight))
        for grad, ref in zip(grads, ref_grads):
            assert_close(grad, ref, atol=1e-6)


def test_weight_gradient_accumulates_in_fp32_across_chunks(monkeypatch):
    # autocast bf16, one row per chunk (256 chunks): each chunk's bf16 product is added to an fp32 accumulator.
    # Accumulating in bf16 instead loses ~1% here; the fp32 accumulator stays within a bf16 rounding of the truth.
    monkeypatch.setenv("KERNELS_CHUNK_MB", "1e-6")
    hidden, weight, labels = make_inputs(seed=4, n=256, h=16, v=64, ignore_every=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum")
    _, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    h16, w16 = hidden.detach().bfloat16().float(), weight.detach().bfloat16().float().requires_grad_()
    exact, = torch.autograd.grad(cross_entropy_reference(h16, w16, labels, reduction="sum"), w16)
    error = ((grad_weight - exact).norm() / exact.norm()).item()
    bf16_accumulator = torch.zeros_like(exact, dtype=torch.bfloat16)
    for i in range(256):                                   # the same sum with a bf16 accumulator, for contrast
        row = torch.autograd.grad(cross_entropy_reference(h16[i:i + 1], w16, labels[i:i + 1], reduction="sum"),
                                  w16)[0]
        bf16_accumulator += row.bfloat16()
    bf16_error = ((bf16_accumulator.float() - exact).norm() / exact.norm()).item()
    assert error < 3e-3 < bf16_error


def test_no_gradient_work_when_no_graph_is_recorded(monkeypatch):
    # under torch.no_grad (evaluation) the loss must not compute gradients in its forward pass
    from minitrain.kernels import kl as kl_module

    def must_not_run(*args):
        raise AssertionError("gradient computed under torch.no_grad")
    monkeypatch.setattr(cross_entropy, "accumulate_weight_grad", must_not_run)
    monkeypatch.setattr(kl_module, "accumulate_weight_grad", must_not_run)
    hidden, weight, labels = make_inputs(seed=15)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels)
        kl = fused_linear_kl(hidden, weight, hidden * 2, weight, labels != -100)
    assert_close(loss, cross_entropy_reference(hidden, weight, labels).detach(), atol=1e-5)
    assert kl.item() > 0
    with pytest.raises(AssertionError, match="no_grad"):           # and with a graph, it does
        fused_linear_cross_entropy(hidden, weight, labels)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    hidden, weight, labels = make_inputs()
    labels[:] = -100
    for reduction in ("mean", "sum"):
        loss, (grad_hidden, grad_weight) = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels,
                                                          reduction=reduction)
        assert loss.item() == 0.0
        assert grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0


def test_cross_entropy_custom_ignore_index_and_int32_labels():
    hidden, weight, labels = make_inputs(ignore_every=0)
    labels[::3] = 7
    expected = F.cross_entropy(hidden @ weight.T, labels, ignore_index=7)
    actual = fused_linear_cross_entropy(hidden, weight, labels.int(), ignore_index=7)
    assert_close(actual, expected, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-4, 300.0])
def test_cross_entropy_tiny_and_huge_logits(scale):
    # scale 300 gives logits in the thousands: exp overflows unless the max is subtracted
    hidden, weight, labels = make_inputs(scale=scale)
    loss, grads = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, z_loss=1e-4)
    ref_loss, ref_grads = loss_and_grads(cross_entropy_reference, hidden, weight, labels, z_loss=1e-4)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert_close(loss, ref_loss, atol=1e-5 * max(1.0, scale), rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        assert_close(grad, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-4)


def test_cross_entropy_chunking_does_not_change_the_result(monkeypatch):
    hidden, weight, labels = make_inputs(seed=3)
    results = []
    for megabytes in ("1e-6", "0.05", "256"):                 # 1 row per chunk, a few chunks, one chunk
        monkeypatch.setenv("KERNELS_CHUNK_MB", megabytes)
        results.append(loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels))
    for loss, grads in results[1:]:
        assert_close(loss, results[0][0], atol=1e-6)
        for grad, ref in zip(grads, results[0][1]):
            assert_close(grad, ref, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_row_blocks_give_bit_identical_results(monkeypatch, dtype):
    # the torch row ops walk each chunk in cache-sized row blocks on CPU (kernels.backend.row_blocks); rows are
    # independent, so blocks of 3 rows (a ragged last block in every 8-row chunk) must not change the results
    hidden, weight, labels = make_inputs(seed=5, scale=3.0, dtype=dtype)
    teacher_hidden, teacher_weight = (t.detach() for t in make_inputs(seed=6, dtype=dtype)[:2])
    mask = labels != -100
    upstream = torch.linspace(-1.0, 2.0, N)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def every_output():
        outputs = []
        with autocast:
            for options in (dict(), dict(reduction="none", label_smoothing=0.2, z_loss=1e-3, softcap=4.0)):
                outputs += loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, upstream=upstream,
                                          **options)
            with torch.no_grad():
                outputs.append(fused_linear_cross_entropy(hidden, weight, labels, reduction="none"))
            logp, entropy = fused_linear_logprobs(hidden, weight, labels, temperature=0.7, return_entropy=True)
            outputs += [logp, entropy, *torch.autograd.grad((logp * upstream + entropy).sum(), (hidden, weight))]
            for beta in (0.0, 0.5, 1.0):
                outputs += loss_and_grads(fused_linear_kl, hidden, weight, teacher_hidden, teacher_weight, mask,
                                          beta=beta, temperature=1.5)
        return [t.detach() for item in outputs for t in (item if isinstance(item, tuple) else (item,))]

    one_block = every_output()                               # a block of 4 MB holds every 8-row chunk whole
    monkeypatch.setattr(backend, "CPU_ROW_BLOCK_BYTES", 3 * V * 4)
    assert backend.row_blocks(torch.empty(8, V)) == [(0, 3), (3, 6), (6, 8)]
    blocked = every_output()
    assert len(blocked) == len(one_block) == 20
    for actual, expected in zip(blocked[:11], one_block[:11]):     # cross-entropy and log-probs: every bit
        assert torch.equal(actual, expected)
    for actual, expected in zip(blocked[11:], one_block[11:]):     # KL: its row sums are a batched matmul, whose
        assert_close(actual, expected, atol=1e-7 * expected.abs().max().item(), rtol=1e-6)   # last bit may move
    assert backend.row_blocks(torch.empty(8, V, device="meta")) == [(0, 8)]   # one block off the CPU


def bf16_error(fn, ref_fn, hidden, weight, labels):
    """|loss - fp32 reference| and relative gradient errors, with the reference run on the same bf16 inputs."""
    loss, grads = loss_and_grads(fn, hidden, weight, labels)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref_loss, ref_grads = loss_and_grads(ref_fn, h32, w32, labels)
    grad_errors = [((g.float() - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads)]
    return abs(loss.float().item() - ref_loss.item()), grad_errors


def test_cross_entropy_bf16_at_least_as_close_as_pytorch_bf16():
    hidden, weight, labels = make_inputs(seed=5, n=64, h=32, v=997, scale=4.0, dtype=torch.bfloat16)
    plain = lambda h, w, y: F.cross_entropy(h @ w.T, y)          # PyTorch's own bf16 computation
    ours_loss_err, ours_grad_err = bf16_error(fused_linear_cross_entropy, cross_entropy_reference, hidden, weight,
                                              labels)
    torch_loss_err, torch_grad_err = bf16_error(plain, cross_entropy_reference, hidden, weight, labels)
    assert ours_loss_err <= torch_loss_err + 1e-3
    for ours, theirs in zip(ours_grad_err, torch_grad_err):
        assert ours <= theirs + 1e-2
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.bfloat16


def test_logprobs_and_kl_bf16_at_least_as_close_as_pytorch_bf16():
    hidden, weight, labels = make_inputs(seed=6, n=48, h=32, v=517, scale=4.0, dtype=torch.bfloat16)
    ours = lambda h, w, y: fused_linear_logprobs(h, w, y, temperature=0.8).sum()
    plain = lambda h, w, y: torch.log_softmax(h @ w.T / 0.8, -1).gather(1, y.clamp(min=0)[:, None])[y >= 0].sum()
    ref = lambda h, w, y: logprobs_reference(h, w, y, temperature=0.8).sum()
    ours_err, ours_grad = bf16_error(ours, ref, hidden, weight, labels)
    torch_err, torch_grad = bf16_error(plain, ref, hidden, weight, labels)
    assert ours_err <= torch_err + 1e-2
    assert all(a <= b + 1e-2 for a, b in zip(ours_grad, torch_grad))

    g = torch.Generator().manual_seed(7)
    teacher_hidden = torch.randn(48, 24, generator=g).bfloat16()
    teacher_weight = (torch.randn(517, 24, generator=g) / 5).bfloat16()
    mask = labels != -100
    ours = lambda h, w, y: fused_linear_kl(h, w, teacher_hidden, teacher_weight, mask, beta=0.5)
    ref = lambda h, w, y: kl_reference(h, w, teacher_hidden.float(), teacher_weight.float(), mask, beta=0.5)

    def plain(h, w, y):                       # the same divergence computed by PyTorch in bf16
        log_q = torch.log_softmax(h @ w.T, -1)
        log_p = torch.log_softmax(teacher_hidden @ teacher_weight.T, -1)
        log_m = torch.logaddexp(log_p + torch.tensor(0.5).log(), log_q + torch.tensor(0.5).log())
        per_token = 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
        return per_token[mask].mean()
    ours_err, ours_grad = bf16_error(ours, ref, hidden, weight, labels)
    torch_err, torch_grad = bf16_error(plain, ref, hidden, weight, labels)
    assert ours_err <= torch_err + 1e-3
    assert all(a <= b + 1e-2 for a, b in zip(ours_grad, torch_grad))


def test_cross_entropy_under_autocast_keeps_fp32_weight_gradient():
    hidden, weight, labels = make_inputs(seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels)
        plain = F.cross_entropy(hidden @ weight.T, labels)          # autocast: bf16 matmul, fp32 loss
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    assert grad_hidden.dtype == grad_weight.dtype == torch.float32
    ref_loss = cross_entropy_reference(hidden, weight, labels)
    assert abs(loss.item() - ref_loss.item()) <= abs(plain.item() - ref_loss.item()) + 1e-3
    ref_grad_weight, = torch.autograd.grad(ref_loss, weight)
    assert ((grad_weight - ref_grad_weight).norm() / ref_grad_weight.norm()).item() < 2e-2


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_and_entropy_match_reference_fp32(temperature):
    hidden, weight, labels = make_inputs(seed=9, scale=3.0)
    upstream_logp, upstream_entropy = torch.linspace(-1, 1, N), torch.linspace(0.5, -2, N)
    logp, entropy = fused_linear_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True)
    ref_logp, ref_entropy = logprobs_reference(hidden, weight, labels, temperature, return_entropy=True)
    assert_close(logp, ref_logp, atol=1e-5)
    assert_close(entropy, ref_entropy, atol=1e-5)
    assert (logp[labels == -100] == 0).all() and (logp[labels != -100] < 0).all()
    for weights in ((upstream_logp, upstream_entropy), (upstream_logp, None), (None, upstream_entropy)):
        def objective(lp, ent):
            return sum((out * w).sum() for out, w in zip((lp, ent), weights) if w is not None)
        grads = torch.autograd.grad(objective(*fused_linear_logprobs(hidden, weight, labels, temperature, True)),
                                    (hidden, weight))
        ref_grads = torch.autograd.grad(objective(*logprobs_reference(hidden, weight, labels, temperature, True)),
                                        (hidden, weight))
        for grad, ref in zip(grads, ref_grads):
            # sums over 37 rows of terms up to ~10 (hidden scale 3, T = 0.6) in a different order: a few 1e-6 apart
            assert_close(grad, ref, atol=1e-5)


def test_logprobs_without_entropy_and_huge_logits():
    hidden, weight, labels = make_inputs(seed=10, scale=300.0)
    logp = fused_linear_logprobs(hidden, weight, labels)
    assert logp.shape == (N,)
    ref = logprobs_reference(hidden, weight, labels)
    assert_close(logp, ref, atol=1e-3, rtol=1e-5)
    grads = torch.autograd.grad(logp.sum(), (hidden, weight))
    ref_grads = torch.autograd.grad(ref.sum(), (hidden, weight))
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad, atol=1e-4 * ref_grad.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_reference_fp32(beta, temperature):
    hidden, weight, labels = make_inputs(seed=11, scale=2.0)
    g = torch.Generator().manual_seed(12)
    teacher_hidden, teacher_weight = torch.randn(N, 23, generator=g) * 2, torch.randn(V, 23, generator=g) / 4
    mask = labels != -100
    loss, grads = loss_and_grads(fused_linear_kl, hidden, weight, teacher_hidden, teacher_weight, mask,
                                 temperature=temperature, beta=beta)
    ref_loss, ref_grads = loss_and_grads(kl_reference, hidden, weight, teacher_hidden, teacher_weight, mask,
                                         temperature=temperature, beta=beta)
    assert loss.item() > 0
    assert_close(loss, ref_loss, atol=1e-6)
    for grad, ref in zip(grads, ref_grads):
        assert_close(grad, ref, atol=1e-7)
    assert (grads[0][~mask] == 0).all()


def test_kl_is_zero_for_identical_heads_and_empty_mask():
    hidden, weight, labels = make_inputs(seed=13)
    mask = torch.ones(N, dtype=torch.bool)
    for beta in (0.0, 0.5, 1.0):
        same = fused_linear_kl(hidden, weight, hidden.detach(), weight.detach(), mask, beta=beta)
        assert abs(same.item()) < 1e-6
    empty = fused_linear_kl(hidden, weight, hidden.detach() * 2, weight.detach(), torch.zeros(N, dtype=torch.bool))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="teacher"):
        fused_linear_kl(hidden, weight, hidden, weight, mask)


def test_bad_arguments_raise_clear_errors(monkeypatch):
    hidden, weight, labels = make_inputs()
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="columns"):
        fused_linear_cross_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(hidden, weight, labels, temperature=0.0)
    monkeypatch.setenv("KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="KERNELS_BACKEND"):
        fused_linear_cross_entropy(hidden, weight, labels)
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_linear_cross_entropy(hidden, weight, labels)


@pytest.mark.slow
def test_torch_compile_equals_eager_with_ignored_tokens():
    hidden, weight, labels = make_inputs(seed=14, n=21, h=8, v=53, ignore_every=3)

    def loss_fn(h, w, y):
        return fused_linear_cross_entropy(h, w, y, z_loss=1e-3)
    eager_loss, eager_grads = loss_and_grads(loss_fn, hidden, weight, labels)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(loss_fn, fullgraph=True), hidden, weight, labels)
    assert_close(compiled_loss, eager_loss, atol=1e-6)
    for grad, ref in zip(compiled_grads, eager_grads):
        assert_close(grad, ref, atol=1e-6)


@pytest.mark.slow
def test_logprobs_torch_compile_equals_eager_with_ignored_tokens():
    hidden, weight, labels = make_inputs(seed=16, n=21, h=8, v=53, ignore_every=3)

    def objective(h, w, y):
        logp, entropy = fused_linear_logprobs(h, w, y, temperature=0.7, return_entropy=True)
        return (logp * torch.linspace(-1, 1, 21)).sum() + 0.1 * entropy.sum()
    eager_out, eager_grads = loss_and_grads(objective, hidden, weight, labels)
    compiled_out, compiled_grads = loss_and_grads(torch.compile(objective, fullgraph=True), hidden, weight, labels)
    assert_close(compiled_out, eager_out, atol=1e-5)
    for grad, ref in zip(compiled_grads, eager_grads):
        assert_close(grad, ref, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=5.0),
    dict(reduction="none", label_smoothing=0.05, z_loss=1e-4, softcap=8.0),
])
def test_cross_entropy_bf16_options_at_least_as_close_as_pytorch_bf16(options):
    # "PyTorch's own bf16": the reference formula evaluated entirely in bf16 (logits, softcap, logsumexp, loss)
    hidden, weight, labels = make_inputs(seed=17, n=64, h=32, v=997, scale=4.0, dtype=torch.bfloat16)
    eps, z, cap = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0), options.get("softcap")
    reduction = options.get("reduction", "mean")

    def plain_bf16(h, w, y):
        logits = h @ w.T                                                      # bf16 [n, V]
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        lse = torch.logsumexp(logits, -1)
        loss = ((1 - eps) * (lse - logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1))
                + eps * (lse - logits.mean(-1)) + z * lse * lse) * (y != -100)
        return loss if reduction == "none" else loss.sum() / (y != -100).sum()

    upstream = torch.linspace(-1.0, 2.0, 64)

    def errors(fn):
        out, grads = loss_and_grads(fn, hidden, weight, labels, upstream=upstream)
        h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
        ref, ref_grads = loss_and_grads(cross_entropy_reference, h32, w32, labels, upstream=upstream, **options)
        return ((out.float() - ref).abs().max().item(),
                [((g.float() - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads)])
    ours_err, ours_grad_err = errors(lambda h, w, y: fused_linear_cross_entropy(h, w, y, **options))
    torch_err, torch_grad_err = errors(plain_bf16)
    assert torch_err > 0                                  # the comparison means something: bf16 does lose digits
    assert ours_err <= torch_err + 1e-3
    assert all(a <= b + 1e-2 for a, b in zip(ours_grad_err, torch_grad_err))


@pytest.mark.parametrize("scale", [1e-4, 60.0])
def test_kl_tiny_and_huge_logits(scale):
    # scale 60 gives logits in the hundreds, and distributions close to one-hot on both sides
    hidden, weight, labels = make_inputs(seed=18, scale=scale)
    g = torch.Generator().manual_seed(19)
    teacher_hidden, teacher_weight = torch.randn(N, 7, generator=g) * scale, torch.randn(V, 7, generator=g)
    mask = labels != -100
    # the reference runs in float64: at scale 60 its fp32 run is itself off by ~1e-7 relative to the largest gradient
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    for beta in (0.0, 0.5, 1.0):
        loss, grads = loss_and_grads(fused_linear_kl, hidden, weight, teacher_hidden, teacher_weight, mask,
                                     beta=beta, temperature=1.5)
        ref_loss, ref_grads = loss_and_grads(kl_reference, h64, w64, teacher_hidden.double(),
                                             teacher_weight.double(), mask, beta=beta, temperature=1.5)
        assert torch.isfinite(loss) and all(torch.isfinite(grad).all() for grad in grads)
        assert abs(loss.item() - ref_loss.item()) <= 1e-6 * max(1.0, abs(ref_loss.item()))
        for grad, ref in zip(grads, ref_grads):
            assert_close(grad.double(), ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=0)


def test_chunk_size_follows_the_memory_budget_not_the_shape(monkeypatch):
    # the rows per chunk depend on the budget and V only: the same for H = 8 and H = 64, and N spans many chunks
    seen = []
    row_op = cross_entropy.ce_rows_torch

    def spy(logits, *args):
        seen.append(logits.shape[0])
        return row_op(logits, *args)
    monkeypatch.setattr(cross_entropy, "ce_rows_torch", spy)
    budget_rows = 10
    monkeypatch.setenv("KERNELS_CHUNK_MB", str(budget_rows * V * (4 + 12) / 2**20))   # fp32 logits + torch extras
    for h in (8, 64):
        hidden, weight, labels = make_inputs(seed=20, h=h)
        seen.clear()
        fused_linear_cross_entropy(hidden, weight, labels).backward()
        assert seen == [10, 10, 10, 7]                     # N = 37 rows in chunks of the budget's 10
    monkeypatch.setenv("KERNELS_CHUNK_MB", str(3 * V * 16 / 2**20))
    seen.clear()
    fused_linear_cross_entropy(hidden, weight, labels)
    assert max(seen) == 3 and sum(seen) == N


class _NoHostSync(TorchDispatchMode):
    """Fails on any device-to-host read of a tensor value (.item(), bool(), int(), float() of a tensor)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host sync inside the loss")
        return func(*args, **(kwargs or {}))


def test_losses_have_no_host_sync():
    hidden, weight, labels = make_inputs(seed=21)
    teacher_hidden = torch.randn(N, 5, generator=torch.Generator().manual_seed(21))
    teacher_weight = torch.randn(V, 5, generator=torch.Generator().manual_seed(22))
    mask = labels != -100
    objectives = [
        lambda: fused_linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1, z_loss=1e-3, softcap=5.0),
        lambda: fused_linear_cross_entropy(hidden, weight, labels, reduction="none").sum(),
        lambda: sum(out.sum() for out in fused_linear_logprobs(hidden, weight, labels, 0.8, return_entropy=True)),
        lambda: fused_linear_kl(hidden, weight, teacher_hidden, teacher_weight, mask, beta=0.5),
    ]
    for objective in objectives:
        with _NoHostSync():
            grads = torch.autograd.grad(objective(), (hidden, weight))
        assert all(grad.abs().sum() > 0 for grad in grads)
    with _NoHostSync(), pytest.raises(AssertionError, match="host sync"):   # and the guard does catch one
        fused_linear_cross_entropy(hidden, weight, labels).item()


def test_backend_defaults_and_override(monkeypatch):
    from minitrain.kernels.backend import resolve_backend
    monkeypatch.delenv("KERNELS_BACKEND")
    assert resolve_backend(torch.device("cpu")) == "torch"               # CPU default: the chunked PyTorch path
    assert resolve_backend(torch.device("cuda")) == "triton"             # CUDA default: the Triton kernels
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    assert resolve_backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(torch.device("cpu")) == "triton"              # Triton's interpreter on CPU, as in CI
