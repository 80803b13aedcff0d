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
    meta_model         a model of --init_from built on the meta device (no memory), its weights read later by
                       shard_model, each rank only its own rows of each tensor (load_shards)

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


def shard_model(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """fully_shard each block, then the root, in place (the module stays the same object). Under mixed precision
    the gathered weights are cast to compute_dtype for the forward and backward, and gradients are reduced in fp32
    (MixedPrecisionPolicy); the sharded master weights and the optimizer stay fp32. A model built by meta_model gets
    its weights here, each rank reading only its shards (load_shards)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    values = to_meta(model) if is_deferred(model) else None
    policy = MixedPrecisionPolicy() if compute_dtype == torch.float32 else \
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if values is not None:
        load_shards(model, device, values)
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
    pending = getattr(optimizer, "pending_state", None)
    if pending is not None:              # a resumed state that load_optimizer_state kept for the shards
        del optimizer.pending_state
        optimizer.load_state_dict(pending)       # the moments whole, on the parameters' device: cut them now
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0 and not is_dtensor(value) and value.shape == param.shape:
                    state[key] = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


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
# Loading shard by shard: a model that does not fit one device is never whole on any rank
# ---------------------------------------------------------------------------------------------------------------
# Under --fsdp a model from --init_from is built on the meta device (shapes, no memory) and remembers where its
# weights are (`weights_source`). Until shard_model, anything may be added to it with real values (LoRA adapters,
# a value or score head) or given values to load later (a resumed critic: set_values); a copy of it (the frozen
# reference, PPO's critic) remembers the same source. shard_model then shards the skeleton and each rank reads
# its own rows of every tensor from the safetensors files (FSDP2 cuts dim 0 as torch.chunk does: ceil(n / W)
# rows a rank, the last ones fewer or none).

def meta_model(config, path: str) -> nn.Module:
    """A CausalLM of `config` on the meta device whose weights shard_model reads from `path` (checked now, from the
    files' headers: names and shapes)."""
    from minitrain.model.checkpoint import weight_index
    from minitrain.model.transformer import CausalLM, RotaryEmbedding
    with torch.device("meta"):
        model = CausalLM(config)
    model.model.rotary_emb = RotaryEmbedding(config)   # its fp32 frequencies are a plain tensor, made for real
    weight_index(model, path)
    model.weights_source = path
    return model


def is_deferred(model: nn.Module) -> bool:
    """True for a model whose weights are still to be read (built by meta_model, not yet sharded)."""
    return getattr(unwrap(model), "weights_source", None) is not None and \
        any(p.is_meta for p in unwrap(model).parameters())


def defer_weights(model: nn.Module, path: str) -> None:
    """The weights of `path` (a resumed checkpoint) replace the source of a model built by meta_model."""
    unwrap(model).weights_source = path


def set_values(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the parameters of those names: at once where a parameter holds memory, at
    shard_model for one still on the meta device."""
    root = unwrap(model)
    params = dict(root.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            if params[name].is_meta:
                root.__dict__.setdefault("pending_values", {})[name] = value
            else:
                params[name].copy_(value)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """optimizer.load_state_dict, or, for an optimizer over meta parameters, the state kept until rebind_optimizer
    points it at the shards (load_state_dict would move the moments to the meta device, losing them). The groups'
    sizes are checked now either way (ValueError, as load_state_dict raises)."""
    if not any(p.is_meta for group in optimizer.param_groups for p in group["params"]):
        optimizer.load_state_dict(state_dict)
        return
    saved = [len(g["params"]) for g in state_dict["param_groups"]]
    if saved != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(f"loaded state dict has groups of {saved} parameters, this optimizer's differ")
    optimizer.pending_state = state_dict


def to_meta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Move the parameters that hold values (adapters, heads) to the meta device too, returning their values by
    name: fully_shard and to_empty need a model wholly on the meta device."""
    root = unwrap(model)
    values = {}
    for module_name, module in root.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                values[f"{module_name}.{name}" if module_name else name] = param.detach().cpu().clone()
                setattr(module, name, nn.Parameter(torch.empty_like(param, device="meta"),
                                                   requires_grad=param.requires_grad))
    return values


def my_rows(param: torch.Tensor) -> tuple[int, int]:
    """(first, end) rows of the whole tensor that this rank's shard of a sharded parameter holds."""
    from torch.distributed.tensor import Shard
    assert tuple(param.placements) == (Shard(0),), param.placements
    total, world, rank = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    first = min(rank * -(-total // world), total)
    return first, first + param.to_local().shape[0]


def load_shards(model: nn.Module, device: torch.device, values: dict[str, torch.Tensor]) -> None:
    """Give the sharded skeleton memory on `device`, then fill each rank's rows: from set_values (a resumed
    critic), else from the safetensors files of `weights_source` (safetensors' get_slice reads those rows alone),
    else from `values`, what the parameters held before to_meta (new adapters and heads; a resumed checkpoint that
    holds a head replaces it). Non-finite values are a ConfigError naming the source, as a resumed checkpoint's
    are."""
    from contextlib import ExitStack

    from safetensors import safe_open

    from minitrain.model.checkpoint import check_tied_head, weight_files
    from minitrain.model.config import ConfigError
    root = unwrap(model)
    source = root.__dict__.pop("weights_source")
    pending = root.__dict__.pop("pending_values", {})
    model.to_empty(device=device)
    with ExitStack() as files, torch.no_grad():
        tensors = {}                                    # name -> (file, its open handle)
        for file in weight_files(source):
            handle = files.enter_context(safe_open(file, framework="pt"))
            tensors.update({name: (file, handle) for name in handle.keys()})
        for name, param in root.named_parameters():
            first, end = my_rows(param)
            in_file = name if name in tensors else name.replace(".base_layer.", ".")   # a LoRA base: the file's name
            if name in pending:
                rows = pending[name][first:end]
            elif in_file in tensors:
                file, handle = tensors[in_file]
                whole = handle.get_slice(in_file)
                if tuple(whole.get_shape()) != tuple(param.shape):
                    raise ConfigError(f"{file}: tensor '{in_file}' has shape {tuple(whole.get_shape())}, the model "
                                      f"needs {tuple(param.shape)}")
                rows = whole[first:end]
            elif name in values:
                rows = values[name][first:end]
            else:
                raise ConfigError(f"{source}: weights missing from the safetensors files: {name}")
            param.to_local().copy_(rows)
            if not torch.isfinite(param.to_local()).all():
                raise ConfigError(f"{source}: tensor '{name}' is not finite (NaN or inf)")
        if root.config.tie_word_embeddings and "lm_head.weight" in tensors:
            file, handle = tensors["lm_head.weight"]
            embedding = root.model.embed_tokens.weight
            first, end = my_rows(embedding)
            check_tied_head(handle.get_slice("lm_head.weight")[first:end], embedding.to_local(), file, source)


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
