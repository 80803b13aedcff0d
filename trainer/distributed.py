"""Ranks: torchrun's environment, the process group, collectives and seeds.

A plain `python trainer/train_x.py` is rank 0 of 1 and creates no process group; under torchrun each process joins
one (nccl on CUDA, gloo on CPU). print0 prints on rank 0 only. Collectives send tensors, never pickles:
all_reduce_mean, mean_over_ranks, mean_var_over_ranks, any_rank, all_gather_rows, all_gather_bytes, all_gather_json,
broadcast_text. on_main_rank runs work on rank 0 while the
others wait, and raises its user errors on every rank. check_replicas proves the ranks hold the same weights.
"""

import gc
import importlib
import json
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
from tqdm import tqdm

from minitrain.dataset.jsonl import DataError
from minitrain.model.config import ConfigError
from minitrain.model.transformer import unwrap
from minitrain.trainer.configuration import USER_ERRORS
from minitrain.trainer.sharding import is_sharded


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(flag: str, local_rank: int) -> torch.device:
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {flag}: no CUDA device is available")
        return torch.device(flag if ":" in flag else f"cuda:{local_rank}")
    if flag != "cpu":
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {flag!r}")
    return torch.device("cpu")


def setup_distributed(device_flag: str) -> DistInfo:
    """Join the process group torchrun describes in RANK / LOCAL_RANK / WORLD_SIZE (nccl on CUDA, gloo on CPU).

    A plain `python train_x.py` is rank 0 of 1 and creates no process group.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_flag, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not tdist.is_initialized():
        # DistributedDataParallel and torch.compile import torch._dynamo. Imported after the group exists, it keeps
        # references to it that destroy_process_group cannot drop (torch 2.13: refcount 12 instead of 2), so the
        # group outlives cleanup_distributed; see there why that can abort the process. Imported first, it doesn't.
        importlib.import_module("torch._dynamo")
        if device.type == "cuda":
            tdist.init_process_group(backend="nccl", device_id=device)
        else:
            tdist.init_process_group(backend="gloo")
    return DistInfo(rank, local_rank, world_size, device)


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def cleanup_distributed() -> None:
    """Stop the process group while the interpreter is fully alive.

    A gloo group that lives on into interpreter shutdown can abort the process after the run has finished: one of its
    worker threads frees a finished all-reduce whose tensors Python still owns, needs the GIL to do it, and a thread
    that asks a finalizing interpreter for the GIL is ended mid-unwind ("terminate called without an active
    exception", SIGABRT; seen in CI on a 2-rank run, and under gdb on pt_gloo_runloop). So: collect the garbage
    cycles first (a DistributedDataParallel wrapper in one holds the group), then destroy the group, which joins
    its threads.
    """
    if is_distributed():
        gc.collect()
        tdist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def print0(*args) -> None:
    """Print on rank 0 only (through tqdm, so that an active progress bar is redrawn below the text)."""
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(str(a) for a in args))
        sys.stdout.flush()


def all_reduce_mean(value: torch.Tensor) -> float:
    """The mean of a scalar tensor over ranks, as a Python float (one host sync)."""
    value = value.detach().float().clone()
    if is_distributed():
        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
        value /= tdist.get_world_size()
    return value.item()


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's equally shaped tensor [n, ...], concatenated in rank order: [W * n, ...] (a collective)."""
    if not is_distributed():
        return local
    parts = [torch.empty_like(local) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def all_gather_bytes(data: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Every rank's 1-D uint8 tensor (lengths may differ), on the CPU, in rank order."""
    if not is_distributed():
        return [data.cpu()]
    world = tdist.get_world_size()
    size = torch.tensor([data.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    tdist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data.to(device)
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    tdist.all_gather(gathered, padded)
    return [g[:int(s.item())].cpu() for g, s in zip(gathered, sizes)]


def all_gather_json(value, device: torch.device) -> list:
    """Every rank's JSON-able value, in rank order (sent as JSON bytes through all_gather_bytes: nothing is pickled)."""
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    return [json.loads(bytes(chunk.tolist())) for chunk in all_gather_bytes(data, device)]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def broadcast_text(text: str, device: torch.device) -> str:
    """Rank 0's string on every rank (sent as bytes: nothing is pickled)."""
    if not is_distributed():
        return text
    payload = text.encode()
    size = torch.tensor([len(payload)], device=device)
    tdist.broadcast(size, src=0)
    if int(size.item()) == 0:
        return ""
    if tdist.get_rank() == 0:
        buffer = torch.tensor(list(payload), dtype=torch.uint8, device=device)
    else:
        buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    tdist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist()).decode()


def on_main_rank(work, dist: DistInfo):
    """Run work() on rank 0 while the other ranks wait; return its result on rank 0 (None elsewhere).

    A user error on rank 0 is raised on every rank with the same message, so no rank waits forever for a rank
    that stopped; any other failure stops every rank too (rank 0 keeps its traceback).
    """
    result, error, bug = None, "", None
    if dist.is_main:
        try:
            result = work()
        except USER_ERRORS as e:
            error = str(e)
        except Exception as e:      # a bug: the other ranks stop with a pointer to rank 0's traceback
            error, bug = f"rank 0 failed ({type(e).__name__}: {e}); see its traceback", e
    error = broadcast_text(error, dist.device)
    if bug is not None:
        raise bug
    if error:
        raise DataError(error)
    return result


def mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each metric over ranks, in one all-reduce."""
    if not is_distributed() or not metrics:
        return dict(metrics)
    values = torch.tensor([float(v) for v in metrics.values()], device=device, dtype=torch.float64)
    tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
    values /= tdist.get_world_size()
    return dict(zip(metrics, values.tolist()))


def mean_var_over_ranks(values: torch.Tensor, correction: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance of every rank's values together, as float64 scalars (correction=1: Bessel's, n - 1).

    Two passes in float64: the mean (one all-reduce of sum and count), then the squared deviations from it
    (another). One pass of E[x^2] - mean^2 cancels catastrophically for values far from zero (a variance of 0 at an
    offset of 1000 in float32), and a normalisation must not move when every value shifts.
    """
    x = values.double()                                                          # [n] this rank's values
    stats = torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
    if is_distributed():
        tdist.all_reduce(stats)
    mean, n = stats[0] / stats[1], stats[1]
    squares = ((x - mean) ** 2).sum()
    if is_distributed():
        tdist.all_reduce(squares)
    return mean, squares / (n - correction).clamp(min=1)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (so that all ranks take the same branch)."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=device)
    tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
    return bool(value.item() > 0)


def check_replicas(model: nn.Module, dist: DistInfo) -> int:
    """Raise RuntimeError unless every rank holds exactly the same parameters; return the number of ranks compared.

    Each rank sums every parameter and its square (float64); rank 0 compares all ranks' sums exactly. The RL
    trainers call it at every checkpoint: an update that bypassed DDP (as MiniMind's RL scripts do, calling the
    unwrapped module) makes the ranks drift apart and stops the run here.
    """
    if not is_distributed() or is_sharded(model):        # under FSDP each rank holds other shards: nothing to compare
        return 1
    params = [p.detach().double() for p in unwrap(model).parameters()]
    sums = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params]).flatten().to(dist.device)
    gathered = [torch.zeros_like(sums) for _ in range(dist.world_size)]
    tdist.all_gather(gathered, sums)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise RuntimeError(f"parameters differ between rank 0 and ranks {differing}: an update bypassed DDP")
    return dist.world_size
