"""Benchmark the loss heads and the sampler against plain PyTorch, torch.compile and Liger-Kernel, in one run.

For each loss kernel (cross-entropy, log-probs, KL) and shape (N, H, V) it times forward + backward and measures
the peak memory of one step above its inputs, for: plain PyTorch (the [N, V] logits, then F.cross_entropy /
log_softmax), torch.compile of that same function, ours (kernels.*, the device's default backend) and Liger-Kernel
when it is installed (CUDA only). Ratios are against plain PyTorch measured in the same run; the timed steps of the
methods are interleaved (one step of each, in turn, `--repeat` times) and the median is reported, so that a noisy
machine slows every method alike. The sampler is timed against torch's sort-based top-k / top-p sampling (Hugging
Face's warpers and torch.multinomial) at several batch sizes.

Memory ("peak": bytes above what was allocated before the step; "extra": peak minus the bytes of the gradients the
step must return, i.e. what a method needs beyond its inputs, weights and their gradients):
- CUDA: torch.cuda.max_memory_allocated() minus torch.cuda.memory_allocated() before the step.
- CPU, --memory rss (the default): the process's resident-set high-water mark. Before the step, freed heap memory is
  handed back to the OS (glibc malloc_trim) and the high-water mark is reset (writing 5 to /proc/self/clear_refs);
  peak = VmHWM after the step minus VmRSS before it. This counts everything the step touches (tensors, allocator
  slack, oneDNN and Inductor scratch), and nothing it merely reserves. Linux only.
- CPU, --memory profiler: the PyTorch profiler's memory timeline (every tensor allocation and free during one step,
  summed in order; the maximum is the peak): tensors only, in a separate profiled step.
--check-cpu-target prints whether ours meets the CPU target of the issue: peak <= 25% of plain PyTorch's, time
<= 1.3x, at (N, V) = (4096, 32000).

Commands (from the repository root):
  python kernels/bench.py                        # CUDA: (N, H, V) of the issue, fp32 and bf16, B = 1, 64, 512
  python kernels/bench.py --device cpu --kernels ce,logprobs,kl --check-cpu-target    # N=4096, H=1024, V=32000
  python kernels/bench.py --device cpu --kernels sample --batch_sizes 1,64            # the sampler, V=32000
  python kernels/bench.py --device cpu --shapes 256,64,4096 --repeat 1 --no-compile   # a smoke test, seconds
"""

import argparse
import ctypes
import gc
import os
import statistics
import time

import torch
import torch.nn.functional as F

from minitrain.kernels import fused_linear_cross_entropy, fused_linear_kl, fused_linear_logprobs, sample
from minitrain.kernels.backend import resolve_backend

GPU_SHAPES = [(4096, 4096, 128256), (16384, 4096, 128256), (8192, 2304, 256000), (8192, 1536, 151936)]
GPU_RL_SHAPES = [(8192, 4096, 128256)]            # log-probs and KL: B=8, T=1024, Llama 3's head
CPU_SHAPES = [(4096, 1024, 32000)]               # the CPU target (H is our choice)
CPU_TARGET = dict(N=4096, V=32000, peak=0.25, time=1.3)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", default="ce,logprobs,kl,sample", help="comma list of ce, logprobs, kl, sample")
    p.add_argument("--shapes", default=None, help="N,H,V;N,H,V (default on CUDA: the issue's shapes, for log-probs "
                                                  "and KL 8192,4096,128256; on CPU: 4096,1024,32000)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16 (default: both on CUDA, fp32 on CPU)")
    p.add_argument("--batch_sizes", default="1,64,512", help="sampler batch sizes")
    p.add_argument("--sample_vocabs", default=None, help="sampler vocabulary sizes (default 128256,151936 on CUDA, "
                                                         "32000 on CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5, help="timed steps per method (the median is reported)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile baseline")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's choice)")
    p.add_argument("--memory", choices=("rss", "profiler"), default="rss",
                   help="how peak memory is measured on CPU (see the module docstring)")
    p.add_argument("--check-cpu-target", action="store_true",
                   help="print whether ours meets the CPU target (peak <= 25%% of plain, time <= 1.3x)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the methods compared


def plain_ce(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels)               # [N, V] logits, upcast as HF does


def plain_logprobs(hidden, weight, labels):
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)             # [N, V]
    return (logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) * (labels >= 0)).sum()


def ours_logprobs(hidden, weight, labels):
    return fused_linear_logprobs(hidden, weight, labels).sum()


def plain_kl(hidden, weight, labels, teacher_hidden, teacher_weight):
    log_q = torch.log_softmax((hidden @ weight.T).float(), dim=-1)            # [N, V]
    log_p = torch.log_softmax((teacher_hidden @ teacher_weight.T).float(), dim=-1)
    per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)   # forward KL(P || Q)
    mask = labels >= 0
    return (per_token * mask).sum() / mask.sum()


def ours_kl(hidden, weight, labels, teacher_hidden, teacher_weight):
    return fused_linear_kl(hidden, weight, teacher_hidden, teacher_weight, labels >= 0, beta=0.0)


def liger_methods(kernel):
    """Liger-Kernel's counterparts, when it is installed (an installed Liger whose names moved is an error, not a
    silent omission). Its fused JSD at jsd_beta=0 is the forward KL by Liger's documentation, as ours with beta=0."""
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        return {}
    if kernel == "ce":
        loss = liger.LigerFusedLinearCrossEntropyLoss()
        return {"liger": lambda h, w, y: loss(w, h, y)}
    if kernel == "kl":
        jsd = liger.LigerFusedLinearJSD(jsd_beta=0.0)
        return {"liger": lambda h, w, y, th, tw: jsd(h, w, th, tw, y)}
    return {}


def sort_based_sample(logits, temperature, top_k, top_p):
    """Hugging Face's TopK + TopP warpers and torch.multinomial: the sort-based baseline."""
    scores = logits.float() / temperature
    kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
    scores = scores.masked_fill(scores < kth, float("-inf"))
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[:, -1] = False
    scores = scores.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1).squeeze(1)


# ----------------------------------------------------------------------------- measuring


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def cpu_rss_peak_bytes(step):
    """Resident-set high-water mark of step() above the resident set before it (see the module docstring)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)          # hand freed heap pages back, so the step cannot reuse them unseen
    with open("/proc/self/clear_refs", "w") as f:     # reset VmHWM to the current VmRSS
        f.write("5")
    before = _proc_status_kib("VmRSS")
    step()
    return (_proc_status_kib("VmHWM") - before) * 1024


def cpu_profiler_peak_bytes(step):
    """Peak bytes of tensors allocated during step() above what existed before, from the profiler's timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    live = peak = 0
    created = set()                  # frees of tensors that existed before step() must not lower the count
    for _, action, (tensor, _version), size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            created.add(tensor)
            live += size
        elif action == Action.DESTROY and tensor in created:
            live -= size
        peak = max(peak, live)
    return peak


def peak_bytes(step, device, memory):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - before
    return cpu_rss_peak_bytes(step) if memory == "rss" else cpu_profiler_peak_bytes(step)


def measure(steps, device, warmup, repeat, memory, reset=lambda: None):
    """{name: (median seconds, peak bytes) or None when out of memory} for the steps {name: step()}.

    The timed steps are interleaved (each method once per round) so that load from elsewhere on the machine slows
    all methods alike; reset() runs before each memory measurement (to drop the previous step's gradients)."""
    order, steps = list(steps), dict(steps)
    results = {}
    for name, step in list(steps.items()):
        try:
            for _ in range(warmup):
                step()
            synchronize(device)
        except torch.OutOfMemoryError:
            results[name] = None
            del steps[name]
            reset()
    times = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    for name, step in steps.items():
        reset()
        results[name] = (statistics.median(times[name]), peak_bytes(step, device, memory))
    reset()
    return {name: results[name] for name in order}


def loss_inputs(N, H, V, dtype, device, with_teacher):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.1] = -100                          # ~10% ignored, as padding would be
    extra = ()
    if with_teacher:
        extra = (torch.randn(N, H, generator=g).to(device, dtype),
                 (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype))
    return hidden, weight, labels.to(device), extra


def bench_loss(kernel, N, H, V, dtype, device, args):
    plain, ours = {"ce": (plain_ce, fused_linear_cross_entropy), "logprobs": (plain_logprobs, ours_logprobs),
                   "kl": (plain_kl, ours_kl)}[kernel]
    hidden, weight, labels, extra = loss_inputs(N, H, V, dtype, device, kernel == "kl")
    candidates = {"pytorch": plain}
    if args.compile:
        candidates["compile"] = torch.compile(plain)
    ours_name = f"ours ({resolve_backend(device)})"
    candidates[ours_name] = ours
    if device.type == "cuda":
        candidates.update(liger_methods(kernel))
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()

    def reset():
        hidden.grad = weight.grad = None

    def make_step(fn):
        def step():
            reset()
            fn(hidden, weight, labels, *extra).backward()
        return step
    results = measure({name: make_step(fn) for name, fn in candidates.items()}, device, args.warmup, args.repeat,
                      args.memory, reset)
    report(f"{kernel:8s} N={N} H={H} V={V} {str(dtype).replace('torch.', '')}", results, grad_bytes)
    if args.check_cpu_target and device.type == "cpu" and (N, V) == (CPU_TARGET["N"], CPU_TARGET["V"]):
        check_cpu_target(kernel, results["pytorch"], results[ours_name])


def check_cpu_target(kernel, plain, ours):
    """The issue's CPU target: the chunked path's peak <= 25% of plain PyTorch's, time <= 1.3x."""
    if plain is None or ours is None:
        print(f"  CPU target ({kernel}): not measured (out of memory)")
        return
    time_ratio, peak_ratio = ours[0] / plain[0], ours[1] / plain[1]
    ok = time_ratio <= CPU_TARGET["time"] and peak_ratio <= CPU_TARGET["peak"]
    print(f"  CPU target ({kernel}): peak x{peak_ratio:.3f} (<= {CPU_TARGET['peak']}), time x{time_ratio:.2f} "
          f"(<= {CPU_TARGET['time']}): {'met' if ok else 'NOT met'}", flush=True)


def bench_sample(B, V, device, args):
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0)).mul_(3).to(device)
    generator = torch.Generator(device).manual_seed(0)
    candidates = {"sort-based": lambda: sort_based_sample(logits, 0.8, 50, 0.9),
                  f"ours ({resolve_backend(device)})": lambda: sample(logits, 0.8, 50, 0.9, generator=generator)}
    results = measure(candidates, device, args.warmup, max(args.repeat, 5), args.memory)
    report(f"sample   B={B} V={V} (T=0.8, top_k=50, top_p=0.9)", results, 0)


def report(title, results, grad_bytes):
    base = results[next(iter(results))]
    print(title)
    for name, result in results.items():
        if result is None:
            print(f"  {name:16s} out of memory")
            continue
        seconds, peak = result
        extra = max(peak - grad_bytes, 0)
        line = (f"  {name:16s} {seconds * 1e3:10.2f} ms  peak {peak / 2**20:9.1f} MiB  "
                f"extra {extra / 2**20:9.1f} MiB")
        if base is not None and result is not base:
            base_extra = max(base[1] - grad_bytes, 1)
            line += (f"  | time x{seconds / base[0]:.2f}  peak x{peak / max(base[1], 1):.3f}  "
                     f"extra x{extra / base_extra:.3f}")
        print(line, flush=True)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")] if args.shapes else None
    dtypes = [DTYPES[d] for d in (args.dtypes or ("fp32,bf16" if on_gpu else "fp32")).split(",")]
    kernels = args.kernels.split(",")
    memory = "max_memory_allocated" if on_gpu else args.memory
    print(f"device {device} ({torch.cuda.get_device_name() if on_gpu else os.cpu_count()}"
          f"{'' if on_gpu else f' CPU cores, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}'}), torch {torch.__version__}, "
          f"KERNELS_CHUNK_MB={os.environ.get('KERNELS_CHUNK_MB', 'default')}, memory: {memory}, median of "
          f"{args.repeat} interleaved steps; ratios are against the first line of each block")
    for kernel in kernels:
        if kernel == "sample":
            vocabs = args.sample_vocabs or ("128256,151936" if on_gpu else "32000")
            for V in (int(v) for v in vocabs.split(",")):
                for B in (int(b) for b in args.batch_sizes.split(",")):
                    bench_sample(B, V, device, args)
            continue
        default_shapes = (GPU_SHAPES if kernel == "ce" else GPU_RL_SHAPES) if on_gpu else CPU_SHAPES
        for N, H, V in shapes or default_shapes:
            for dtype in dtypes:
                bench_loss(kernel, N, H, V, dtype, device, args)


if __name__ == "__main__":
    main()
