"""Optimisation: AdamW's groups, the learning-rate schedule, mixed precision, accumulation and clipping.

One optimizer step of every trainer:

    with optim.sync_gradients(model, last_micro_step), amp:      # no DDP all-reduce before the last micro-step
        loss = ... / accumulation_steps
    scaler.scale(loss).backward()
    grad_norm = optim.optimizer_step(optimizer, scaler, optim.cosine_lr(step, ...), cfg.grad_clip)
"""

import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from minitrain.model.checkpoint import DTYPES
from minitrain.model.transformer import unwrap

from minitrain.trainer.configuration import TrainConfig, TrainingDiverged
from minitrain.trainer.distributed import print0
from minitrain.trainer import sharding


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on weight matrices only.

    No decay for 1-D parameters (norm weights, biases) nor embeddings (an output head tied to the embedding is the
    same tensor, so it gets none either). Frozen parameters (requires_grad False, e.g. under LoRA) are left out.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():   # each shared tensor once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8, fused=device.type == "cuda")
    if cfg.skip_nonfinite_steps:     # read by optimizer_step
        optimizer.nonfinite_skips = {"limit": cfg.skip_nonfinite_steps, "taken": 0}
    return optimizer


def cosine_lr(step: int, max_steps: int, warmup: int, lr: float, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to a floor.

        step < warmup:   lr * (step + 1) / warmup
        afterwards:      lr * (r + (1 - r) * (1 + cos(pi * p)) / 2),  p = (step - warmup) / (max_steps - warmup)
                         clamped to [0, 1], r = min_lr_ratio  (Loshchilov & Hutter 2017, SGDR)
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))




def resolve_dtype(flag: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: auto = bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."""
    if flag == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[flag]


NO_NATIVE_BF16 = "this CPU has no native bfloat16 (no avx512_bf16, amx_bf16 or bf16 in /proc/cpuinfo)"


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True where the CPU computes bfloat16 in hardware: x86's avx512_bf16 or AMX, Arm's bf16 extension, read off
    /proc/cpuinfo's flags. Elsewhere bf16 autocast is emulated and far slower than float32 (2 AVX2 cores, the mini
    model's pretraining: 260 against 7,000 tokens/s). True where there is no /proc/cpuinfo (not Linux) to read."""
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Mixed precision for forward passes; the weights stay float32 (the master copy the optimizer updates)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for float16 (whose small range underflows gradients); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def sync_gradients(model: nn.Module, last_micro_step: bool):
    """DDP all-reduces gradients in every backward, FSDP reduce-scatters them; skip that on all but the last
    micro-step of a step (the gradients accumulate unreduced, then the last backward reduces their sum).

    Wrap the forward and the backward of a micro-step in it.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last_micro_step:
        return model.no_sync()
    if sharding.is_sharded(model):
        return fsdp_gradient_sync(unwrap(model), last_micro_step)
    return nullcontext()


@contextmanager
def fsdp_gradient_sync(model, sync: bool):
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, lr: float,
                   grad_clip: float) -> torch.Tensor:
    """Set the learning rate, unscale, clip the global gradient norm, step, clear gradients.

    Returns the gradient norm before clipping (a tensor: read it at log steps only, it syncs the device).
    Under --skip_nonfinite_steps (build_optimizer) an update whose gradient norm is not finite is skipped instead
    (reading the norm every step), at most that many times, then TrainingDiverged; float16's GradScaler skips
    overflowing steps on its own.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)     # a group may run at a multiple of the schedule
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = sharding.full_tensor(grad_norm)       # under FSDP the norm of every rank's shards together
    skips = getattr(optimizer, "nonfinite_skips", None)
    if skips is not None and not scaler.is_enabled() and not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        skips["taken"] += 1
        if skips["taken"] > skips["limit"]:
            raise TrainingDiverged(f"the gradient norm was not finite ({grad_norm.item()}) in {skips['taken']} "
                                   f"steps, more than --skip_nonfinite_steps {skips['limit']}")
        print0(f"skipped an update whose gradient norm is {grad_norm.item()} ({skips['taken']} of at most "
               f"{skips['limit']})")
        return grad_norm
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def linear_schedule(step: int, start: float, end: float, steps: int) -> float:
    """start at step 0, moving linearly to end at `steps`, then end (temperature and KL-coefficient schedules)."""
    if steps <= 0 or step >= steps:
        return end
    return start + (end - start) * step / steps
