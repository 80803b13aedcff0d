"""FSDP2 (--fsdp): every rank holds 1/W of each weight, gradient and optimizer moment instead of a whole replica.

    shard_model        fully_shard each transformer block, then the root (embedding, final norm, head): a block's
                       weights are all-gathered just before its forward and backward and freed after; gradients are
                       reduce-scattered, so each rank keeps and updates only its shard (torch.distributed.fsdp,
                       Zhao et al. 2023, arXiv 2304.11277; FSDP2 shards each parameter on dim 0 as a DTensor)
    rebind_optimizer   an optimizer built on the unsharded parameters (and perhaps holding resumed moments) is
                       pointed at the sharded ones, each moment cut to the rank's shard
    full_weights       a context in which every rank holds the whole model, for the forwards whose number differs
                       between ranks (generation that stops at EOS, evaluation shared out unevenly, work on rank 0
                       alone): outside it every forward is a collective that all ranks must make together
    full_tensor        a parameter or moment gathered whole (a collective); a plain tensor as it is
    gathered_state     the model's state dict gathered whole, tensor by tensor, for a Hugging Face checkpoint

Checkpoints stay Hugging Face directories and the resume state keeps its layout: the weights and the optimizer
moments are gathered whole on save (rank 0 writes them, as under DDP), and cut into shards again on resume, so a run
saved under DDP resumes under FSDP and the other way round. Nothing here runs unless --fsdp is given.

Memory per rank, with W ranks and P parameters in fp32: weights, gradients and AdamW's two moments take 16 P / W
bytes (DDP: 16 P), plus the whole of the block being computed (its weights in the compute dtype) and the root's
weights, which stay gathered between a forward and its backward. full_weights holds the whole model (4 P bytes in
fp32, 2 P in bf16) while it lasts. The README's table gives the figures for the presets and an 8B Llama shape.
"""

import sys
from contextlib import contextmanager

import torch
import torch.nn as nn

from minitrain.model.lora import apply_lora, has_lora
from minitrain.model.transformer import unwrap

# torch.distributed.fsdp and torch.distributed.tensor take about a second to import, at every start of every script
# and of every rank, so only --fsdp imports them (shard_model). Until they are imported no module can be sharded and
# no tensor can be a DTensor: the two tests below read the classes from sys.modules and are exact either way.


def is_fsdp_module(module: nn.Module) -> bool:
    """True for a module that fully_shard has wrapped (its class becomes FSDP<Class>)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a sharded parameter, gradient or moment (a DTensor: each rank holds its part, .to_local())."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def is_sharded(model: nn.Module) -> bool:
    return is_fsdp_module(unwrap(model))


def shard_model(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """fully_shard each block, then the root, in place (the module stays the same object). Under mixed precision
    the gathered weights are cast to compute_dtype for the forward and backward, and gradients are reduced in fp32
    (MixedPrecisionPolicy); the sharded master weights and the optimizer stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy() if compute_dtype == torch.float32 else \
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def rebind_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], model: nn.Module) -> None:
    """Point `optimizer` at the sharded parameters of `model`. names maps id(unsharded parameter) to its name, taken
    before sharding; a moment the optimizer already holds (a resumed run's, full size) is cut to this rank's shard
    the way FSDP cuts the parameter (a DTensor with the parameter's placements, no communication: every rank holds
    the same full moment). The step counts and hyper-parameters are kept."""
    from torch.distributed.tensor import distribute_tensor
    sharded = dict(model.named_parameters())
    old_state = dict(optimizer.state)
    optimizer.state.clear()
    for group in optimizer.param_groups:
        new_params = []
        for old in group["params"]:
            new = sharded[names[id(old)]]
            state = old_state.get(old)
            if state:
                optimizer.state[new] = {
                    key: distribute_tensor(value.to(new.device), new.device_mesh, new.placements, src_data_rank=None)
                    if torch.is_tensor(value) and value.shape == old.shape and value.dim() > 0 else value
                    for key, value in state.items()}
            new_params.append(new)
        group["params"] = new_params


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every rank calls it, in the same order); others as they are."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def gathered_state(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor whole, on the CPU where keep (rank 0, which writes it), empty on the
    other ranks. Gathered one tensor at a time, so no rank ever holds more than one whole tensor on the device."""
    state = {}
    for name, tensor in unwrap(model).state_dict().items():
        whole = full_tensor(tensor.detach())
        if keep:
            state[name] = whole.to("cpu", copy=True).contiguous()
    return state


def unsharded_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain model on the CPU with the weights of gathered_state (LoRA adapters included): rank 0 merges the
    adapters of a sharded LoRA run into it for OUT_DIR/merged."""
    inner = unwrap(model)
    fsdp_class = sys.modules["torch.distributed.fsdp"].FSDPModule        # imported: the model is sharded
    plain_class = next(c for c in type(inner).__mro__ if not issubclass(c, fsdp_class))   # FSDP<Class> -> Class
    with torch.device("cpu"):
        copy = plain_class(inner.config)
    if has_lora(inner):
        apply_lora(copy, inner.lora_config)
    copy.load_state_dict(state)
    return copy


@contextmanager
def full_weights(model: nn.Module):
    """Every rank holds the whole model inside the block (a collective on entering and leaving; nothing between),
    so its forwards need no other rank. A no-op for a model that is not sharded (or None)."""
    root = unwrap(model)
    modules = [] if root is None else [m for m in root.modules() if is_fsdp_module(m)]
    if not modules:
        yield
        return
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:      # FSDP's defaults again: blocks free their weights after a forward, the root keeps
            m.set_reshard_after_forward(m is not root, recurse=False)      # its own until the backward
            m.reshard()


# ---------------------------------------------------------------------------------------------------------------
# Memory per rank, computed: `python -m minitrain.trainer.sharding` prints the README's table
# ---------------------------------------------------------------------------------------------------------------

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)


def training_memory(total: int, per_block: int, root: int, world_size: int, fsdp: bool) -> float:
    """Bytes per rank of the training state of a model with `total` parameters (`per_block` in each block, `root`
    outside the blocks), trained in fp32 master weights with AdamW under bf16 mixed precision; activations are left
    out (they depend on the batch, and --grad_checkpointing cuts them alike in both modes).

        DDP:   4 weights + 4 gradients + 8 AdamW moments + 2 the bf16 copy of the weights      = 18 P
        FSDP:  16 P / W                 weights, gradients and moments, sharded
               + 6 (P_root + 2 P_block) the gathered bf16 weights (2 bytes) and their unsharded fp32 gradients
                                        before the reduce-scatter (4 bytes) of the root (embedding, final norm,
                                        head) and of two blocks in flight (the one computing, the next one gathered)
    """
    if not fsdp:
        return 18.0 * total
    return 16.0 * total / world_size + 6.0 * (root + 2 * per_block)


def parameter_counts(config) -> tuple[int, int, int]:
    """(total, per block, root) parameter counts of a model config, built on the meta device (no memory)."""
    from minitrain.model.transformer import CausalLM
    with torch.device("meta"):
        model = CausalLM(config)
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    total = model.num_parameters()
    return total, per_block, total - config.num_hidden_layers * per_block


def memory_table(presets: list[str], world_sizes: list[int]) -> list[str]:
    """Markdown rows: each preset and the 8B Llama shape, GiB per rank under DDP and under FSDP on each W."""
    from minitrain.model.config import ModelConfig, load_model_config
    shapes = [(name, load_model_config(name)) for name in presets] + [("Llama 3 8B shape", ModelConfig(**LLAMA_8B))]
    rows = ["| model | parameters | DDP, any W | " + " | ".join(f"FSDP, W={w}" for w in world_sizes) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in world_sizes) + " |"]
    for name, config in shapes:
        total, per_block, root = parameter_counts(config)
        fsdp = [training_memory(total, per_block, root, w, fsdp=True) for w in world_sizes]
        ddp = training_memory(total, per_block, root, 1, fsdp=False)
        rows.append(f"| {name} | {total / 1e6:,.1f}M | {ddp / 2**30:,.2f} | "
                    + " | ".join(f"{b / 2**30:,.2f}" for b in fsdp) + " |")
    return rows


if __name__ == "__main__":
    print("\n".join(memory_table(["mini", "tiny", "small", "base", "0.5b"], [2, 8, 64])))
