"""The training runtime every trainer/train_<method>.py shares, written once.

A training script reads top to bottom as: arguments, data, model, loop, save. What is the same for every method
lives here, in this order:

    errors         USER_ERRORS and fail(): bad input becomes one line on stderr and exit status 2
    config         TrainConfig (the flags every trainer shares, LoRA's included) and parse_config (dataclass ->
                   flags, YAML, model flags)
    distributed    setup_distributed / cleanup_distributed, print0, barrier, all_reduce_mean, mean_over_ranks,
                   on_main_rank (work on rank 0, its errors raised on every rank), seed_everything
    data           prepare_phase_data (the phase's mixture, prepared on rank 0), GlobalBatchSampler (which samples
                   each rank reads, from a global position), load_batch, load_packed_data (token caches)
    model          build_model (from scratch or --init_from, LoRA when --lora_rank > 0), wrap_model (checkpointing,
                   compile, DDP), unwrap, frozen_reference (the reference policy of DPO and RL), check_replicas
    optimisation   param_groups, build_optimizer, cosine_lr, resolve_dtype, autocast_context, make_grad_scaler,
                   sync_gradients (no all-reduce on all but the last micro-step), optimizer_step (clip + step)
    metrics        flops_per_token, peak_flops, RunLogger (console line, progress bar, wandb, OUT_DIR/metrics.jsonl)
    eval           evaluate_loss (validation split), evaluate_tasks_hook (--eval_tasks), print_samples
    sequences      gather_logprobs (per-token log-probs through the fused kernel), reference_logprobs, rollout and
                   pack_sequences (sampled completions laid out with masks), and the pieces of the RL objectives
                   several trainers share: clipped_surrogate (PPO-clip), k3_kl, masked_mean, linear_schedule
    checkpoints    check_out_dir (usable, locked by RunDirLock), save_training_checkpoint (with a method's own
                   state; never non-finite weights), load_resume_state, restore_training_state (full weights, or
                   LoRA adapters; corrupt or non-finite states refused)

Non-finite numbers: RunLogger.log_train stops the run (TrainingDiverged, one line) on a loss or gradient norm that is
not finite, values it reads at log steps anyway; save_training_checkpoint never writes non-finite weights, so
`latest` and rotation keep the newest finite checkpoint; --skip_nonfinite_steps makes optimizer_step skip such
updates instead, a bounded number of times.

Checkpoints: OUT_DIR/step_000123/ is a Hugging Face directory (model.checkpoint.save_checkpoint) with the resume
state beside the weights, never pickled:
    resume_state.safetensors   optimizer state tensors ("optimizer.<param index>.<name>") and every rank's torch
                               RNG state ("rng.<rank>.torch_cpu", "rng.<rank>.torch_cuda")
    resume_state.json          optimizer param_groups, step, GradScaler state, python/numpy RNG states per rank,
                               data position, wandb run id, world size, the user's config
    minitrain.json             what trained the weights: method, step, config, data summary
The directory appears whole (temporary directory + rename), then OUT_DIR/latest (a text file naming it) is replaced
with os.replace, then the oldest step_* directories beyond --keep_checkpoints are removed. OUT_DIR/final is a
symlink to the last checkpoint of a finished run. A kill at any moment leaves `latest` naming a complete checkpoint.

Exact resume: the weights (fp32 master copy), optimizer moments, step (the learning rate is a pure function of it),
GradScaler, RNG states and data position are restored, so on CPU a resumed run repeats the uninterrupted run's losses
bit for bit. With a different number of ranks the data position (a global sample count inside the epoch) still
continues from the same sample; when batch_size * accumulation_steps * world_size is unchanged each step reads the
same samples as before and losses agree to float summation order (gradients are summed over ranks in another order),
not bit for bit. Ranks that did not exist before get fresh RNG states (seed + rank); ranks beyond the new world size
are dropped, which only matters for dropout.
"""

import argparse
import dataclasses
import fcntl
import gc
import importlib
import json
import math
import netrc
import os
import random
import re
import shutil
import socket
import sys
import time
import types
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import NoReturn
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from minitrain.dataset.jsonl import DataError
from minitrain.model.checkpoint import check_model_dir, load_tokenizer, load_weights, save_checkpoint
from minitrain.model.config import REPO_ROOT, ConfigError, ModelConfig, load_model_config
from minitrain.model.tokenizer import Tokenizer, TokenizerError
from minitrain.model.transformer import CausalLM

DEFAULT_TOKENIZER_DIR = os.path.join(REPO_ROOT, "dataset", "tokenizer")
CONFIG_DIR = os.path.join(REPO_ROOT, "config", "train")

# =============================================================================================================
# Errors
# =============================================================================================================


class TrainingDiverged(Exception):
    """The loss or the weights stopped being finite numbers: the run stops before it saves or uses them. The
    message names what went wrong and the last good checkpoint of the run directory."""

    def __init__(self, problem: str):
        good = read_latest_quietly(RUN_DIR_LOCK.out_dir) if RUN_DIR_LOCK.out_dir else None
        super().__init__(f"{problem}: the run stopped and saved none of it; the last good checkpoint is "
                         f"{good or 'none (nothing was saved yet)'}: lower --learning_rate (or raise --warmup_steps) "
                         f"and {'--resume from it' if good else 'start again'}")


# Bad input the user can fix (and a run that diverged). Each script's main catches these and calls fail(); anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, TokenizerError, TrainingDiverged)


def fail(message: str) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


class FlagError(ConfigError):
    """A flag whose value is out of range; parse_config adds where the value came from."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"--{name} {problem}")


# =============================================================================================================
# Config: one dataclass per method, every field a flag and a YAML key
# =============================================================================================================

@dataclass
class TrainConfig:
    """Flags every trainer shares. A method subclasses this and adds its own fields."""

    # ---- config file ----
    config: str = field(default="", metadata={"help": "YAML file of flag values; flags given on the command line "
                                                      "override it, it overrides the method's defaults"})
    # ---- model ----
    model_config: str = field(default="tiny", metadata={"help": "model preset (config/model/<name>.yaml) or a YAML "
                                                                "file; every ModelConfig field is also a flag "
                                                                "(--hidden_size 768)"})
    init_from: str = field(default="", metadata={"help": "start from this checkpoint directory (ours or a local "
                                                         "Hugging Face llama/qwen2/qwen3 one), not random weights"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer directory or tokenizer.json; empty = the "
                                                         "--init_from directory's, else the shipped dataset/tokenizer"})
    model_overrides: dict = field(default_factory=dict, metadata={
        "help": "ModelConfig fields changed from the preset; filled from ModelConfig fields given as flags or keys"})
    # ---- data ----
    data_config: str = field(default="", metadata={"help": "data mixture YAML (config/data/<phase>/...); empty = the "
                                                           "method's default mixture"})
    data_path: str = field(default="", metadata={"help": "one JSON/JSONL file to train on instead of a mixture"})
    use_prepared: bool = field(default=False, metadata={"help": "reuse the train/validation files an earlier run "
                                                                "prepared in --prepared_dir"})
    prepared_dir: str = field(default="data/prepared", metadata={"help": "where the prepared train/validation JSONL "
                                                                         "files and token caches are written"})
    max_seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    # ---- output ----
    out_dir: str = field(default="out/run", metadata={"help": "checkpoints, metrics.jsonl and wandb files go here"})
    # ---- length and batch ----
    max_steps: int = field(default=0, metadata={"help": "optimizer steps to run; 0 = --epochs passes over the data"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data when --max_steps is 0"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch on each rank"})
    accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step; global batch = "
                                                                 "batch_size * accumulation_steps * ranks"})
    # ---- optimiser ----
    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warmup from 0 to --learning_rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine schedule ends at learning_rate * this"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices (not on norms, biases, "
                                                               "embeddings)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this; 0 = no clipping"})
    skip_nonfinite_steps: int = field(default=0, metadata={
        "help": "skip an update whose gradient norm is NaN or inf, at most this many times in a run (a device sync "
                "per step); 0 = a non-finite loss or gradient norm stops the run"})
    # ---- LoRA (any trainer; off when lora_rank is 0) ----
    lora_rank: int = field(default=0, metadata={"help": "rank of LoRA adapters on the frozen model; 0 = train every "
                                                        "weight (no LoRA)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale numerator: updates are scaled by "
                                                              "alpha / rank (alpha / sqrt(rank) with --use_rslora)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    lora_targets: str = field(default="all-linear", metadata={
        "help": "layers that get adapters: all-linear, or names such as q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                "down_proj"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised LoRA scale alpha / sqrt(rank)"})
    merge: bool = field(default=False, metadata={"help": "with LoRA: at the end also write OUT_DIR/merged, a full "
                                                         "checkpoint with the adapters merged into the weights"})
    # ---- runtime ----
    device: str = field(default="auto", metadata={"help": "auto (cuda when available, else cpu), cpu, cuda"})
    dtype: str = field(default="auto", metadata={
        "help": "autocast dtype: auto (bfloat16 on CUDA if supported, else float16; float32 on CPU), float32, "
                "bfloat16, float16", "choices": ["auto", "float32", "bfloat16", "float16"]})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass"})
    seed: int = field(default=42, metadata={"help": "seed of weights, data order and sampling (rank r uses seed + r "
                                                    "for its own randomness)"})
    # ---- logging, eval, checkpoints ----
    log_interval: int = field(default=10, metadata={"help": "steps between console lines / metrics records"})
    eval_interval: int = field(default=100, metadata={"help": "steps between evaluations (also at the start and the "
                                                              "end); 0 = only at the end"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation (all ranks together)"})
    eval_tasks: str = field(default="", metadata={"help": "comma-separated tasks evaluated at each evaluation, e.g. "
                                                          "arithmetic,sat (eval/tasks)"})
    eval_task_samples: int = field(default=50, metadata={"help": "problems per task in each task evaluation"})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "longest answer generated in a task evaluation"})
    save_interval: int = field(default=0, metadata={"help": "steps between checkpoints (one is always saved at the "
                                                            "end); 0 = only at the end"})
    keep_checkpoints: int = field(default=3, metadata={"help": "keep the newest K step_* checkpoints; 0 = keep all"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out_dir from its latest checkpoint"})
    report_to: str = field(default="wandb", metadata={"help": "wandb (offline unless logged in) or none",
                                                      "choices": ["wandb", "none"]})
    wandb_project: str = field(default="minitrain", metadata={"help": "wandb project"})
    wandb_run_name: str = field(default="", metadata={"help": "wandb run name; empty = wandb's own"})

    def validate(self) -> None:
        """Range checks of the shared flags; a method's config extends this with its own."""
        at_least = {"max_seq_len": 2, "epochs": 1, "batch_size": 1, "accumulation_steps": 1, "log_interval": 1,
                    "eval_batches": 1, "eval_task_samples": 1, "eval_max_new_tokens": 1, "max_steps": 0, "warmup_steps": 0, "eval_interval": 0,
                    "save_interval": 0, "keep_checkpoints": 0, "skip_nonfinite_steps": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise FlagError(name, f"must be at least {low}, got {getattr(self, name)}")
        for name in ("learning_rate",):
            if not 0 < getattr(self, name) < math.inf:
                raise FlagError(name, f"must be a positive finite number, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:
                raise FlagError(name, f"must be a finite number at least 0, got {getattr(self, name)}")
        for name in ("min_lr_ratio",):
            if not 0 <= getattr(self, name) <= 1:
                raise FlagError(name, f"must be in [0, 1], got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise FlagError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise FlagError("lora_rank", f"must be at least 0, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise FlagError("lora_alpha", f"must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise FlagError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.lora_rank:
            from minitrain.model.lora import parse_targets
            try:
                parse_targets(self.lora_targets)
            except ConfigError as e:
                raise FlagError("lora_targets", str(e).split(": ", 2)[-1]) from None
        if self.eval_tasks:
            from minitrain.eval.task_eval import parse_task_names
            try:
                parse_task_names(self.eval_tasks)
            except ValueError as e:
                raise FlagError("eval_tasks", str(e)) from None
        if self.data_config and self.data_path:
            raise FlagError("data_path", "and --data_config are alternatives: give one")


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors printed as `error: ...` on one line (exit status 2, like every bad input)."""

    def error(self, message: str) -> NoReturn:
        fail(f"command line: {message}")


def parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_yaml_value(text: str):
    """Flags holding a mapping (e.g. --rope_scaling) take inline YAML: '{rope_type: yarn, factor: 4}'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"not valid inline YAML: {text!r}") from None


def split_optional(tp) -> tuple[type, bool]:
    """(int | None) -> (int, True); int -> (int, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def coerce(value, tp, where: str):
    """Check a YAML value against a field type (ints pass as floats, so do '1e-3' strings); errors name `where`."""
    base, optional = split_optional(tp)
    base = typing.get_origin(base) or base
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must be {base.__name__}, got null")
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        if isinstance(value, str):   # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, base)
    if not ok:
        raise ConfigError(f"{where} must be {base.__name__}, got {value!r}")
    return value


def flag_type(tp):
    """The argparse `type` callable of a field type."""
    base, optional = split_optional(tp)
    base = typing.get_origin(base) or base
    convert = {bool: parse_bool, int: int, float: float, str: str}.get(base, parse_yaml_value)
    if not optional:
        return convert

    def convert_optional(text):
        return None if text.lower() in ("none", "null") else convert(text)
    convert_optional.__name__ = convert.__name__
    return convert_optional


def config_field_types(config_cls) -> dict[str, tuple[type, dataclasses.Field]]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(config_cls)}


def yaml_key_lines(text: str) -> dict[str, int]:
    """Line number of each top-level key of a YAML mapping (for error messages)."""
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value}


def read_config_yaml(path: str, fields: dict, model_fields: dict) -> dict[str, tuple[object, str]]:
    """{key: (value, where)} from a YAML file of flag values, each key and type checked."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path) as f:
        text = f.read()
    try:
        data = yaml.safe_load(text) or {}
        lines = yaml_key_lines(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: {line}not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of flag names to values")
    values = {}
    for key, value in data.items():
        where = f"{path}: line {lines.get(str(key), '?')}: key '{key}'"
        if key in ("config", "model_overrides"):
            raise ConfigError(f"{where} cannot be set in a config file")
        if key in fields:
            tp, f = fields[key]
        elif key in model_fields:
            tp, f = model_fields[key]
        else:
            raise ConfigError(f"{where} is unknown (neither a flag of this trainer nor a ModelConfig field)")
        value = coerce(value, tp, where)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        values[key] = (value, where)
    return values


def parse_config(config_cls, argv: list[str] | None = None, defaults_yaml: str | None = None):
    """Build `config_cls` (a TrainConfig subclass) from its defaults, the method's YAML, --config YAML and flags.

    Precedence, lowest first: the dataclass defaults, `defaults_yaml` (config/train/<method>.yaml), the file given by
    --config, the command line. Every field is a flag (--batch_size 8; booleans as --compile or --compile false);
    every ModelConfig field is a flag too (--hidden_size 768), collected into cfg.model_overrides. Bad input ends
    the program with a one-line error (exit status 2) naming the file, line and key, or the flag.
    """
    fields = {name: entry for name, entry in config_field_types(config_cls).items() if name != "model_overrides"}
    model_fields = config_field_types(ModelConfig)
    clash = set(fields) & set(model_fields)
    if clash:
        raise TypeError(f"{config_cls.__name__} fields {sorted(clash)} clash with ModelConfig fields")

    try:   # the method's defaults first: --help shows them
        method_defaults = read_config_yaml(defaults_yaml, fields, model_fields) if defaults_yaml else {}
    except ConfigError as e:
        fail(str(e))

    parser = OneLineParser(description=(config_cls.__doc__ or "").strip(), argument_default=argparse.SUPPRESS)
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    groups = {"shared": parser.add_argument_group("flags every trainer shares"),
              "method": parser.add_argument_group(f"{config_cls.__name__} flags"),
              "model": parser.add_argument_group("model fields (override --model_config / --init_from)")}
    for table in (fields, model_fields):
        for name, (tp, f) in table.items():
            if name in method_defaults:
                default = method_defaults[name][0]
            elif table is model_fields:
                default = "from the model preset or checkpoint"
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            base = split_optional(tp)[0]
            kwargs = dict(type=flag_type(tp), help=f"{f.metadata.get('help', '')} [default: {default}]",
                          metavar=getattr(typing.get_origin(base) or base, "__name__", "value").upper())
            if base is bool:
                kwargs.update(nargs="?", const=True)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            group = "model" if table is model_fields else "shared" if name in shared else "method"
            groups[group].add_argument(f"--{name}", **kwargs)
    given = vars(parser.parse_args(argv))

    values = dict(method_defaults)   # key -> (value, where it was set)
    if given.get("config"):
        try:
            values.update(read_config_yaml(given["config"], fields, model_fields))
        except ConfigError as e:
            fail(str(e))
    values.update({key: (value, f"command line: --{key}") for key, value in given.items()})

    train_values = {k: v for k, (v, _) in values.items() if k in fields}
    overrides = {k: v for k, (v, _) in values.items() if k in model_fields}
    cfg = config_cls(**train_values, model_overrides=overrides)
    try:
        cfg.validate()
    except FlagError as e:
        fail(f"{values[e.name][1]} {e.problem}" if e.name in values else str(e))
    except ConfigError as e:
        fail(str(e))
    return cfg


def config_dict(cfg) -> dict:
    """The config as plain JSON-able data (for checkpoints and wandb)."""
    return dataclasses.asdict(cfg)


# =============================================================================================================
# Distributed: torchrun's environment, ranks, collectives, seeds
# =============================================================================================================

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


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# =============================================================================================================
# Data: a global data position that any number of ranks can continue from
# =============================================================================================================

class GlobalBatchSampler:
    """Which samples each rank reads at each micro-step, derived from a global position in the data.

    Epoch e reads a fixed permutation of the dataset (seeded by `seed` and e). An optimizer step consumes the next
    global batch of G = batch_size * accumulation_steps * world_size samples of that permutation; micro-step m of
    rank r reads positions [(m * world_size + r) * batch_size, ... + batch_size) of it. So W ranks with A
    accumulation steps form every step from exactly the samples 1 rank with W * A accumulation steps would. A
    global batch that does not fit in what remains of an epoch is skipped (drop last).

    The position is (epoch, samples of that epoch consumed by all ranks together): a checkpoint written with one
    world size resumes with another at the same sample.
    """

    def __init__(self, num_samples: int, batch_size: int, accumulation_steps: int, world_size: int, rank: int,
                 seed: int, shuffle: bool = True):
        self.num_samples, self.batch_size, self.accumulation_steps = num_samples, batch_size, accumulation_steps
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.global_batch = batch_size * accumulation_steps * world_size
        if num_samples < self.global_batch:
            raise DataError(f"the training data holds {num_samples} samples, fewer than one global batch of "
                            f"{self.global_batch} (batch_size {batch_size} x accumulation_steps {accumulation_steps} "
                            f"x {world_size} ranks)")
        self.epoch = 0
        self.epoch_samples = 0     # samples of the current epoch consumed by all ranks together
        self.samples_seen = 0      # samples consumed since the start of training, all epochs
        self._order = (None, None)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def epoch_progress(self) -> float:
        """Epochs completed, fractional (for the train/epoch metric)."""
        return self.epoch + self.epoch_samples / self.num_samples

    def order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # one stream per (seed, epoch)
                self._order = (epoch, torch.randperm(self.num_samples, generator=generator).tolist())
            else:
                self._order = (epoch, list(range(self.num_samples)))
        return self._order[1]

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for the next optimizer step; advances the position."""
        if self.epoch_samples + self.global_batch > self.num_samples:
            self.epoch, self.epoch_samples = self.epoch + 1, 0
        order, start, B, W = self.order(self.epoch), self.epoch_samples, self.batch_size, self.world_size
        micro_batches = [order[start + (m * W + self.rank) * B: start + (m * W + self.rank + 1) * B]
                         for m in range(self.accumulation_steps)]
        self.epoch_samples += self.global_batch
        self.samples_seen += self.global_batch
        return micro_batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "epoch_samples": self.epoch_samples, "samples_seen": self.samples_seen,
                "num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ConfigError(f"--resume: the checkpoint's data ({state['num_samples']} samples, seed {state['seed']}) "
                              f"differs from this run's ({self.num_samples} samples, seed {self.seed}); resume with "
                              f"the same data and --seed")
        self.epoch, self.epoch_samples = state["epoch"], state["epoch_samples"]
        self.samples_seen = state["samples_seen"]


def collate_samples(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equally shaped samples: [{"input_ids": [T], ...}] -> {"input_ids": [B, T], ...}."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def load_batch(dataset, indices: list[int], device: torch.device, collate=collate_samples) -> dict[str, torch.Tensor]:
    """Read `indices` from a map-style dataset, collate them and move the batch to `device`."""
    batch = collate([dataset[i] for i in indices])
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


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


def prepare_phase_data(phase: str, cfg: TrainConfig, tokenizer, dist: DistInfo):
    """The PreparedData (train/validation JSONL files) of a run: --data_path, --data_config or the phase's default
    mixture, prepared by rank 0 (or read back with --use_prepared) and then opened by every rank."""
    from minitrain.dataset.mixer import load_prepared, prepare_mixture, resolve_mixture
    mixture = resolve_mixture(phase, cfg.data_config or None, cfg.data_path or None, cfg.seed)
    if not cfg.use_prepared:
        on_main_rank(lambda: prepare_mixture(mixture, cfg.prepared_dir, tokenizer), dist)
    return load_prepared(mixture, cfg.prepared_dir)


def load_packed_data(prepared, tokenizer, seq_len: int, dist: DistInfo):
    """Packed next-token datasets (train, validation) of a PreparedData's JSONL files.

    Rank 0 tokenizes each file into its memory-mapped token cache first; the other ranks then open the same cache.
    """
    from minitrain.dataset.pretokenize import PackedTokenDataset, build_token_cache
    datasets = []
    for path in (prepared.train_file, prepared.val_file):
        if not path:
            datasets.append(None)
            continue
        on_main_rank(lambda: build_token_cache(path, tokenizer), dist)
        datasets.append(PackedTokenDataset(build_token_cache(path, tokenizer), seq_len))
    train_set, val_set = datasets
    if len(train_set) == 0:
        raise DataError(f"{prepared.train_file}: too few tokens for one sequence of {seq_len}")
    if val_set is not None and len(val_set) == 0:
        print0(f"validation: {prepared.val_file} holds fewer than {seq_len} tokens; no validation loss")
        val_set = None
    return train_set, val_set


# =============================================================================================================
# Model: build from scratch or from a checkpoint, then wrap for training
# =============================================================================================================

def build_model(cfg: TrainConfig, device: torch.device) -> tuple[CausalLM, Tokenizer]:
    """The model and tokenizer a run starts from, fp32 on `device`.

    --init_from DIR: the directory's config.json (plus model flags, e.g. a longer max_position_embeddings) and its
    weights; else --model_config with random weights. The tokenizer: --tokenizer, else the --init_from directory's,
    else the shipped one. A missing directory or a misfit is a ConfigError / TokenizerError (one-line error, exit 2).
    """
    if cfg.init_from:
        check_model_dir(cfg.init_from)
        config = load_model_config(cfg.init_from, cfg.model_overrides)
    else:
        config = load_model_config(cfg.model_config, cfg.model_overrides)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.init_from or DEFAULT_TOKENIZER_DIR)
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"{tokenizer.path}: vocabulary of {tokenizer.vocab_size} tokens does not fit the model "
                             f"(vocab_size {config.vocab_size})")
    model = CausalLM(config)
    if cfg.init_from:
        load_weights(model, cfg.init_from)
    check_eval_tasks(cfg, model, tokenizer)
    if cfg.lora_rank:
        from minitrain.model.lora import LoRAConfig, apply_lora, count_trainable
        apply_lora(model, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                     targets=cfg.lora_targets, use_rslora=cfg.use_rslora))
        trainable, total = count_trainable(model)
        print0(f"LoRA: rank {cfg.lora_rank} on {', '.join(model.lora_config.targets)}: {trainable:,} trainable of "
               f"{total:,} parameters ({100 * trainable / total:.2f}%)")
    return model.to(device), tokenizer


def has_lora(model: nn.Module) -> bool:
    return getattr(unwrap(model), "lora_config", None) is not None


def wrap_model(model: nn.Module, cfg: TrainConfig, dist: DistInfo) -> nn.Module:
    """The module the training loop calls: gradient checkpointing, torch.compile, then DistributedDataParallel."""
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.compile:
        model = torch.compile(model)
    if dist.world_size > 1:
        # an MoE expert that no token of a micro-batch was routed to gets no gradient: DDP must look for those
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            find_unused_parameters=bool(unwrap(model).config.num_experts))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# =============================================================================================================
# Optimisation: AdamW groups, learning-rate schedule, mixed precision, accumulation, clipping
# =============================================================================================================

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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(flag: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: auto = bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."""
    if flag == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[flag]


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Mixed precision for forward passes; the weights stay float32 (the master copy the optimizer updates)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for float16 (whose small range underflows gradients); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def sync_gradients(model: nn.Module, last_micro_step: bool):
    """DDP all-reduces gradients in every backward; skip that on all but the last micro-step of a step.

    Wrap the forward and the backward of a micro-step in it.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last_micro_step:
        return model.no_sync()
    return nullcontext()


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


# =============================================================================================================
# Metrics: FLOPs, MFU, the console line, progress bar, wandb and metrics.jsonl
# =============================================================================================================

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
        write_text_atomic(os.path.join(os.path.dirname(self.metrics_path), "data_summary.json"),
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


# =============================================================================================================
# Eval: validation loss, task accuracy
# =============================================================================================================

@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset, batch_size: int, num_batches: int, dist: DistInfo, amp,
                  collate=collate_samples) -> float:
    """Mean loss of the first `num_batches` batches of the validation set (in order; ranks share the batches).

    Batch b goes to rank b % world_size and the sums are all-reduced, so the value does not depend on the number of
    ranks. An MoE model's load-balancing term is taken out: this is the language-model loss alone.
    """
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    starts = list(range(0, min(len(dataset), num_batches * batch_size), batch_size))
    totals = torch.zeros(2, device=dist.device)                   # [sum of batch losses, batches]
    for b in range(dist.rank, len(starts), dist.world_size):
        indices = list(range(starts[b], min(starts[b] + batch_size, len(dataset))))
        with amp:
            out = raw(**load_batch(dataset, indices, dist.device, collate))
        loss = out.loss if out.aux_loss is None else out.loss - raw.config.router_aux_loss_coef * out.aux_loss
        totals += torch.stack([loss.float(), torch.ones((), device=dist.device)])
    if is_distributed():
        tdist.all_reduce(totals, op=tdist.ReduceOp.SUM)
    raw.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item() if totals[1] > 0 else float("nan")


def check_eval_tasks(cfg: TrainConfig, model: nn.Module, tokenizer) -> None:
    """Before training: --eval_tasks can draw its problems and their prompts fit the model (else a ConfigError)."""
    if not cfg.eval_tasks:
        return
    from minitrain.eval.task_eval import parse_task_names, prepare_task_prompts
    try:
        prepare_task_prompts(tokenizer, parse_task_names(cfg.eval_tasks), cfg.eval_task_samples,
                             cfg.eval_max_new_tokens, unwrap(model).config.max_position_embeddings)
    except ValueError as e:     # PromptTooLong, a problem space smaller than --eval_task_samples, ...
        raise ConfigError(f"--eval_tasks {cfg.eval_tasks}: {e}") from None


def evaluate_tasks_hook(model: nn.Module, tokenizer, cfg: TrainConfig, dist: DistInfo, amp) -> dict[str, float]:
    """--eval_tasks: accuracy of each task on --eval_task_samples held-out problems, {"<task>/accuracy": x}.

    Runs on rank 0 (generation does not need the other ranks), which the others wait for.
    """
    if not cfg.eval_tasks:
        return {}
    from minitrain.eval.task_eval import evaluate_tasks, parse_task_names   # imported only by runs that ask for it
    names = parse_task_names(cfg.eval_tasks)
    metrics = {}
    if dist.is_main:
        raw = unwrap(model)
        was_training = raw.training
        raw.eval()
        with amp:
            results = evaluate_tasks(raw, tokenizer, names, cfg.eval_task_samples,
                                     max_new_tokens=cfg.eval_max_new_tokens)
        raw.train(was_training)
        metrics = {f"{name}/accuracy": float(results[name]["accuracy"]) for name in names}
    barrier()
    return metrics


@torch.no_grad()
def print_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, amp,
                  chat: bool) -> None:
    """Complete each prompt (rank 0 only; temperature 0.7, top-k 40) and print it. With chat, each prompt is a user
    turn in the chat template and the answer stops at <|im_end|>. A generator of its own leaves training's RNG be."""
    from minitrain.model.generate import generate
    raw = unwrap(model)
    check_finite_weights(raw, "before printing samples")
    was_training = raw.training
    raw.eval()
    device = next(raw.parameters()).device
    if chat:
        ids = [tokenizer.chat_prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [tokenizer.encode(p) for p in prompts]
    with amp:
        out = generate(raw, ids, max_new_tokens, temperature=0.7, top_k=40, eos_token_id=[tokenizer.pad_id,
                       tokenizer.eos_id], pad_token_id=tokenizer.pad_id,
                       generator=torch.Generator(device).manual_seed(seed))
    raw.train(was_training)
    for prompt, completion in zip(prompts, out.completions):
        print0(f"  sample: {prompt!r} -> {tokenizer.decode(completion)!r}")


# =============================================================================================================
# Sequences: per-token log-probabilities, and rollouts (sampled completions) for the RL trainers
# =============================================================================================================

def gather_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    temperature: float = 1.0, with_entropy: bool = False):
    """log p(input_ids[:, t + 1] | input_ids[:, :t + 1]) for t = 0 .. T-2: [B, T-1] (and the entropy, [B, T-1]).

    The model returns its hidden states only; the fused kernel applies lm_head.weight chunk by chunk (temperature
    divides the logits), so no [B, T, V] tensor is held. Call it on the wrapped model (DDP, compile): the forward
    pass goes through the wrapper, so gradients are all-reduced.
    """
    from minitrain.kernels import fused_linear_logprobs
    out = model(input_ids, attention_mask=attention_mask, compute_logits=False)
    hidden = out.hidden_states[:, :-1]                                          # [B, T-1, H]
    B, T1, H = hidden.shape
    result = fused_linear_logprobs(hidden.reshape(B * T1, H), unwrap(model).lm_head.weight,
                                   input_ids[:, 1:].reshape(B * T1), temperature=temperature,
                                   return_entropy=with_entropy)
    if with_entropy:
        logp, entropy = result
        return logp.view(B, T1), entropy.view(B, T1)
    return result.view(B, T1)


@dataclass
class Rollout:
    """Prompts with their sampled completions, laid out for one forward pass.

    Row b is [left padding | prompt | completion | right padding], the completion starting at column P for every
    row. completion_mask[b, t] = 1 where input_ids[b, t + 1] is a completion token (the EOS included): it lines up
    with gather_logprobs' output.
    """
    input_ids: torch.Tensor         # [B, P + C]
    attention_mask: torch.Tensor    # [B, P + C], 1 = real token
    completion_mask: torch.Tensor   # [B, P + C - 1] float
    completions: list[list[int]]    # each row's new tokens
    finished: torch.Tensor          # [B] bool: the row stopped at EOS (False: it ran out of max_new_tokens)
    prompt_length: int              # P

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)                                     # [B]


def pack_sequences(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Lay out prompts (left-padded to P) followed by their completions (right-padded), for one forward pass.

    Returns input_ids [B, P + C], attention_mask [B, P + C] (1 = real token), completion_mask [B, P + C - 1]
    (1 where input_ids[:, t + 1] is a completion token, lined up with gather_logprobs) and P.
    """
    B, P = len(prompts), max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    input_ids = torch.full((B, P + C), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P + C, dtype=torch.long)
    completion_mask = torch.zeros(B, P + C - 1)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[b, P - len(prompt):P] = torch.tensor(prompt)
        input_ids[b, P:P + len(completion)] = torch.tensor(completion, dtype=torch.long)
        attention_mask[b, P - len(prompt):P + len(completion)] = 1
        completion_mask[b, P - 1:P - 1 + len(completion)] = 1
    return input_ids.to(device), attention_mask.to(device), completion_mask.to(device), P


@torch.no_grad()
def rollout(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature, eos_token_id,
            pad_token_id: int, generator: torch.Generator | None = None, top_k: int = 0, top_p: float = 1.0,
            min_p: float = 0.0) -> Rollout:
    """Sample one completion per prompt (batched, KV cache, the fused sampler; rows stop at EOS on their own)."""
    from minitrain.model.generate import generate
    raw = unwrap(model)
    was_training = raw.training
    out = generate(raw, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator)
    raw.train(was_training)
    device = next(raw.parameters()).device
    input_ids, attention_mask, completion_mask, P = pack_sequences(prompts, out.completions, pad_token_id, device)
    return Rollout(input_ids, attention_mask, completion_mask, out.completions,
                   torch.tensor(out.finished, device=device), P)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi: exp(ref - logp) - (ref - logp) - 1 >= 0.

    Unbiased, low variance ("k3", Schulman 2020, http://joschu.net/blog/kl-approx.html); GRPO's KL term
    (Shao et al. 2024, arXiv 2402.03300). Where mask is 0 the gap is set to 0 BEFORE the exp (the term is then 0
    there, and so is its gradient): a gap above ~88 nats at a prompt or padding column would otherwise give
    exp = inf, and inf * 0 = NaN in the masked loss and its gradient.
    """
    delta = ref_logp - logp
    if mask is not None:
        delta = torch.where(mask.bool(), delta, 0.0)
    return torch.exp(delta) - delta - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                      epsilon_high: float, mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, as a loss (Schulman et al. 2017, arXiv 1707.06347), with DAPO's separate
    upper bound (Yu et al. 2025, arXiv 2503.14476):

        ratio = exp(logp - old_logp)
        loss  = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)

    Returns (loss [B, T], low_clipped [B, T], high_clipped [B, T]): where the clip bound is active, i.e. the ratio
    fell below 1 - epsilon_low with A < 0, or rose above 1 + epsilon_high with A > 0 (TRL's clip_ratio metrics).
    Where mask is 0 the log-ratio is set to 0 before the exp (ratio 1, no clip, no gradient), as in k3_kl.
    """
    log_ratio = logp - old_logp if mask is None else torch.where(mask.bool(), logp - old_logp, 0.0)   # [B, T]
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return loss, low, high


def step_token_count(masks: list[torch.Tensor], device: torch.device) -> float:
    """The target tokens of one whole optimizer step: the masks of every micro-batch of this rank, summed over all
    ranks (one all-reduce). A micro-batch's summed loss divided by it, times the number of ranks (DDP averages the
    ranks' gradients), gives the token mean over the global batch: DAPO's token-level loss and TRL's GKD."""
    total = torch.zeros(1, device=device, dtype=torch.float64)
    for m in masks:                       # summed on the device: one host sync in all, at .item()
        total += m.sum()
    if is_distributed():
        tdist.all_reduce(total)
    return total.item()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each metric over ranks, in one all-reduce."""
    if not is_distributed() or not metrics:
        return dict(metrics)
    values = torch.tensor([float(v) for v in metrics.values()], device=device, dtype=torch.float64)
    tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
    values /= tdist.get_world_size()
    return dict(zip(metrics, values.tolist()))


def check_same_tokenizer(path: str, tokenizer, flag: str) -> None:
    """A model that reads the policy's token ids must share its vocabulary (when its directory holds a tokenizer)."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")) and \
            load_tokenizer(path).hf.get_vocab() != tokenizer.hf.get_vocab():
        raise ConfigError(f"--{flag} {path}: its tokenizer differs from the policy's ({tokenizer.path}); it must read "
                          f"the policy's token ids")


def load_frozen_reward_model(path: str, tokenizer, device: torch.device, flag: str = "reward_model") -> nn.Module:
    """A reward model (trainer/train_reward.py, or a Hugging Face *ForSequenceClassification directory) that scores
    the policy's token ids, frozen and in eval mode; ConfigError naming the flag when it cannot read them."""
    from minitrain.model.heads import load_reward_model
    check_same_tokenizer(path, tokenizer, flag)
    reward_model, _ = load_reward_model(path, device, with_tokenizer=False)
    if reward_model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"--{flag} {path}: vocab_size {reward_model.config.vocab_size} is smaller than the "
                          f"policy's tokenizer ({tokenizer.vocab_size} tokens)")
    reward_model.requires_grad_(False)
    return reward_model.eval()


@torch.no_grad()
def reward_model_scores(reward_model: nn.Module, prompts: list[list[int]], completions: list[list[int]],
                        pad_token_id: int, device: torch.device, batch_size: int = 64) -> list[float]:
    """The reward model's score of each prompt + completion, read at the last real token (as PPO reads it)."""
    scores = []
    for start in range(0, len(prompts), batch_size):
        ids, attention, _, _ = pack_sequences(prompts[start:start + batch_size], completions[start:start + batch_size],
                                              pad_token_id, device)
        scores += reward_model(ids, attention).float().tolist()
    return scores


def check_replicas(model: nn.Module, dist: DistInfo) -> int:
    """Raise RuntimeError unless every rank holds exactly the same parameters; return the number of ranks compared.

    Each rank sums every parameter and its square (float64); rank 0 compares all ranks' sums exactly. The RL
    trainers call it at every checkpoint: an update that bypassed DDP (as MiniMind's RL scripts do, calling the
    unwrapped module) makes the ranks drift apart and stops the run here.
    """
    if not is_distributed():
        return 1
    params = [p.detach().double() for p in unwrap(model).parameters()]
    sums = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params]).flatten().to(dist.device)
    gathered = [torch.zeros_like(sums) for _ in range(dist.world_size)]
    tdist.all_gather(gathered, sums)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise RuntimeError(f"parameters differ between rank 0 and ranks {differing}: an update bypassed DDP")
    return dist.world_size


def frozen_reference(model: nn.Module) -> nn.Module | None:
    """The reference policy of DPO/RL: a frozen copy of the starting model, or None under LoRA, where the reference
    is the same model with its adapters switched off (reference_logprobs handles both)."""
    if has_lora(model):
        return None
    import copy
    reference = copy.deepcopy(unwrap(model)).eval()
    reference.requires_grad_(False)
    return reference


@torch.no_grad()
def reference_logprobs(reference: nn.Module | None, model: nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """gather_logprobs of the reference policy: the frozen copy, or the policy with its LoRA adapters off."""
    if reference is not None:
        return gather_logprobs(reference, input_ids, attention_mask, temperature)
    from minitrain.model.lora import adapters_disabled
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    with adapters_disabled(raw):
        logp = gather_logprobs(raw, input_ids, attention_mask, temperature)
    raw.train(was_training)
    return logp


def linear_schedule(step: int, start: float, end: float, steps: int) -> float:
    """start at step 0, moving linearly to end at `steps`, then end (temperature and KL-coefficient schedules)."""
    if steps <= 0 or step >= steps:
        return end
    return start + (end - start) * step / steps


# =============================================================================================================
# Checkpoints and resume (safetensors + JSON, never pickle)
# =============================================================================================================

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
    pairs = [(name, t) for name, t in tensors if t.is_floating_point() and t.numel()]
    if not pairs:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in pairs]).cpu().tolist()
    return [name for (name, _), ok in zip(pairs, finite) if not ok]


def check_finite_weights(model: nn.Module, when: str, method_tensors: dict | None = None) -> None:
    """TrainingDiverged when a parameter of the model (or a method tensor, e.g. PPO's critic) is not finite."""
    bad = nonfinite_tensors(list(unwrap(model).named_parameters()) + list((method_tensors or {}).items()))
    if bad:
        raise TrainingDiverged(f"{when}: {len(bad)} weight tensors are not finite (NaN or inf), e.g. {bad[0]}")


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """Split optimizer.state_dict() into tensors (optimizer.<param index>.<name>, copies on the CPU), param_groups
    and non-tensor state."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
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
    check_finite_weights(model, f"step {step}", method_tensors)
    rng_json, rng_tensors = gather_rng_states(dist)
    path = os.path.join(cfg.out_dir, step_dir_name(step))
    if dist.is_main:
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
            from minitrain.model.lora import save_adapter
            base = os.path.abspath(cfg.init_from) if cfg.init_from else None
            save_adapter(unwrap(model), tokenizer, path, base_model_path=base, extra_json=extra,
                         write_extra=write_extra)
        else:
            save_checkpoint(unwrap(model), tokenizer, path, extra_json=extra, write_extra=write_extra)
        write_text_atomic(os.path.join(cfg.out_dir, "latest"), step_dir_name(step) + "\n")
        if final:
            link = os.path.join(cfg.out_dir, "final")
            tmp_link = f"{link}.tmp-{os.getpid()}"
            if os.path.lexists(tmp_link):
                os.remove(tmp_link)
            os.symlink(step_dir_name(step), tmp_link)
            os.replace(tmp_link, link)
        prune_checkpoints(cfg.out_dir, cfg.keep_checkpoints)
        print0(f"saved {path}")
        if final and cfg.merge and has_lora(model):
            save_merged(unwrap(model), tokenizer, os.path.join(cfg.out_dir, "merged"), extra)
    barrier()
    return path


def save_merged(model: nn.Module, tokenizer, path: str, extra: dict) -> None:
    """A full checkpoint of a LoRA model with its adapters merged (W + scale * B @ A), from a copy of the model."""
    import copy
    from minitrain.model.lora import merge_lora
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
        from minitrain.model.lora import load_adapter_weights
        load_adapter_weights(model, resume.path)
    else:
        load_weights(unwrap(model), resume.path)
    bad = nonfinite_tensors(unwrap(model).named_parameters())
    if bad:
        raise ConfigError(f"{resume.path}: {len(bad)} weight tensors are not finite (NaN or inf), e.g. {bad[0]}: the "
                          f"run had diverged; resume from an earlier checkpoint")
    try:
        optimizer.load_state_dict(optimizer_state_dict(resume.tensors, state["optimizer_param_groups"],
                                                       state["optimizer_scalars"]))
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
    write_text_atomic(path, "".join(kept))
