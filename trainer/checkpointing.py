"""Checkpoints and exact resume: OUT_DIR/step_000123/ is a Hugging Face directory with the resume state beside it.

    resume_state.safetensors   optimizer state tensors ("optimizer.<param index>.<name>") and every rank's torch RNG
                               state ("rng.<rank>.torch_cpu", "rng.<rank>.torch_cuda"); a method's own tensors
                               ("method.<name>")
    resume_state.json          optimizer param_groups, step, GradScaler state, python/numpy RNG states per rank,
                               data position, wandb run id, world size, the user's config, a method's own state
    minitrain.json             what trained the weights: method, step, config, data summary
Nothing is pickled. The directory appears whole (temporary directory + rename), then OUT_DIR/latest (a text file
naming it) is replaced atomically, then the oldest step_* directories beyond --keep_checkpoints are removed.
OUT_DIR/final is a symlink to the last checkpoint of a finished run. A kill at any moment leaves `latest` naming a
complete checkpoint. Weights that are not finite are never written (TrainingDiverged), so rotation never removes
the newest finite checkpoint. check_out_dir locks OUT_DIR (RunDirLock) so that two runs never share it.

Exact resume: the weights (fp32 master copy), optimizer moments, step (the learning rate is a pure function of it),
GradScaler, RNG states and data position are restored, so on CPU a resumed run repeats the uninterrupted run's losses
bit for bit. With a different number of ranks the data position (a global sample count inside the epoch) still
continues from the same sample; when batch_size * accumulation_steps * world_size is unchanged each step reads the
same samples as before and losses agree to float summation order, not bit for bit. Ranks that did not exist before
get fresh RNG states (seed + rank); ranks beyond the new world size are dropped, which only matters for dropout.
Under --fsdp the weights and moments are gathered whole on save (trainer/sharding.py), so the files are the ones DDP
writes and either mode resumes the other's checkpoints.
"""

import copy
import fcntl
import json
import os
import random
import re
import shutil
import socket
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
import torch
import torch.nn as nn

from minitrain.dataset.files import write_atomic
from minitrain.model.checkpoint import load_weights, save_checkpoint
from minitrain.model.config import ConfigError
from minitrain.model.lora import adapter_state_dict, has_lora, load_adapter_weights, merge_lora, save_adapter
from minitrain.model.transformer import unwrap
from minitrain.trainer.batches import GlobalBatchSampler
from minitrain.trainer.configuration import TrainConfig, TrainingDiverged, config_dict
from minitrain.trainer import sharding
from minitrain.trainer.distributed import DistInfo, all_gather_bytes, any_rank, barrier, print0
from minitrain.trainer.reporting import RunLogger

STEP_DIR = re.compile(r"^step_(\d+)$")


RESUME_JSON = "resume_state.json"


RESUME_TENSORS = "resume_state.safetensors"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def read_latest(out_dir: str) -> str | None:
    """The checkpoint directory OUT_DIR/latest names, or None when there is none."""
    pointer = os.path.join(out_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(out_dir, name)
    if not STEP_DIR.match(name) or not os.path.isfile(os.path.join(path, RESUME_JSON)):
        raise ConfigError(f"{pointer}: names {name!r}, which is not a complete checkpoint directory")
    return path


class RunDirLock:
    """OUT_DIR/run.lock, held (fcntl.flock, exclusive) by rank 0 for the life of the run, so that a second run on
    the same --out_dir stops at once instead of mixing its checkpoints into this one's. The file names the holder
    (pid and host). The kernel drops the lock when the process ends in any way, kill -9 included, so a lock left by
    a killed run never blocks --resume.
    """

    def __init__(self):
        self.out_dir, self.file = "", None

    def acquire(self, out_dir: str) -> None:
        if self.file is not None:     # a second run in this process (tests): the first one has ended
            self.file.close()
            self.out_dir, self.file = "", None
        path = os.path.join(out_dir, "run.lock")
        try:
            f = open(path, "a+")
        except OSError as e:
            raise ConfigError(f"--out_dir {out_dir}: cannot write in it ({e.strerror})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"--out_dir {out_dir} is in use by another run ({holder}, {path}): wait for it to end "
                              f"or choose another --out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.out_dir, self.file = out_dir, f      # held until the process ends


RUN_DIR_LOCK = RunDirLock()


def check_out_dir(cfg: TrainConfig) -> None:
    """Before anything else: --out_dir can be created and written, rank 0 holds its lock (RunDirLock), --resume
    finds a checkpoint there and a fresh run does not mix its files into an earlier run's."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ConfigError(f"--out_dir {cfg.out_dir}: exists and is not a directory")
    latest = os.path.join(cfg.out_dir, "latest")
    if cfg.resume and not os.path.isfile(latest):
        raise ConfigError(f"--resume: {latest} not found (no checkpoint to continue from in --out_dir {cfg.out_dir})")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out_dir {cfg.out_dir}: cannot create it ({e.strerror}: {e.filename})") from None
    if not os.access(cfg.out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--out_dir {cfg.out_dir}: not writable")
    if int(os.environ.get("RANK", 0)) == 0:
        RUN_DIR_LOCK.acquire(cfg.out_dir)
    else:
        RUN_DIR_LOCK.out_dir = cfg.out_dir      # for TrainingDiverged's message; rank 0 holds the lock
    if not cfg.resume and os.path.isfile(latest):
        raise ConfigError(f"--out_dir {cfg.out_dir} already holds a run ({latest}): pass --resume to continue it, "
                          f"or choose another --out_dir")


def read_latest_quietly(out_dir: str) -> str | None:
    """read_latest, or None where there is no readable pointer (for messages)."""
    try:
        return read_latest(out_dir)
    except (ConfigError, OSError):
        return None


def nonfinite_tensors(tensors) -> list[str]:
    """Names of the (name, tensor) pairs holding a NaN or an infinity (one device sync for all of them)."""
    tensors = [(name, t.to_local() if sharding.is_dtensor(t) else t) for name, t in tensors]     # a shard: its part
    pairs = [(name, t) for name, t in tensors if t.is_floating_point() and t.numel()]
    if not pairs:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in pairs]).cpu().tolist()
    return [name for (name, _), ok in zip(pairs, finite) if not ok]


def check_finite_weights(model: nn.Module, when: str, method_tensors: dict | None = None) -> None:
    """TrainingDiverged when a parameter of the model (or a method tensor, e.g. PPO's critic) is not finite. Under
    FSDP each rank checks its shards and every rank learns whether any rank found one."""
    bad = nonfinite_tensors(list(unwrap(model).named_parameters()) + list((method_tensors or {}).items()))
    if sharding.is_sharded(model) and any_rank(bool(bad), next(unwrap(model).parameters()).device) and not bad:
        bad = ["a shard held by another rank"]
    if bad:
        raise TrainingDiverged(f"{when}: {len(bad)} weight tensors are not finite (NaN or inf), e.g. {bad[0]}")



def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's RNG states: Python's and numpy's as JSON, torch's (CPU, current CUDA device) as tensors."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {"python": [version, list(mt_state), gauss],
                 "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return json_part, tensors


def set_rng_state(json_part: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, mt_state, gauss = json_part["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def gather_rng_states(dist: DistInfo) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Every rank's RNG states (a collective: all ranks call it): JSON parts in rank order and tensors named
    rng.<rank>.<name>. Sent as bytes, so nothing is pickled."""
    json_part, tensors = rng_state()
    encoded = torch.frombuffer(bytearray(json.dumps(json_part).encode()), dtype=torch.uint8)
    json_parts = [json.loads(bytes(t.tolist()).decode()) for t in all_gather_bytes(encoded, dist.device)]
    gathered = {}
    for key in ("torch_cpu", "torch_cuda"):
        if key in tensors:
            for rank, t in enumerate(all_gather_bytes(tensors[key], dist.device)):
                gathered[f"rng.{rank}.{key}"] = t
    return json_parts, gathered


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, keep: bool = True
                            ) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """Split optimizer.state_dict() into tensors (optimizer.<param index>.<name>, copies on the CPU), param_groups
    and non-tensor state. The moments of a sharded model are gathered whole (a collective: under FSDP every rank
    calls it, and only where keep are the tensors kept), so the file is the one DDP writes."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                value = sharding.full_tensor(value.detach())
                if keep:
                    tensors[f"optimizer.{index}.{name}"] = value.to("cpu", copy=True).contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    groups = json.loads(json.dumps(state["param_groups"]))   # tuples (betas) become lists
    return tensors, groups, scalars


def optimizer_state_dict(tensors: dict[str, torch.Tensor], param_groups: list[dict], scalars: dict) -> dict:
    """Rebuild an optimizer state_dict from optimizer_state_tensors' pieces."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in scalars.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in param_groups]
    return {"state": state, "param_groups": groups}


def write_resume_state(directory: str, tensors: dict[str, torch.Tensor], state: dict) -> None:
    save_file(tensors, os.path.join(directory, RESUME_TENSORS), metadata={"format": "minitrain-resume"})
    with open(os.path.join(directory, RESUME_JSON), "w") as f:
        json.dump(state, f, indent=1)


def prune_checkpoints(out_dir: str, keep: int) -> None:
    """Remove step_* directories beyond the newest `keep`, and leftovers of saves that were killed."""
    names = os.listdir(out_dir)
    steps = sorted((int(m.group(1)), n) for n in names if (m := STEP_DIR.match(n)))
    old = [n for _, n in steps[:-keep]] if keep > 0 else []
    old += [n for n in names if re.match(r"^step_\d+\.(tmp|old)-\d+$", n)]
    for name in old:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def save_training_checkpoint(cfg: TrainConfig, dist: DistInfo, step: int, model: nn.Module, tokenizer, optimizer,
                             scaler, sampler: GlobalBatchSampler, logger: RunLogger, method: str,
                             metadata: dict | None = None, final: bool = False, method_state: dict | None = None,
                             method_tensors: dict[str, torch.Tensor] | None = None) -> str:
    """Write OUT_DIR/step_<step>/: the Hugging Face checkpoint plus resume state, atomically; update `latest`.

    A collective (every rank's RNG state is gathered); rank 0 writes. final=True also points OUT_DIR/final at it.
    A method's own state (SPO's tracker, DPO's running statistics) goes into the resume state too: method_state
    (JSON-able) as resume_state.json's "method_state", method_tensors as "method.<name>" tensors; a resumed run reads
    them back from ResumeState.method_state / method_tensors.

    Weights that are not finite are never written (TrainingDiverged on every rank, `latest` left on the last good
    checkpoint), so rotation never removes the newest finite checkpoint.
    """
    sharded, merge = sharding.is_sharded(model), final and cfg.merge and has_lora(model)
    if sharded:       # a method's tensors (PPO's critic, the reward model's score head) are gathered whole too
        method_tensors = {k: sharding.full_tensor(v) for k, v in (method_tensors or {}).items()}
    check_finite_weights(model, f"step {step}", method_tensors)
    rng_json, rng_tensors = gather_rng_states(dist)
    path = os.path.join(cfg.out_dir, step_dir_name(step))
    weights = whole = None               # the model's own state dict, except under FSDP: its shards gathered whole
    if sharded:
        opt_tensors, groups, scalars = optimizer_state_tensors(optimizer, keep=dist.is_main)
        if has_lora(model):
            weights = {k: sharding.full_tensor(v).cpu() for k, v in adapter_state_dict(unwrap(model)).items()}
        else:
            weights = sharding.gathered_state(model, keep=dist.is_main)
        if merge:
            whole = sharding.gathered_state(model, keep=dist.is_main)
    if dist.is_main:
        if weights is None:
            opt_tensors, groups, scalars = optimizer_state_tensors(optimizer)
        state = {"format": 1, "method": method, "step": step, "world_size": dist.world_size,
                 "optimizer_param_groups": groups, "optimizer_scalars": scalars, "scaler": scaler.state_dict(),
                 "rng": rng_json, "data": sampler.state_dict(), "wandb_run_id": logger.wandb_run_id,
                 "config": config_dict(cfg), "torch_version": torch.__version__, "method_state": method_state}
        method_part = {f"method.{k}": v.detach().to("cpu").contiguous() for k, v in (method_tensors or {}).items()}
        extra = {"method": method, "step": step, "samples_seen": sampler.samples_seen, "config": config_dict(cfg),
                 **(metadata or {})}
        write_extra = lambda tmp: write_resume_state(tmp, {**opt_tensors, **rng_tensors, **method_part}, state)
        if has_lora(model):      # the adapters alone, in PEFT's layout; the base stays where --init_from points
            base = os.path.abspath(cfg.init_from) if cfg.init_from else None
            save_adapter(unwrap(model), tokenizer, path, base_model_path=base, extra_json=extra,
                         write_extra=write_extra, state=weights)
        else:
            save_checkpoint(unwrap(model), tokenizer, path, extra_json=extra, write_extra=write_extra, state=weights)
        write_atomic(os.path.join(cfg.out_dir, "latest"), step_dir_name(step) + "\n")
        if final:
            link = os.path.join(cfg.out_dir, "final")
            tmp_link = f"{link}.tmp-{os.getpid()}"
            if os.path.lexists(tmp_link):
                os.remove(tmp_link)
            os.symlink(step_dir_name(step), tmp_link)
            os.replace(tmp_link, link)
        prune_checkpoints(cfg.out_dir, cfg.keep_checkpoints)
        print0(f"saved {path}")
        if merge:
            save_merged(sharding.unsharded_copy(model, whole) if sharded else unwrap(model), tokenizer,
                        os.path.join(cfg.out_dir, "merged"), extra)
    barrier()
    return path


def save_merged(model: nn.Module, tokenizer, path: str, extra: dict) -> None:
    """A full checkpoint of a LoRA model with its adapters merged (W + scale * B @ A), from a copy of the model."""
    merged = merge_lora(copy.deepcopy(model))
    save_checkpoint(merged, tokenizer, path, extra_json={**extra, "merged_lora": True})
    print0(f"saved {path} (adapters merged)")


@dataclass
class ResumeState:
    path: str                          # the checkpoint directory
    step: int                          # optimizer steps completed
    state: dict                        # resume_state.json
    tensors: dict[str, torch.Tensor]   # resume_state.safetensors

    @property
    def method_state(self) -> dict | None:
        return self.state.get("method_state")

    @property
    def method_tensors(self) -> dict[str, torch.Tensor]:
        return {k[len("method."):]: v for k, v in self.tensors.items() if k.startswith("method.")}


def load_resume_state(out_dir: str) -> ResumeState:
    """The state of the checkpoint OUT_DIR/latest names (check_out_dir has made sure there is one)."""
    path = read_latest(out_dir)
    if path is None:
        raise ConfigError(f"--resume: {os.path.join(out_dir, 'latest')} not found")
    try:
        with open(os.path.join(path, RESUME_JSON)) as f:
            state = json.load(f)
        step = state["step"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{os.path.join(path, RESUME_JSON)}: corrupt resume state ({e}); resume from an "
                          f"earlier checkpoint (point {os.path.join(out_dir, 'latest')} at it)") from None
    tensors_path = os.path.join(path, RESUME_TENSORS)
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{tensors_path}: corrupt or unreadable resume state ({e}); resume from an earlier "
                          f"checkpoint (point {os.path.join(out_dir, 'latest')} at it)") from None
    bad = nonfinite_tensors(tensors.items())
    if bad:
        raise ConfigError(f"{tensors_path}: {len(bad)} tensors are not finite (NaN or inf), e.g. {bad[0]}: the run "
                          f"had diverged; resume from an earlier checkpoint")
    return ResumeState(path, step, state, tensors)


def restore_training_state(resume: ResumeState, cfg: TrainConfig, model: nn.Module, optimizer, scaler,
                           sampler: GlobalBatchSampler, dist: DistInfo) -> None:
    """Load weights, optimizer, scaler, data position and this rank's RNG states from a checkpoint.

    Call it on the unwrapped model before wrap_model, after seed_everything(seed + rank). Rank 0 also drops
    metrics.jsonl records and step_* directories newer than the checkpoint (they belong to the interrupted run).
    """
    state = resume.state
    if has_lora(model):
        load_adapter_weights(model, resume.path)
    elif sharding.is_deferred(model):         # --fsdp from --init_from: its shards are read from here instead
        sharding.defer_weights(model, resume.path)
    else:
        load_weights(unwrap(model), resume.path)
    bad = nonfinite_tensors((n, p) for n, p in unwrap(model).named_parameters() if not p.is_meta)
    if bad:
        raise ConfigError(f"{resume.path}: {len(bad)} weight tensors are not finite (NaN or inf), e.g. {bad[0]}: the "
                          f"run had diverged; resume from an earlier checkpoint")
    try:
        sharding.load_optimizer_state(optimizer, optimizer_state_dict(
            resume.tensors, state["optimizer_param_groups"], state["optimizer_scalars"]))
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{resume.path}: optimizer state does not fit this model ({e})") from None
    scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["data"])
    if dist.rank < state["world_size"]:
        set_rng_state(state["rng"][dist.rank],
                      {key.split(".")[-1]: t for key, t in resume.tensors.items()
                       if key.startswith(f"rng.{dist.rank}.")})
    changed = {k: (v, getattr(cfg, k)) for k, v in state["config"].items()
               if k not in ("resume", "config") and hasattr(cfg, k) and getattr(cfg, k) != v}
    print0(f"resumed from {resume.path} at step {resume.step} (epoch {sampler.epoch}, "
           f"{sampler.epoch_samples} samples into it; saved with {state['world_size']} ranks, now {dist.world_size})")
    if changed:
        print0("flags changed since the checkpoint: " + ", ".join(f"{k} {a!r} -> {b!r}"
                                                                  for k, (a, b) in changed.items()))
    if dist.is_main:
        truncate_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), resume.step)
        for name in os.listdir(cfg.out_dir):
            m = STEP_DIR.match(name)
            if m and int(m.group(1)) > resume.step:
                shutil.rmtree(os.path.join(cfg.out_dir, name), ignore_errors=True)
    barrier()


def truncate_metrics(path: str, step: int) -> None:
    """Keep the metrics.jsonl records up to `step` (a killed run may have logged steps after its last checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue   # a line cut short by the kill
    write_atomic(path, "".join(kept))
