"""Model configuration: one dataclass for every size, presets as YAML, and the Hugging Face config.json mapping.

A preset is `config/model/<name>.yaml`; `load_model_config("tiny", {"hidden_size": 128})` reads it and applies
overrides. `to_hf_dict` / `from_hf_dict` translate to and from the config.json of the Hugging Face family the
config matches:

    num_experts > 0       -> qwen3_moe  (Qwen3-MoE: QK-norm, top-k routed SwiGLU experts)
    qk_norm               -> qwen3      (RMSNorm on each head's query and key)
    attention_bias        -> qwen2      (bias on q, k, v projections, none on o)
    otherwise             -> llama
"""

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field

import yaml

from minitrain import REPO_ROOT

PRESET_DIR = os.path.join(REPO_ROOT, "config", "model")


class ConfigError(ValueError):
    """A bad configuration; the message names the file and the field."""


@dataclass
class ModelConfig:
    # vocabulary and width
    vocab_size: int = field(default=6400, metadata={"help": "number of token embeddings (>= the tokenizer's vocabulary)"})
    hidden_size: int = field(default=512, metadata={"help": "width of the residual stream"})
    intermediate_size: int = field(default=1408, metadata={"help": "hidden width of each SwiGLU MLP (dense layers)"})
    num_hidden_layers: int = field(default=8, metadata={"help": "number of transformer blocks"})
    # attention
    num_attention_heads: int = field(default=8, metadata={"help": "query heads"})
    num_key_value_heads: int = field(default=2, metadata={"help": "key/value heads (grouped-query attention); must divide num_attention_heads"})
    head_dim: int = field(default=0, metadata={"help": "width of one head; 0 = hidden_size // num_attention_heads"})
    attention_bias: bool = field(default=False, metadata={"help": "bias on the q, k, v projections (Qwen2)"})
    qk_norm: bool = field(default=False, metadata={"help": "RMSNorm on each head's query and key before rotary (Qwen3)"})
    # positions
    max_position_embeddings: int = field(default=2048, metadata={"help": "longest context the model is meant for"})
    rope_theta: float = field(default=1e6, metadata={"help": "rotary base frequency"})
    rope_scaling: dict | None = field(default=None, metadata={"help": "context extension: {rope_type: yarn|llama3|linear, factor, original_max_position_embeddings, ...}"})
    # normalisation, output, initialisation
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "epsilon inside RMSNorm"})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "share the output head with the token embedding"})
    initializer_range: float = field(default=0.02, metadata={"help": "std of the normal initialisation of weights"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on attention probabilities and residual branches (training only)"})
    # mixture of experts (0 experts = dense SwiGLU MLP in every layer)
    num_experts: int = field(default=0, metadata={"help": "routed experts per MoE layer; 0 = dense model"})
    num_experts_per_tok: int = field(default=2, metadata={"help": "experts each token is routed to (top-k)"})
    moe_intermediate_size: int = field(default=0, metadata={"help": "hidden width of each expert's SwiGLU MLP"})
    norm_topk_prob: bool = field(default=True, metadata={"help": "renormalise the top-k routing weights to sum to 1"})
    router_aux_loss_coef: float = field(default=0.001, metadata={"help": "weight of the load-balancing loss added to the LM loss"})
    # special tokens
    bos_token_id: int | None = field(default=None, metadata={"help": "beginning-of-sequence token (None: not used)"})
    eos_token_id: int = field(default=2, metadata={"help": "end of a turn / sequence (<|im_end|>)"})
    pad_token_id: int = field(default=0, metadata={"help": "padding and document separator (<|endoftext|>)"})

    def __post_init__(self):
        self.validate()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self, source: str = "model config") -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            expected = {int: int, float: float, bool: bool}.get(f.type)
            if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
                raise ConfigError(f"{source}: field '{f.name}' must be {expected.__name__}, got {value!r}")
            if f.name == "rope_scaling" and value is not None and not isinstance(value, dict):
                raise ConfigError(f"{source}: field 'rope_scaling' must be a mapping or null, got {value!r}")
            if f.name == "bos_token_id" and value is not None and not is_int(value):
                raise ConfigError(f"{source}: field 'bos_token_id' must be int or null, got {value!r}")
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: field '{name}' must be positive, got {getattr(self, name)}")
        if self.head_dim < 0:
            raise ConfigError(f"{source}: field 'head_dim' must be 0 (derived) or positive, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                              f"num_attention_heads ({self.num_attention_heads})")
        if not self.head_dim and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: field 'hidden_size' must be divisible by num_attention_heads, or set head_dim")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"{source}: field 'head_dim' must be even for rotary embeddings")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"{source}: field 'num_experts_per_tok' must be in 1..num_experts")
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"{source}: field 'moe_intermediate_size' must be positive in an MoE model")
        elif self.intermediate_size <= 0:
            raise ConfigError(f"{source}: field 'intermediate_size' must be positive")
        if self.rope_scaling is not None:
            validate_rope_scaling(self.rope_scaling, source)

    # ---- Hugging Face config.json ----
    @property
    def model_type(self) -> str:
        if self.num_experts:
            return "qwen3_moe"
        if self.qk_norm:
            return "qwen3"
        if self.attention_bias:
            return "qwen2"
        return "llama"

    def to_hf_dict(self) -> dict:
        """config.json contents for the Hugging Face family this config matches."""
        model_type = self.model_type
        if model_type in ("qwen3", "qwen3_moe") and self.attention_bias:
            raise ConfigError("model config: field 'attention_bias' (q/k/v bias) cannot be combined with qk_norm or experts: "
                              "no Hugging Face family has both")
        if model_type == "qwen3_moe" and not self.qk_norm:
            raise ConfigError("model config: field 'qk_norm' must be true in an MoE model (Qwen3-MoE layout)")
        architectures = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                         "qwen3_moe": "Qwen3MoeForCausalLM"}[model_type]
        d = {
            "architectures": [architectures],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": self.dropout,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if model_type == "llama":
            d.update(attention_bias=False, mlp_bias=False)
        if model_type in ("qwen2", "qwen3", "qwen3_moe"):
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        if model_type == "qwen3":
            d.update(attention_bias=False)
        if model_type == "qwen3_moe":
            d.update(attention_bias=False, num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                     router_aux_loss_coef=self.router_aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[],
                     output_router_logits=False)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Read a Hugging Face llama / qwen2 / qwen3 / qwen3_moe config.json.

        A field the file leaves out takes transformers' default for the family (HF_DEFAULTS), so a checkpoint means
        the same here as there. A field of the wrong type is a ConfigError naming `source` and the field.
        """
        model_type = d.get("model_type")
        if model_type not in HF_DEFAULTS:
            raise ConfigError(f"{source}: field 'model_type' must be llama, qwen2, qwen3 or qwen3_moe, got {model_type!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' must be silu, got {d.get('hidden_act')!r}")
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
        for name in required:
            if name not in d:
                raise ConfigError(f"{source}: field '{name}' is missing")
        if model_type == "llama" and (d.get("attention_bias") or d.get("mlp_bias")):
            raise ConfigError(f"{source}: field 'attention_bias'/'mlp_bias' (bias on every projection) is not supported")
        if model_type == "qwen3" and d.get("attention_bias"):
            raise ConfigError(f"{source}: field 'attention_bias' is not supported for qwen3")
        if model_type in ("qwen2", "qwen3", "qwen3_moe") and d.get("use_sliding_window"):
            raise ConfigError(f"{source}: field 'use_sliding_window' is not supported")
        if model_type == "qwen3_moe" and (d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1):
            raise ConfigError(f"{source}: fields 'mlp_only_layers'/'decoder_sparse_step' (mixed dense/MoE layers) are not supported")
        defaults = HF_DEFAULTS[model_type]

        def get(name: str):
            return d.get(name, defaults.get(name))

        # head_dim is derived here, before the dataclass checks types: check what the division needs
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        for name, value in (("hidden_size", hidden), ("num_attention_heads", heads)):
            if not is_int(value):
                raise ConfigError(f"{source}: field '{name}' must be int, got {value!r}")
            if value <= 0:
                raise ConfigError(f"{source}: field '{name}' must be positive, got {value}")
        head_dim = get("head_dim")
        if head_dim is not None and not is_int(head_dim):
            raise ConfigError(f"{source}: field 'head_dim' must be int or null, got {head_dim!r}")
        head_dim = head_dim or hidden // heads

        # transformers 5 writes rope settings as rope_parameters; earlier versions as rope_theta + rope_scaling
        rope = d.get("rope_parameters")
        if rope is None:
            rope = {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_parameters' must be a mapping, got {rope!r}")
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is not None and not isinstance(rope_scaling, dict):
            raise ConfigError(f"{source}: field 'rope_scaling' must be a mapping or null, got {rope_scaling!r}")
        rope_theta = rope.get("rope_theta", d.get("rope_theta", defaults["rope_theta"]))
        if not is_number(rope_theta):
            name = "rope_parameters.rope_theta" if "rope_theta" in rope else "rope_theta"
            raise ConfigError(f"{source}: field '{name}' must be a number, got {rope_theta!r}")
        if rope and rope.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_scaling = {k: v for k, v in rope_scaling.items() if v is not None}   # null = transformers' default
            if rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
                rope_scaling = None

        eos = d.get("eos_token_id")
        if isinstance(eos, list):   # several end tokens: generation here stops at the first
            if not eos:
                raise ConfigError(f"{source}: field 'eos_token_id' is an empty list")
            eos = eos[0]
        try:
            return cls(
                vocab_size=d["vocab_size"], hidden_size=hidden, intermediate_size=get("intermediate_size"),
                num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
                num_key_value_heads=get("num_key_value_heads") or heads,
                head_dim=0 if head_dim * heads == hidden else head_dim,
                attention_bias=model_type == "qwen2", qk_norm=model_type in ("qwen3", "qwen3_moe"),
                max_position_embeddings=get("max_position_embeddings"), rope_theta=rope_theta,
                rope_scaling=rope_scaling, rms_norm_eps=get("rms_norm_eps"),
                tie_word_embeddings=get("tie_word_embeddings"), initializer_range=get("initializer_range"),
                # the Hub's Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts
                num_experts=d.get("num_experts", d.get("num_local_experts", defaults["num_experts"]))
                if model_type == "qwen3_moe" else 0,
                num_experts_per_tok=get("num_experts_per_tok") if model_type == "qwen3_moe" else 2,
                moe_intermediate_size=get("moe_intermediate_size") if model_type == "qwen3_moe" else 0,
                norm_topk_prob=get("norm_topk_prob") if model_type == "qwen3_moe" else True,
                router_aux_loss_coef=get("router_aux_loss_coef"),
                bos_token_id=d.get("bos_token_id"), eos_token_id=eos if eos is not None else 2,
                pad_token_id=d.get("pad_token_id") if d.get("pad_token_id") is not None else 0,
            )
        except ConfigError as e:
            raise ConfigError(str(e).replace("model config", source, 1)) from None


# transformers' defaults (models/<family>/configuration_<family>.py) for the fields a config.json may leave out;
# None = derived (num_key_value_heads = num_attention_heads, head_dim = hidden_size // num_attention_heads)
HF_COMMON_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "initializer_range": 0.02,
                      "tie_word_embeddings": False, "router_aux_loss_coef": 0.001}
HF_DEFAULTS = {
    "llama": {**HF_COMMON_DEFAULTS, "intermediate_size": 11008, "num_key_value_heads": None, "head_dim": None,
              "max_position_embeddings": 2048},
    "qwen2": {**HF_COMMON_DEFAULTS, "intermediate_size": 22016, "num_key_value_heads": 32, "head_dim": None,
              "max_position_embeddings": 32768},
    "qwen3": {**HF_COMMON_DEFAULTS, "intermediate_size": 22016, "num_key_value_heads": 32, "head_dim": 128,
              "max_position_embeddings": 32768},
    "qwen3_moe": {**HF_COMMON_DEFAULTS, "intermediate_size": 6144, "num_key_value_heads": 4, "head_dim": None,
                  "max_position_embeddings": 32768, "num_experts": 128, "num_experts_per_tok": 8,
                  "moe_intermediate_size": 768, "norm_topk_prob": False},
}

ROPE_TYPES = ("default", "linear", "yarn", "llama3")
# optional numeric rope_scaling fields that model.transformer.rope_frequencies reads, per rope_type
ROPE_NUMBERS = {"linear": (), "llama3": ("low_freq_factor", "high_freq_factor"),
                "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim")}
ROPE_NULLABLE = ("attention_factor", "mscale", "mscale_all_dim")   # null = computed from factor


def validate_rope_scaling(scaling: dict, source: str) -> None:
    """Check every rope_scaling field rope_frequencies reads; ConfigError naming the first bad one."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: field 'rope_scaling.rope_type' must be default, linear, yarn or llama3, "
                          f"got {kind!r}")
    if kind == "default":
        return
    if "factor" not in scaling:
        raise ConfigError(f"{source}: field 'rope_scaling.factor' is required for rope_type {kind}")
    factor = scaling["factor"]
    if not is_number(factor) or not 0 < factor < math.inf:
        raise ConfigError(f"{source}: field 'rope_scaling.factor' must be a positive number, got {factor!r}")
    if kind != "linear" and "original_max_position_embeddings" in scaling:
        value = scaling["original_max_position_embeddings"]
        if not is_int(value) or value <= 0:
            raise ConfigError(f"{source}: field 'rope_scaling.original_max_position_embeddings' must be a positive "
                              f"int, got {value!r}")
    for name in ROPE_NUMBERS[kind]:
        value = scaling.get(name)
        if name in scaling and not is_number(value) and not (value is None and name in ROPE_NULLABLE):
            raise ConfigError(f"{source}: field 'rope_scaling.{name}' must be a number, got {value!r}")
    if kind == "llama3":
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        if high <= low:   # the smooth ramp between the two divides by high - low
            raise ConfigError(f"{source}: field 'rope_scaling.high_freq_factor' ({high}) must exceed low_freq_factor "
                              f"({low})")
    if kind == "yarn" and scaling.get("truncate", True) is not True:
        raise ConfigError(f"{source}: field 'rope_scaling.truncate' = {scaling['truncate']!r} is not supported (only "
                          f"true: the correction range is rounded to whole dimensions)")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_fields() -> dict[str, dataclasses.Field]:
    """Every ModelConfig field by name (the training scripts turn each into a command-line flag)."""
    return {f.name: f for f in dataclasses.fields(ModelConfig)}


def list_presets() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def load_model_config(name_or_path: str, overrides: dict | None = None) -> ModelConfig:
    """A preset name (config/model/<name>.yaml), a YAML file, or a checkpoint directory's config.json; then overrides."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: not found (a model directory needs a config.json)")
        base = dataclasses.asdict(ModelConfig.from_hf_dict(read_json(path), path))
        source = path
    else:
        path = name_or_path if name_or_path.endswith((".yaml", ".yml")) else os.path.join(PRESET_DIR, f"{name_or_path}.yaml")
        if not os.path.isfile(path):
            raise ConfigError(f"{name_or_path}: unknown model preset (known: {', '.join(list_presets())}) and no such file")
        with open(path) as f:
            try:
                base = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(base, dict):
            raise ConfigError(f"{path}: must hold a mapping of ModelConfig fields")
        source = path
    known = config_fields()
    for key in base:
        if key not in known:
            raise ConfigError(f"{source}: unknown field '{key}'")
    merged = {**base, **(overrides or {})}
    for key in overrides or {}:
        if key not in known:
            raise ConfigError(f"model override: unknown field '{key}'")
    try:
        return ModelConfig(**merged)
    except ConfigError as e:
        flags = [f"--{k} {v}" for k, v in (overrides or {}).items() if re.search(rf"\b{k}\b", str(e))]
        if flags:     # a value given as a flag is to blame, not the preset it overrides
            source = f"command line: {', '.join(flags)} (over {source})"
        raise ConfigError(str(e).replace("model config", source, 1)) from None


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return d
