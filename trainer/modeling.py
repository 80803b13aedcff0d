"""The model a run trains: built from a preset or a checkpoint, LoRA applied, wrapped for training.

    build_model          --init_from DIR (ours or a Hugging Face llama/qwen2/qwen3 directory) or --model_config,
                         the tokenizer, LoRA adapters when --lora_rank > 0; under --fsdp a checkpoint is read
                         shard by shard when the model is sharded
    wrap_model           gradient checkpointing, then FSDP2 (--fsdp: the optimizer is pointed at the shards),
                         torch.compile, then DistributedDataParallel (without --fsdp, on several ranks)
    frozen_reference     a frozen copy of the starting policy (DPO, GRPO, PPO; sharded too under --fsdp), or None
                         under LoRA, where the base model with its adapters switched off is the reference
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
from minitrain.trainer import sharding
from minitrain.trainer.distributed import DistInfo, print0
from minitrain.trainer.evaluation import check_eval_tasks
from minitrain.trainer.optim import resolve_dtype


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[CausalLM, Tokenizer]:
    """The model and tokenizer a run starts from, fp32 on `device`; under --fsdp with --init_from a skeleton on the
    meta device instead, whose weights each rank reads shard by shard when wrap_model shards it (sharding.py).

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
    if cfg.fsdp and cfg.init_from:
        # each rank reads only its shards, when wrap_model shards the model (sharding.meta_model)
        model = sharding.meta_model(config, cfg.init_from)
        print0(f"--fsdp: {cfg.init_from} is read shard by shard when the model is sharded (built on the meta device)")
    elif cfg.init_from:
        with torch.random.fork_rng(devices=[]):     # the draws of a random init that the checkpoint replaces do not
            model = CausalLM(config)                # move the generator: LoRA and new heads draw what they would
            load_weights(model, cfg.init_from)      # draw under --fsdp, where no random init is made
    else:
        model = CausalLM(config)
    check_eval_tasks(cfg, model, tokenizer)
    if cfg.lora_rank:
        apply_lora(model, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                     targets=cfg.lora_targets, use_rslora=cfg.use_rslora))
        trainable, total = count_trainable(model)
        print0(f"LoRA: rank {cfg.lora_rank} on {', '.join(model.lora_config.targets)}: {trainable:,} trainable of "
               f"{total:,} parameters ({100 * trainable / total:.2f}%)")
    return (model if sharding.is_deferred(model) else model.to(device)), tokenizer


def wrap_model(model: nn.Module, cfg: TrainConfig, dist: DistInfo, *optimizers: torch.optim.Optimizer) -> nn.Module:
    """The module the training loop calls: gradient checkpointing, FSDP2 or DistributedDataParallel, torch.compile.

    Call it after the optimizers are built and a resumed state restored, on the unwrapped model. Under --fsdp the
    model is sharded in place (sharding.shard_model) and `optimizers`, built on its unsharded parameters, are pointed
    at the shards, with any moments they hold cut to this rank's part (sharding.rebind_optimizer).
    """
    if cfg.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.fsdp:
        if unwrap(model).config.num_experts:
            raise ConfigError("--fsdp: mixture-of-experts models are not sharded yet (an expert that no token of a "
                              "rank reached would leave the ranks' gradient reductions unmatched); use DDP")
        names = {id(p): name for name, p in model.named_parameters()}
        sharding.shard_model(model, resolve_dtype(cfg.dtype, dist.device), dist.device)
        for optimizer in optimizers:
            sharding.rebind_optimizer(optimizer, names, model)
        return torch.compile(model) if cfg.compile else model
    if cfg.compile:
        model = torch.compile(model)
    if dist.world_size > 1:
        # an MoE expert that no token of a micro-batch was routed to gets no gradient: DDP must look for those
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            find_unused_parameters=bool(unwrap(model).config.num_experts))
    return model



def frozen_reference(model: nn.Module, cfg: TrainConfig, dist: DistInfo) -> nn.Module | None:
    """The reference policy of DPO/RL: a frozen copy of the starting model (sharded like the policy under --fsdp),
    or None under LoRA, where the reference is the same model with its adapters switched off (reference_logprobs
    handles both)."""
    if has_lora(model):
        return None
    reference = copy.deepcopy(unwrap(model)).eval()
    reference.requires_grad_(False)
    if cfg.fsdp:
        sharding.shard_model(reference, resolve_dtype(cfg.dtype, dist.device), dist.device)
    return reference


def check_same_tokenizer(path: str, tokenizer, flag: str) -> None:
    """A model that reads the policy's token ids must share its vocabulary (when its directory holds a tokenizer)."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")) and \
            load_tokenizer(path).hf.get_vocab() != tokenizer.hf.get_vocab():
        raise ConfigError(f"--{flag} {path}: its tokenizer differs from the policy's ({tokenizer.path}); it must read "
                          f"the policy's token ids")
