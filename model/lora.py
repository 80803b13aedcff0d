"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al. 2021, arXiv 2106.09685).

A targeted linear layer y = W x + b becomes

    y = W x + b + (alpha / r) * B A dropout(x)        A: [r, in], B: [out, r], W and b frozen

A starts Kaiming-uniform and B at zero, so the adapted model starts equal to the base (PEFT's initialisation).
With rsLoRA the scale is alpha / sqrt(r) instead, which keeps the update's size stable as r grows
(Kalajdzievski 2023, arXiv 2312.03732).

    model = apply_lora(model, LoRAConfig(rank=16, alpha=32, targets="all-linear"))
    count_trainable(model)                       # (adapter parameters, all parameters)
    with adapters_disabled(model):               # the base model, e.g. the reference model of DPO/GRPO
        ref_logits = model(ids).logits
    save_adapter(model, tokenizer, "out/lora")   # PEFT layout: adapter_config.json + adapter_model.safetensors
    model = load_adapter(base_model, "out/lora")
    model = merge_lora(model)                    # plain nn.Linear layers again, W + scale * B @ A

Each adapter is a module of its own (LoRALinear holding the base layer as `base_layer`, like PEFT), so state-dict
names follow PEFT's: model.layers.0.self_attn.q_proj.lora_A.weight. No forward is monkey-patched, so
torch.compile traces adapted models like any other.
"""

import dataclasses
import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from minitrain.model.checkpoint import fsync_dir
from minitrain.model.config import ConfigError, read_json
from minitrain.model.transformer import unwrap

ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."   # PEFT wraps the model twice: PeftModel.base_model (LoraModel).model
BLOCKS_PREFIX = "model.layers."     # adapters go only on linear layers inside the transformer blocks


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + B(A(dropout(x))) * scale."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        weight = base_layer.weight
        # half-precision bases get fp32 adapters (as PEFT does): small updates survive the optimizer step
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        in_features, out_features = base_layer.in_features, base_layer.out_features
        # a base on the meta device (FSDP loads its weights shard by shard later) gets adapters with real values
        device = torch.device("cpu") if weight.is_meta else weight.device
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)   # [r, in]
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)  # [out, r]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True   # False: the layer is the base layer alone (see adapters_disabled)
        self.reset_parameters()

    def reset_parameters(self):
        """PEFT's default: A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's own init), B = 0, so B @ A starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        result = self.base_layer(x)                                   # [..., out]
        if not self.enabled:
            return result
        x = self.dropout(x).to(self.lora_A.weight.dtype)              # [..., in]
        update = self.lora_B(self.lora_A(x)) * self.scale             # [..., r] -> [..., out]
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, the change this adapter makes to W: [out, in], in fp32."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear with weight W + scale * B @ A (and the base bias), on the base layer's device and dtype.

        Merges whether or not the adapter is enabled; dropout plays no part (it is the identity at inference)."""
        base = self.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        merged.weight.copy_((base.weight.float() + self.delta_weight()).to(base.weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(base.weight.requires_grad)
        merged.train(base.training)
        return merged

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, use_rslora={self.use_rslora}"


@dataclass
class LoRAConfig:
    rank: int = field(default=16, metadata={"help": "rank r of the update B @ A (A: [r, in], B: [out, r])"})
    alpha: float = field(default=32.0, metadata={
        "help": "the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (training only)"})
    targets: list[str] | str = field(default=ALL_LINEAR, metadata={
        "help": "linear layers that get adapters: module-name suffixes (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                "down_proj, or a longer one such as self_attn.q_proj), or 'all-linear' = every linear layer of the "
                "transformer blocks except the MoE router"})
    use_rslora: bool = field(default=False, metadata={
        "help": "rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023)"})

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = parse_targets(self.targets)
        elif isinstance(self.targets, list) and ALL_LINEAR in self.targets:
            if self.targets != [ALL_LINEAR]:
                raise ConfigError("LoRA config: field 'targets': 'all-linear' cannot be combined with other names")
            self.targets = ALL_LINEAR
        self.validate()

    def validate(self, source: str = "LoRA config") -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ConfigError(f"{source}: field 'rank' must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ConfigError(f"{source}: field 'alpha' must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ConfigError(f"{source}: field 'dropout' must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"{source}: field 'use_rslora' must be true or false, got {self.use_rslora!r}")
        if self.targets != ALL_LINEAR and not (isinstance(self.targets, list) and self.targets and all(
                isinstance(t, str) and t and t == t.strip() for t in self.targets)):
            raise ConfigError(f"{source}: field 'targets' must be 'all-linear' or a non-empty list of module names, "
                              f"got {self.targets!r}")


def parse_targets(text: str) -> list[str] | str:
    """'q_proj, k_proj' -> ['q_proj', 'k_proj']; 'all-linear' -> 'all-linear'."""
    names = [name.strip() for name in text.split(",")]
    if not text.strip() or any(not name for name in names):
        raise ConfigError(f"LoRA config: field 'targets': {text!r} must be 'all-linear' or a comma-separated list of "
                          f"module names such as q_proj,v_proj")
    if ALL_LINEAR in names:
        if names != [ALL_LINEAR]:
            raise ConfigError("LoRA config: field 'targets': 'all-linear' cannot be combined with other names")
        return ALL_LINEAR
    return names


def has_lora(model: nn.Module) -> bool:
    """True when the model (inside any wrappers) carries LoRA adapters."""
    return getattr(unwrap(model), "lora_config", None) is not None



def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapter by module name (model.layers.0.self_attn.q_proj, ...)."""
    return {name: m for name, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of targets: the module name equals the target or ends with '.' + target."""
    return name == target or name.endswith("." + target)


def is_router(model: nn.Module, name: str) -> bool:
    """The MoE router (mlp.gate, an nn.Linear to num_experts logits), which 'all-linear' leaves alone."""
    parent = model.get_submodule(name.rsplit(".", 1)[0])
    return name.endswith(".gate") and hasattr(parent, "experts")


def select_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the nn.Linear modules of the transformer blocks that `targets` selects; every named target must
    select at least one."""
    linear = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.startswith(BLOCKS_PREFIX)]
    if targets == ALL_LINEAR:
        return [name for name in linear if not is_router(model, name)]
    selected = []
    for target in targets:
        hits = [name for name in linear if matches(name, target)]
        if not hits:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ConfigError(f"LoRA config: field 'targets': {target!r} matches no linear layer of the transformer "
                              f"blocks (their names end in: {', '.join(suffixes)})")
        selected += hits
    return [name for name in linear if name in set(selected)]   # model order, each once


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model`, then replace the targeted nn.Linear layers with LoRALinear (in place).

    Apply it before torch.compile and DistributedDataParallel. Returns the model; records the resolved config as
    `model.lora_config` (targets expanded from 'all-linear' to layer-name suffixes, as save_adapter writes them).
    """
    inner = unwrap(model)
    if lora_layers(inner):
        raise ValueError("the model already has LoRA adapters (merge_lora first, or load into a fresh model)")
    names = select_targets(inner, config.targets)
    inner.requires_grad_(False)
    for name in names:
        parent_name, child_name = name.rsplit(".", 1)
        parent = inner.get_submodule(parent_name)
        base = getattr(parent, child_name)
        adapter = LoRALinear(base, config.rank, config.alpha, config.dropout, config.use_rslora)
        adapter.train(base.training)
        setattr(parent, child_name, adapter)
    targets = (sorted({name.rsplit(".", 1)[-1] for name in names}) if config.targets == ALL_LINEAR
               else list(config.targets))
    inner.lora_config = dataclasses.replace(config, targets=targets)
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(parameters that get gradients, all parameters), tied weights counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block, every adapter is switched off and the model computes its base: the reference model of
    DPO/GRPO/PPO from a LoRA policy without a second copy. Each adapter's own switch is restored on exit.
    Under torch.compile the switch is guarded: the first use compiles a second graph, which is reused after."""
    layers = list(lora_layers(model).values())
    states = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer.enabled = state


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear with its merged nn.Linear (W + scale * B @ A); the model has no adapters after."""
    inner = unwrap(model)
    for name, layer in lora_layers(inner).items():
        parent_name, child_name = name.rsplit(".", 1)
        setattr(inner.get_submodule(parent_name), child_name, layer.merge())
    if hasattr(inner, "lora_config"):
        del inner.lora_config
    return model


# ---------------------------------------------------------------------------------------------------------------
# Adapter files in PEFT's layout
# ---------------------------------------------------------------------------------------------------------------

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's saved names: base_model.model.<module>.lora_A.weight / .lora_B.weight."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()  # [r, in]
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()  # [out, r]
    return state


def save_adapter(model: nn.Module, tokenizer, out_dir: str, base_model_path: str | None = None,
                 extra_json: dict | None = None, write_extra=None, state: dict[str, torch.Tensor] | None = None) -> str:
    """Write the adapters alone, atomically, in PEFT's layout (PeftModel.from_pretrained reads it):
        adapter_config.json, adapter_model.safetensors (+ tokenizer.json, tokenizer_config.json when given)
    base_model_path is recorded as base_model_name_or_path. extra_json is saved as minitrain.json, and
    write_extra(tmp_dir) adds files (a trainer's resume state) before the directory appears. state: the adapter
    tensors to write instead of adapter_state_dict(model) (a sharded model's, gathered whole). An existing
    `out_dir` is replaced. Returns the path."""
    inner = unwrap(model)
    config = getattr(inner, "lora_config", None)
    if config is None or not lora_layers(inner):
        raise ValueError("the model has no LoRA adapters to save (apply_lora or load_adapter first)")
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets,
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_config, f, indent=2)
    save_file(adapter_state_dict(inner) if state is None else state, os.path.join(tmp, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    if tokenizer is not None:
        max_len = getattr(getattr(inner, "config", None), "max_position_embeddings", 2048)
        tokenizer.save(tmp, model_max_length=max_len)
    if extra_json is not None:
        with open(os.path.join(tmp, "minitrain.json"), "w") as f:
            json.dump(extra_json, f, indent=2)
    if write_extra is not None:
        write_extra(tmp)
    fsync_dir(tmp)
    old = f"{out_dir}.old-{os.getpid()}"   # the old directory stays intact until the new one is complete
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)
    return out_dir


# PEFT options that change which modules get adapters or what an adapter computes: a file that sets one of them
# to anything but its default describes a model this module cannot rebuild.
UNSUPPORTED_DEFAULTS = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
                        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
                        "lora_bias": False, "target_parameters": None, "layer_replication": None,
                        "trainable_token_indices": None}


def read_adapter_config(path: str) -> LoRAConfig:
    """LoRAConfig from a PEFT adapter_config.json; ConfigError naming the file and field when it cannot be used."""
    d = read_json(path)
    if d.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: field 'peft_type' must be \"LORA\", got {d.get('peft_type')!r}")
    for name in ("r", "lora_alpha", "target_modules"):
        if name not in d:
            raise ConfigError(f"{path}: field '{name}' is missing")
    for name, default in UNSUPPORTED_DEFAULTS.items():
        value = d.get(name, default)
        if value != default and not (default is None and value in ([], {})):
            raise ConfigError(f"{path}: field '{name}' = {value!r} is not supported (only {default!r})")
    targets = d["target_modules"]
    if isinstance(targets, str) and targets != ALL_LINEAR:
        raise ConfigError(f"{path}: field 'target_modules' is a regular expression ({targets!r}); only a list of "
                          f"module names or 'all-linear' is supported")
    try:
        return LoRAConfig(rank=d["r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout", 0.0),
                          targets=targets, use_rslora=d.get("use_rslora", False))
    except ConfigError as e:   # name the file and PEFT's field
        fields = {"'rank'": "'r'", "'alpha'": "'lora_alpha'", "'dropout'": "'lora_dropout'",
                  "'targets'": "'target_modules'"}
        message = str(e).replace("LoRA config", path, 1)
        for ours, peft in fields.items():
            message = message.replace(f"field {ours}", f"field {peft}", 1)
        raise ConfigError(message) from None


def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Apply LoRA as adapter_config.json describes it and load adapter_model.safetensors (ours or PEFT's).

    Every tensor must belong to an adapter of this model with the right shape, and every adapter must get its two
    tensors; otherwise ConfigError naming the file and tensor, raised before the model is changed. Returns the
    model (adapters trainable, base frozen).
    """
    if not os.path.isdir(adapter_dir):
        raise ConfigError(f"{adapter_dir}: adapter directory not found")
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_path):
        raise ConfigError(f"{config_path}: not found (an adapter directory needs {ADAPTER_CONFIG})")
    config = read_adapter_config(config_path)
    if not os.path.isfile(weights_path):
        raise ConfigError(f"{weights_path}: not found (only safetensors adapter weights are read)")
    inner = unwrap(model)
    if lora_layers(inner):
        raise ValueError("the model already has LoRA adapters (merge_lora first, or load into a fresh model)")
    try:
        names = select_targets(inner, config.targets)
    except ConfigError as e:
        raise ConfigError(str(e).replace("LoRA config: field 'targets'", f"{config_path}: field 'target_modules'", 1)
                          ) from None
    shapes = {}
    for name in names:
        base = inner.get_submodule(name)
        shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (config.rank, base.in_features)   # [r, in]
        shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (base.out_features, config.rank)  # [out, r]
    tensors = read_adapter_tensors(weights_path, shapes, f"{ADAPTER_CONFIG} (r = {config.rank}, target_modules)")
    apply_lora(model, config)
    params = adapter_state_dict(inner)
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return model


def load_adapter_weights(model: nn.Module, adapter_dir: str) -> None:
    """Copy the adapter tensors of `adapter_dir` into the adapters `model` already has (resuming a LoRA run)."""
    inner = unwrap(model)
    params = adapter_state_dict(inner)
    shapes = {name: tuple(t.shape) for name, t in params.items()}
    tensors = read_adapter_tensors(os.path.join(adapter_dir, ADAPTER_WEIGHTS), shapes, "this run's LoRA flags")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def read_adapter_tensors(path: str, shapes: dict[str, tuple], described_by: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose names and shapes must be exactly `shapes`."""
    tensors = {}
    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name not in shapes:
                    raise ConfigError(f"{path}: tensor '{name}' is not an adapter of this model under {described_by}")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != shapes[name]:
                    raise ConfigError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, the model under "
                                      f"{described_by} needs {shapes[name]}")
                tensors[name] = tensor
    except ConfigError:
        raise
    except Exception as e:   # safetensors raises its own error types on a damaged file
        raise ConfigError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        more = " ..." if len(missing) > 3 else ""
        raise ConfigError(f"{path}: adapter tensors missing: {', '.join(missing[:3])}{more}")
    return tensors
