"""What a run is told, and how bad input is reported: the flags every trainer shares and how they are read.

    RunConfig            the fields of every script that starts from a model and reads data (config file, model,
                         data): TrainConfig's first fields, and make_pairs' PairsConfig's
    TrainConfig          the shared fields (model, data, length and batch, optimiser, LoRA, runtime, logging); a
                         method's config subclasses it, adds its fields and sets the shared ones it runs with
    parse_config         dataclass defaults < --config YAML < command-line flags; every field is a flag, every
                         ModelConfig field too (collected into cfg.model_overrides)
    USER_ERRORS, fail    bad input (and a diverged run) becomes one `error: ...` line on stderr, exit status 2;
                         anything else is a bug and keeps its traceback
    FlagError            a flag out of range; parse_config says where the value came from (file and line, or flag)
    TrainingDiverged     the loss or the weights stopped being finite (reporting, optim and checkpointing raise it)
"""

import argparse
import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import NoReturn

import yaml

from minitrain import REPO_ROOT
from minitrain.dataset.files import yaml_error
from minitrain.eval.cli import INPUT_ERRORS, OneLineParser, UsageError
from minitrain.eval.task_eval import parse_task_names
from minitrain.model.config import ConfigError, ModelConfig
from minitrain.model.lora import parse_targets

DEFAULT_TOKENIZER_DIR = os.path.join(REPO_ROOT, "dataset", "tokenizer")


CONFIG_DIR = os.path.join(REPO_ROOT, "config", "train")


class TrainingDiverged(Exception):
    """The loss or the weights stopped being finite numbers: the run stops before it saves or uses them. The
    message names what went wrong and the last good checkpoint of the run directory."""

    def __init__(self, problem: str):
        # imported here: checkpointing imports this module (its check of the weights raises this error)
        from minitrain.trainer.checkpointing import RUN_DIR_LOCK, read_latest_quietly
        good = read_latest_quietly(RUN_DIR_LOCK.out_dir) if RUN_DIR_LOCK.out_dir else None
        super().__init__(f"{problem}: the run stopped and saved none of it; the last good checkpoint is "
                         f"{good or 'none (nothing was saved yet)'}: lower --learning_rate (or raise --warmup_steps) "
                         f"and {'--resume from it' if good else 'start again'}")


# Bad input the user can fix (and a run that diverged). Each script's main catches these and calls fail(); anything
# else is a bug and keeps its traceback.
USER_ERRORS = INPUT_ERRORS + (TrainingDiverged,)


def fail(message: str) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


class FlagError(ConfigError):
    """A flag whose value is out of range; parse_config adds where the value came from."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"--{name} {problem}")


@dataclass
class RunConfig:
    """Flags of every script that starts from a model and reads a data mixture: the trainers (TrainConfig) and
    trainer/make_pairs.py. These are TrainConfig's first fields: a config's field order is the order of the config
    dict saved in every checkpoint (minitrain.json, resume_state.json), so only a prefix of TrainConfig can live here.
    """

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

    def validate(self) -> None:
        if self.data_config and self.data_path:
            raise FlagError("data_path", "and --data_config are alternatives: give one")


@dataclass
class TrainConfig(RunConfig):
    """Flags every trainer shares. A method subclasses this and adds its own fields."""

    # ---- data (config file, model and mixture: RunConfig's fields) ----
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
    fsdp: bool = field(default=False, metadata={
        "help": "shard weights, gradients and optimizer state over the ranks with FSDP2 (torch fully_shard, per "
                "block) instead of replicating them with DDP, for models whose training state does not fit one "
                "device; checkpoints are gathered whole, so they are the same Hugging Face directories"})
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
            try:
                parse_targets(self.lora_targets)
            except ConfigError as e:
                raise FlagError("lora_targets", str(e).split(": ", 2)[-1]) from None
        if self.eval_tasks:
            try:
                parse_task_names(self.eval_tasks)
            except ValueError as e:
                raise FlagError("eval_tasks", str(e)) from None
        super().validate()


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


def shared_field_metadata() -> dict[str, dict]:
    """Help and choices of each shared field (TrainConfig's): a config that only sets a shared field's default keeps
    them."""
    return {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}


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
        raise ConfigError(f"{path}: {yaml_error(e)}") from None
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
        choices = (f.metadata or shared_field_metadata().get(key, {})).get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        values[key] = (value, where)
    return values


def parse_config(config_cls, argv: list[str] | None = None):
    """Build `config_cls` (a TrainConfig subclass, or another RunConfig one) from its defaults, --config YAML and flags.

    Precedence, lowest first: the dataclass defaults (what a bare run does: a method's config sets the shared fields
    it runs with), the file given by --config (a recipe, e.g. config/train/<name>.yaml), the command line. Every
    field is a flag (--batch_size 8; booleans as --compile or --compile false); every ModelConfig field is a flag
    too (--hidden_size 768), collected into cfg.model_overrides. Bad input ends
    the program with a one-line error (exit status 2) naming the file, line and key, or the flag.
    """
    fields = {name: entry for name, entry in config_field_types(config_cls).items() if name != "model_overrides"}
    model_fields = config_field_types(ModelConfig)
    clash = set(fields) & set(model_fields)
    if clash:
        raise TypeError(f"{config_cls.__name__} fields {sorted(clash)} clash with ModelConfig fields")

    parser = OneLineParser(description=(config_cls.__doc__ or "").strip(), argument_default=argparse.SUPPRESS)
    # a method's config that sets the default of a shared field keeps the field's help and choices
    shared_metadata = shared_field_metadata()
    groups = {"shared": parser.add_argument_group("flags every trainer shares"),
              "method": parser.add_argument_group(f"{config_cls.__name__} flags"),
              "model": parser.add_argument_group("model fields (override --model_config / --init_from)")}
    for table in (fields, model_fields):
        for name, (tp, f) in table.items():
            if table is model_fields:
                default = "from the model preset or checkpoint"
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            metadata = f.metadata or shared_metadata.get(name, {})
            base = split_optional(tp)[0]
            kwargs = dict(type=flag_type(tp), help=f"{metadata.get('help', '')} [default: {default}]",
                          metavar=getattr(typing.get_origin(base) or base, "__name__", "value").upper())
            if base is bool:
                kwargs.update(nargs="?", const=True)
            if metadata.get("choices"):
                kwargs["choices"] = metadata["choices"]
            group = "model" if table is model_fields else "shared" if name in shared_metadata else "method"
            groups[group].add_argument(f"--{name}", **kwargs)
    try:
        given = vars(parser.parse_args(argv))
    except UsageError as e:
        fail(f"command line: {e}")

    values = {}   # key -> (value, where it was set)
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
