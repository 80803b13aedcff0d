"""The model a run trains: built from a preset or a checkpoint, LoRA applied, wrapped for training.

    build_model          --init_from DIR (ours or a Hugging Face llama/qwen2/qwen3 directory) or --model_config,
                         the tokenizer, LoRA adapters when --lora_rank > 0
    wrap_model           gradient checkpointing, torch.compile, then DistributedDataParallel
    frozen_reference     a frozen copy of the starting policy (DPO, GRPO, PPO), or None under LoRA, where the
                         base model with its adapters switched off is the reference
    check_same_tokenizer a second model (teacher, reward model) reads the policy's token ids only with its vocabulary
"""


import copy
import os

import torch
import torch.nn as nn

from minitrain.model.checkpoint import check_model_dir, load_tokenizer, load_weights
from minitrain.model.config import ConfigError
from minitrain.model.config import load_model_config
from minitrain.model.lora import LoRAConfig, apply_lora, count_trainable, has_lora
from minitrain.model.tokenizer import Tokenizer, TokenizerError
from minitrain.model.transformer import CausalLM, unwrap
from minitrain.trainer.configuration import DEFAULT_TOKENIZER_DIR, TrainConfig
from minitrain.trainer.distributed import DistInfo, print0
from minitrain.trainer.evaluation import check_eval_tasks


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
        apply_lora(model, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                     targets=cfg.lora_targets, use_rslora=cfg.use_rslora))
        trainable, total = count_trainable(model)
        print0(f"LoRA: rank {cfg.lora_rank} on {', '.join(model.lora_config.targets)}: {trainable:,} trainable of "
               f"{total:,} parameters ({100 * trainable / total:.2f}%)")
    return model.to(device), tokenizer


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



def frozen_reference(model: nn.Module) -> nn.Module | None:
    """The reference policy of DPO/RL: a frozen copy of the starting model, or None under LoRA, where the reference
    is the same model with its adapters switched off (reference_logprobs handles both)."""
    if has_lora(model):
        return None
    reference = copy.deepcopy(unwrap(model)).eval()
    reference.requires_grad_(False)
    return reference


def check_same_tokenizer(path: str, tokenizer, flag: str) -> None:
    """A model that reads the policy's token ids must share its vocabulary (when its directory holds a tokenizer)."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")) and \
            load_tokenizer(path).hf.get_vocab() != tokenizer.hf.get_vocab():
        raise ConfigError(f"--{flag} {path}: its tokenizer differs from the policy's ({tokenizer.path}); it must read "
                          f"the policy's token ids")
