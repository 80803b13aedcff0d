"""Heads on the transformer's trunk: the sequence reward model and the value head of PPO's critic.

    TrunkModel    CausalLM without its LM head: forward(..., compute_logits=False) of the shared transformer, whose
                  final hidden states [B, T, H] a head reads. Built from scratch, or around the trunk of a CausalLM
                  that build_model returned (from_trunk: the modules are shared, not copied, LoRA adapters included).
    RewardModel   TrunkModel + `score`, a bias-free nn.Linear(H, 1) read at the last real token of each row:
                      r(x) = w . h_T(x),   T = the last position whose attention_mask is not 0
                  model(input_ids, attention_mask) -> [B] scores (the forward, so that DDP sees the call). `score`
                  is the head's name in Hugging Face's layout, hence no method of that name.
    ValueHead     two-layer MLP over hidden states, one value per token: V = w2 . gelu(W1 h + b1) + b2.
                  Its output layer starts at zero, so every value starts at 0 (the critic learns from the returns,
                  not from a random offset).
    ValueModel    TrunkModel + ValueHead: PPO's separate critic, model(input_ids, attention_mask) -> [B, T] values.

Reward checkpoints are Hugging Face sequence-classification directories (save_reward_model / load_reward_model):
    config.json   the family's config (llama, qwen2, qwen3, qwen3_moe) with architectures
                  ["<Family>ForSequenceClassification"], num_labels 1 (id2label {0: LABEL_0}) and pad_token_id
    model.safetensors   the trunk's model.* tensors and score.weight [1, H]; no lm_head
so transformers.AutoModelForSequenceClassification.from_pretrained(dir) loads it. transformers reads the score at
the rightmost token that is not pad_token_id and numbers positions from column 0: on right-padded rows (every row of
trainer/train_reward.py's batches) its scores equal ours. On left-padded rows ours number positions from the first
real token (as generation does) and transformers' from column 0, so the two differ there unless position_ids are
passed. A reward model trained by transformers (TRL's RewardTrainer) loads here the same way.

Shapes: B batch, T tokens, H hidden size.
"""

import dataclasses
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from minitrain.model.checkpoint import check_model_dir, load_tokenizer, load_weights, save_checkpoint
from minitrain.model.config import ConfigError, ModelConfig, read_json
from minitrain.model.transformer import CausalLM, RotaryEmbedding

SEQUENCE_CLASSIFICATION = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                           "qwen3": "Qwen3ForSequenceClassification",
                           "qwen3_moe": "Qwen3MoeForSequenceClassification"}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last position whose attention_mask is not 0 (left padding, right padding or none)."""
    T = attention_mask.shape[-1]
    return T - 1 - attention_mask.ne(0).flip(-1).int().argmax(-1)


class TrunkModel(CausalLM):
    """The transformer without its LM head (the head that replaces it is the subclass's)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        del self.lm_head          # never used by a head model: a DDP-wrapped model must use every parameter

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Final normed hidden states [B, T, H] (CausalLM.forward with compute_logits=False)."""
        return super().forward(input_ids, attention_mask=attention_mask, compute_logits=False).hidden_states

    def new_head(self) -> nn.Module:
        """The head that replaces lm_head (RewardModel: score [1, H]; ValueModel: value_head [1, H])."""
        raise NotImplementedError(f"{type(self).__name__} must define new_head()")

    @classmethod
    def from_trunk(cls, source: nn.Module, config: ModelConfig | None = None):
        """A head model around the trunk of `source` (a CausalLM or another TrunkModel): its `model` modules are
        shared, not copied (deepcopy the source first for an independent copy); the head is new, on the trunk's
        device, initialised from the global torch generator. LoRA adapters on the trunk stay, with lora_config."""
        config = config or source.config
        with torch.device("meta"):                      # a skeleton whose trunk is replaced at once
            model = cls(config)
        model.model = source.model
        model.gradient_checkpointing = source.gradient_checkpointing
        if getattr(source, "lora_config", None) is not None:
            model.lora_config = source.lora_config
        device = next(source.parameters()).device
        if device.type == "meta":      # a trunk whose weights FSDP loads shard by shard later: a head with values
            device = torch.device("cpu")
        if getattr(source, "weights_source", None) is not None:
            model.weights_source = source.weights_source          # trainer/sharding.py: where those weights are
        head_name = model.head_name
        setattr(model, head_name, model.new_head().to(device))
        model.train(source.training)
        return model


# =============================================================================================================
# Reward model
# =============================================================================================================

@dataclasses.dataclass
class RewardModelConfig(ModelConfig):
    """A ModelConfig whose config.json is the family's sequence-classification one (one label)."""

    def to_hf_dict(self) -> dict:
        d = super().to_hf_dict()
        d["architectures"] = [SEQUENCE_CLASSIFICATION[self.model_type]]
        d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, problem_type="regression")
        return d

    @classmethod
    def of(cls, config: ModelConfig) -> "RewardModelConfig":
        return config if isinstance(config, cls) else cls(**dataclasses.asdict(config))


class RewardModel(TrunkModel):
    """Sequence reward model: the trunk plus `score` (nn.Linear(H, 1, bias=False)) at the last real token."""

    head_name = "score"

    def __init__(self, config: ModelConfig):
        super().__init__(RewardModelConfig.of(config))
        self.score = self.new_head()

    def new_head(self) -> nn.Module:
        head = nn.Linear(self.config.hidden_size, 1, bias=False)
        nn.init.normal_(head.weight, 0.0, self.config.initializer_range)   # transformers' init of `score`
        return head

    @classmethod
    def from_trunk(cls, source: nn.Module, config: ModelConfig | None = None) -> "RewardModel":
        return super().from_trunk(source, RewardModelConfig.of(config or source.config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B] (float32) read at each row's last real token."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.hidden_states(input_ids, attention_mask)                   # [B, T, H]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = hidden[rows, last_token_index(attention_mask)]                     # [B, H]
        return self.score(last).squeeze(-1).float()                               # [B]


def save_reward_model(model: RewardModel, tokenizer, path: str, extra_json: dict | None = None) -> str:
    """Write a reward model as a Hugging Face sequence-classification directory (atomically, like every checkpoint)."""
    return save_checkpoint(model, tokenizer, path, extra_json=extra_json)


def check_reward_config(hf: dict, config_path: str) -> None:
    """A ConfigError unless config.json describes a one-label sequence classifier."""
    architectures = hf.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(f"{config_path}: field 'architectures' is {architectures}, not a sequence classifier: a "
                          f"reward model is a *ForSequenceClassification checkpoint (trainer/train_reward.py writes "
                          f"one)")
    labels = hf.get("num_labels", len(hf.get("id2label") or {}) or 2)   # transformers' default is 2 labels
    if labels != 1:
        raise ConfigError(f"{config_path}: field 'num_labels' (or id2label) gives {labels} labels; a reward model "
                          f"has one (a scalar score)")


def load_reward_model(path: str, device="cpu", dtype: torch.dtype | None = None,
                      with_tokenizer: bool = True) -> tuple[RewardModel, object]:
    """(RewardModel in eval mode, its tokenizer or None) from a sequence-classification directory (ours or one
    transformers wrote). Bad directories are ConfigErrors naming the file and field."""
    check_model_dir(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{config_path}: not found (a reward model directory needs a config.json)")
    hf = read_json(config_path)
    check_reward_config(hf, config_path)
    config = RewardModelConfig.of(ModelConfig.from_hf_dict(hf, config_path))
    tokenizer = None
    if with_tokenizer and os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer = load_tokenizer(path)
    with torch.device("meta"):
        model = RewardModel(config)
    model = model.to_empty(device=device)
    model.model.rotary_emb = RotaryEmbedding(config)   # its fp32 frequencies were not materialised on "meta"
    load_weights(model, path)                           # model.* and score.weight, each checked against the config
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer


# =============================================================================================================
# Value head and critic
# =============================================================================================================

class ValueHead(nn.Module):
    """V(h) = w2 . gelu(W1 h + b1) + b2 per token: [..., H] -> [...]. W1: normal(0, std), w2 and b2: zeros."""

    def __init__(self, hidden_size: int, std: float = 0.02):
        super().__init__()
        self.fc = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.fc.weight, 0.0, std)
        nn.init.zeros_(self.fc.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(hidden))).squeeze(-1).float()


class ValueModel(TrunkModel):
    """PPO's separate critic: a trunk (a copy of the policy's, or a reward model's) with a ValueHead."""

    head_name = "value_head"

    def __init__(self, config: ModelConfig):
        super().__init__(ModelConfig(**dataclasses.asdict(config)))
        self.value_head = self.new_head()

    def new_head(self) -> nn.Module:
        return ValueHead(self.config.hidden_size, self.config.initializer_range)

    @classmethod
    def from_trunk(cls, source: nn.Module, config: ModelConfig | None = None) -> "ValueModel":
        return super().from_trunk(source, ModelConfig(**dataclasses.asdict(config or source.config)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Values [B, T] (float32): V at position t is the value of the state that ends with token t."""
        return self.value_head(self.hidden_states(input_ids, attention_mask))
