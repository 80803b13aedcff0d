"""What a run reports, from rank 0 only: one console line per log step, a progress bar, OUT_DIR/metrics.jsonl and
wandb; FLOPs per token and MFU.

A loss or gradient norm that is not finite stops the run at a log step (TrainingDiverged), unless
--skip_nonfinite_steps tells optim.optimizer_step to skip such updates.
"""

import json
import math
import netrc
import os
import sys
import time
from contextlib import contextmanager
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from minitrain.dataset.files import write_atomic
from minitrain.model.transformer import CausalLM
from minitrain.trainer.configuration import TrainConfig, TrainingDiverged, config_dict
from minitrain.trainer.distributed import DistInfo, print0
from minitrain.trainer.optim import NO_NATIVE_BF16, cpu_has_native_bf16, resolve_dtype

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from NVIDIA's datasheets; the first name contained in the device name wins.
GPU_PEAK_FLOPS = [
    ("GH200", 989e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10", 125e12), ("V100", 125e12), ("T4", 65e12),
]


# A CPU's peak cannot be looked up reliably; MFU on CPU is reported against this assumed 1 TFLOP/s per process, so
# it compares CPU runs on one machine with each other, not with GPUs.
CPU_ASSUMED_PEAK_FLOPS = 1e12


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device, or None for a GPU missing from the table (MFU is then not reported)."""
    if device.type != "cuda":
        return CPU_ASSUMED_PEAK_FLOPS
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)


def flops_per_token(model: CausalLM, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N + 12 * L * n_heads * head_dim * T.

    6N: forward (2N) and backward (4N) multiply-adds of the N parameters used in matrix products, i.e. the active
    parameters minus an untied input embedding (a lookup; a tied one is the output head's matrix). The second term
    is attention's QK^T and AV over T positions (Kaplan et al. 2020; Chowdhery et al. 2022, PaLM appendix B).
    """
    c = model.config
    matmul_params = model.num_parameters(active_only=True)
    if not c.tie_word_embeddings:
        matmul_params -= model.model.embed_tokens.weight.numel()
    return 6 * matmul_params + 12 * c.num_hidden_layers * c.num_attention_heads * c.resolved_head_dim * seq_len


def wandb_logged_in() -> bool:
    """True when wandb has an API key (WANDB_API_KEY, or the netrc entry `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class RunLogger:
    """What a run reports, from rank 0 only.

    tick(tokens, samples) after every optimizer step; log_train(...) at log steps prints one line
        step 120/1000 | loss 3.4567 | lr 1.20e-03 | grad 0.812 | 12,345 tok/s | mfu 1.23% | epoch 0.12 | eta 3m12s
    and appends {"step", "kind": "train", "loss", "lr", "grad_norm", "tokens_per_sec", "samples_per_sec",
    "mfu_percent", "epoch"} to OUT_DIR/metrics.jsonl; wandb gets the same numbers as train/<name>. log_eval writes
    kind "eval" records (eval/<name> in wandb). Throughput is measured over the steps since the previous log line.
    """

    def __init__(self, cfg: TrainConfig, dist: DistInfo, total_steps: int, start_step: int, flops_per_token: float,
                 wandb_run_id: str | None = None):
        self.enabled = dist.is_main
        self.total_steps, self.start_step = total_steps, start_step
        # a non-finite gradient norm is normal under float16's GradScaler (it skips the step) and --skip_nonfinite_steps
        self.stop_on_grad_norm = resolve_dtype(cfg.dtype, dist.device) != torch.float16
        self.skips_nonfinite = cfg.skip_nonfinite_steps > 0
        self.flops_per_token = flops_per_token
        peak = peak_flops(dist.device)
        self.peak_flops = peak * dist.world_size if peak else None
        self.metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.run_start = self.last_time = time.time()
        self.tokens = self.samples = self.steps = 0        # since the last log line
        self.steps_this_run = 0
        self.wandb = None
        self.wandb_run_id = wandb_run_id
        if not self.enabled:
            self.bar = None
            return
        if dist.device.type == "cpu" and resolve_dtype(cfg.dtype, dist.device) == torch.bfloat16 \
                and not cpu_has_native_bf16():
            print0(f"warning: {NO_NATIVE_BF16}, so bf16 autocast is emulated, about 25x slower than --dtype float32")
        if self.peak_flops is None:
            print0(f"MFU not reported: no peak FLOP/s known for {torch.cuda.get_device_name(dist.device)}")
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False,
                        disable=not sys.stderr.isatty())
        if cfg.report_to == "wandb":
            import wandb
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, id=wandb_run_id,
                                    resume="allow" if wandb_run_id else None, dir=cfg.out_dir, mode=mode,
                                    config=config_dict(cfg))
            self.wandb_run_id = self.wandb.id
            print0(f"wandb: run {self.wandb.id} ({mode})")
        self.run_start = self.last_time = time.time()

    def step_label(self, step: int) -> str:
        return f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"

    def tick(self, tokens: int, samples: int) -> None:
        """Count one optimizer step that processed `tokens` tokens in `samples` sequences (all ranks)."""
        self.tokens += tokens
        self.samples += samples
        self.steps += 1
        self.steps_this_run += 1
        if self.bar is not None:
            self.bar.update(1)

    def log_train(self, step: int, loss: float, lr: float, grad_norm: float, epoch: float,
                  show: tuple[str, ...] | None = None, **extra: float) -> None:
        """One console line and one record; `show` names the extra metrics the console line prints (all when None),
        the record and wandb get all of them. A loss or gradient norm that is not finite stops the run
        (TrainingDiverged, on every rank: both are the same on all ranks) unless --skip_nonfinite_steps skips such
        updates."""
        if not self.skips_nonfinite and not math.isfinite(loss):
            raise TrainingDiverged(f"step {step}: the loss is {loss} (gradient norm {grad_norm:.6g})")
        if not self.skips_nonfinite and self.stop_on_grad_norm and not math.isfinite(grad_norm):
            raise TrainingDiverged(f"step {step}: the gradient norm is {grad_norm} (loss {loss:.6g})")
        if not self.enabled:
            return
        now = time.time()
        dt = max(now - self.last_time, 1e-9)
        tokens_per_sec, samples_per_sec = self.tokens / dt, self.samples / dt
        record = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
                  "samples_per_sec": samples_per_sec, "epoch": epoch, **extra}
        line = (f"{self.step_label(step)} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
                f"{tokens_per_sec:,.0f} tok/s")
        if self.peak_flops is not None:
            record["mfu_percent"] = 100 * self.flops_per_token * tokens_per_sec / self.peak_flops
            line += f" | mfu {record['mfu_percent']:.2f}%"
        seconds_per_step = (now - self.run_start) / max(1, self.steps_this_run)
        line += f" | epoch {epoch:.2f} | eta {format_duration(seconds_per_step * (self.total_steps - step))}"
        line += "".join(f" | {k} {v:.4g}" for k, v in extra.items() if show is None or k in show)
        print0(line)
        self.log(step, "train", record)
        self.last_time, self.tokens, self.samples, self.steps = now, 0, 0, 0

    def log_data(self, summary: dict) -> None:
        """Record the realised data mixture: OUT_DIR/data_summary.json, and the wandb run's config under "data"."""
        if not self.enabled:
            return
        write_atomic(os.path.join(os.path.dirname(self.metrics_path), "data_summary.json"),
                     json.dumps(summary, indent=1) + "\n")
        if self.wandb is not None:
            self.wandb.config.update({"data": summary}, allow_val_change=True)

    @contextmanager
    def paused(self):
        """Leave the time spent inside (evaluation, samples, saving) out of the throughput and the ETA."""
        start = time.time()
        try:
            yield
        finally:
            spent = time.time() - start
            self.last_time += spent
            self.run_start += spent

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        print0(f"{self.step_label(step)} | eval " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self.log(step, "eval", metrics)

    def log(self, step: int, kind: str, metrics: dict[str, float]) -> None:
        """Append {"step", "kind", **metrics} to metrics.jsonl and send kind/<name> to wandb."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
