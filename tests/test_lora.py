# Run: pytest tests/test_lora.py   (without the torch.compile test: -m "not slow")
# LoRA adapters (model/lora.py): the adapter formula, merging, switching adapters off, which layers "all-linear"
# picks, trainable-parameter counts, training that moves only adapter tensors, torch.compile, and adapter files in
# PEFT's layout (key names, round trip, bad directories; PEFT itself loads ours and we load PEFT's when installed).
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from minitrain.model.checkpoint import load_model, save_checkpoint
from minitrain.model.config import ConfigError, load_model_config
from minitrain.model.lora import (LoRAConfig, LoRALinear, adapters_disabled, apply_lora, count_trainable, load_adapter,
                                  lora_layers, merge_lora, parse_targets, save_adapter)
from minitrain.model.transformer import CausalLM

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(preset="tiny", **overrides):
    torch.manual_seed(0)
    return CausalLM(load_model_config(preset, overrides)).eval()


def randomise_adapters(model, std=0.05, seed=1):
    """B starts at zero (the adapted model equals the base): give every B random values so adapters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


def batch(B=2, T=10, seed=0):
    return torch.randint(3, 6400, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


# ---------------------------------------------------------------------------------------------------------------
# The layer itself
# ---------------------------------------------------------------------------------------------------------------

def test_lora_linear_computes_base_plus_scaled_low_rank_update_on_a_rectangular_layer():
    torch.manual_seed(0)
    base = nn.Linear(48, 20, bias=True)                      # rectangular, with bias
    layer = LoRALinear(base, rank=4, alpha=12)
    assert layer.lora_A.weight.shape == (4, 48) and layer.lora_B.weight.shape == (20, 4)
    assert torch.all(layer.lora_B.weight == 0) and layer.lora_A.weight.abs().max() > 0
    assert layer.scale == 3.0
    bound = 1 / math.sqrt(48)   # kaiming_uniform(a=sqrt(5)) on fan_in 48 = U(-1/sqrt(48), 1/sqrt(48))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.8 * bound
    randomise_adapters(layer, std=0.3)
    x = torch.randn(3, 5, 48)
    W, b, A, Bm = base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight
    expected = x @ W.T + b + 3.0 * (x @ A.T @ Bm.T)                          # [3, 5, 20]
    torch.testing.assert_close(layer(x), expected)
    assert (layer(x) - base(x)).abs().max() > 0.1
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.bias is not None
    torch.testing.assert_close(merged.weight, W + 3.0 * Bm @ A)
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    layer.enabled = False
    torch.testing.assert_close(layer(x), base(x))


def test_dropout_applies_to_the_adapter_input_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8, bias=False), rank=2, alpha=2, dropout=0.5)
    randomise_adapters(layer, std=0.5)
    x = torch.randn(4, 16)
    A, Bm = layer.lora_A.weight, layer.lora_B.weight
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    x_dropped = F.dropout(x, 0.5, training=True)                             # same mask: same seed, same call
    torch.testing.assert_close(y, layer.base_layer(x) + x_dropped @ A.T @ Bm.T)
    assert (x_dropped == 0).any()
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ A.T @ Bm.T)


def test_rslora_scales_by_alpha_over_sqrt_rank():
    base = nn.Linear(32, 24, bias=False)
    plain = LoRALinear(base, rank=16, alpha=8)
    rs = LoRALinear(base, rank=16, alpha=8, use_rslora=True)
    assert plain.scale == 0.5 and rs.scale == 2.0                            # 8/16 and 8/sqrt(16)
    randomise_adapters(plain, std=0.2)
    with torch.no_grad():
        rs.lora_A.weight.copy_(plain.lora_A.weight)
        rs.lora_B.weight.copy_(plain.lora_B.weight)
    x = torch.randn(5, 32)
    torch.testing.assert_close(rs(x) - base(x), 4.0 * (plain(x) - base(x)))  # ratio sqrt(16)


# ---------------------------------------------------------------------------------------------------------------
# Applying adapters to the model
# ---------------------------------------------------------------------------------------------------------------

def test_all_linear_picks_every_block_linear_layer_except_router_and_head():
    dense = apply_lora(tiny(), LoRAConfig(rank=2, alpha=4, targets="all-linear"))
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
    assert set(lora_layers(dense)) == expected
    assert type(dense.lm_head) is nn.Linear
    k = dense.model.layers[0].self_attn.k_proj                               # GQA: 64 -> 2 heads * 16
    assert k.lora_A.weight.shape == (2, 64) and k.lora_B.weight.shape == (32, 2)
    down = dense.model.layers[1].mlp.down_proj
    assert down.lora_A.weight.shape == (2, 192) and down.lora_B.weight.shape == (64, 2)

    moe = apply_lora(tiny("tiny-moe"), LoRAConfig(rank=2, alpha=4, targets="all-linear"))
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ["q_proj", "k_proj", "v_proj", "o_proj"]}
    expected |= {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in range(4)
                 for p in ["gate_proj", "up_proj", "down_proj"]}
    assert set(lora_layers(moe)) == expected
    assert type(moe.model.layers[0].mlp.gate) is nn.Linear                   # the router stays as it is
    assert moe.lora_config.targets == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
    up = moe.model.layers[0].mlp.experts[3].up_proj                           # 64 -> moe_intermediate_size 96
    assert up.lora_A.weight.shape == (2, 64) and up.lora_B.weight.shape == (96, 2)


def test_base_weights_are_frozen_and_trainable_count_is_rank_times_in_plus_out():
    model = tiny()
    total_before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL_SEVEN))
    # tiny: H=64, 4 query heads of 16, 2 kv heads (k/v: 64 -> 32), intermediate 192, 2 layers
    per_layer = (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 192) + (64 + 192) + (192 + 64)
    trainable, total = count_trainable(model)
    assert trainable == 4 * per_layer * 2 == 9728
    assert total == total_before + trainable
    for name, p in model.named_parameters():
        assert p.requires_grad == (".lora_A." in name or ".lora_B." in name), name

    only_qv = apply_lora(tiny(), LoRAConfig(rank=8, alpha=8, targets=parse_targets("q_proj, v_proj")))
    assert count_trainable(only_qv)[0] == 8 * ((64 + 64) + (64 + 32)) * 2


def test_targets_that_match_nothing_are_errors_naming_the_target():
    with pytest.raises(ValueError, match="'qproj' matches no linear layer"):
        apply_lora(tiny(), LoRAConfig(targets=["q_proj", "qproj"]))
    with pytest.raises(ValueError, match="'lm_head' matches no linear layer of the transformer blocks"):
        apply_lora(tiny(), LoRAConfig(targets=["lm_head"]))
    with pytest.raises(ValueError, match="'gate' matches no linear layer"):   # dense model: no router
        apply_lora(tiny(), LoRAConfig(targets=["gate"]))
    router = apply_lora(tiny("tiny-moe"), LoRAConfig(targets=["mlp.gate"]))   # named explicitly, the router is fine
    assert set(lora_layers(router)) == {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    assert parse_targets("q_proj,k_proj") == ["q_proj", "k_proj"] and parse_targets("all-linear") == "all-linear"
    for bad in ["", "q_proj,,v_proj", "all-linear,q_proj"]:
        with pytest.raises(ConfigError, match="field 'targets'"):
            parse_targets(bad)
    for field, value in [("rank", 0), ("alpha", -1.0), ("dropout", 1.0)]:
        with pytest.raises(ConfigError, match=f"field '{field}'"):
            LoRAConfig(**{field: value})
    model = apply_lora(tiny(), LoRAConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(targets=["v_proj"]))


def test_merged_lora_gives_the_same_logits_as_base_plus_adapter(tmp_path):
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=8, targets="all-linear"))
    ids = batch()
    with adapters_disabled(model):
        base = logits(model, ids)
    randomise_adapters(model)
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 0.05                               # the adapters change the output
    merged = merge_lora(model)
    assert not lora_layers(merged) and all(type(m) is not LoRALinear for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), adapted, atol=1e-5, rtol=1e-5)
    # --merge: a full checkpoint with plain Hugging Face names, which loads back with the same logits
    save_checkpoint(merged, None, str(tmp_path / "merged"))
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("lora" in n or "base_layer" in n for n in names)
    reloaded, _ = load_model(str(tmp_path / "merged"), with_tokenizer=False)
    torch.testing.assert_close(logits(reloaded, ids), adapted, atol=1e-5, rtol=1e-5)


def test_merge_on_the_moe_model_matches_adapted_logits():
    model = apply_lora(tiny("tiny-moe"), LoRAConfig(rank=2, alpha=4, targets="all-linear", use_rslora=True))
    randomise_adapters(model)
    ids = batch()
    adapted = logits(model, ids)
    torch.testing.assert_close(logits(merge_lora(model), ids), adapted, atol=1e-5, rtol=1e-5)


def test_adapters_disabled_gives_the_base_model_logits_and_restores_each_switch():
    base_model = tiny()
    ids = batch()
    base = logits(base_model, ids)
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=16, targets="all-linear"))
    randomise_adapters(model)
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 0.05
    q0 = model.model.layers[0].self_attn.q_proj
    q0.enabled = False                                                       # one adapter switched off by hand
    partly = logits(model, ids)
    with adapters_disabled(model):
        assert all(not layer.enabled for layer in lora_layers(model).values())
        torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)
    assert not q0.enabled and sum(layer.enabled for layer in lora_layers(model).values()) == 13
    torch.testing.assert_close(logits(model, ids), partly, atol=0, rtol=0)
    with pytest.raises(RuntimeError), adapters_disabled(model):              # restored on an exception too
        raise RuntimeError("inside")
    q0.enabled = True
    torch.testing.assert_close(logits(model, ids), adapted, atol=0, rtol=0)


def test_sgd_steps_on_adapter_parameters_change_only_adapter_tensors():
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * 3 * 2                                          # A and B, 3 targets, 2 layers
    optimizer = torch.optim.SGD(params, lr=0.5)
    ids = batch(B=4, T=16)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, tensor in model.state_dict().items():
        changed = not torch.equal(tensor, before[name])
        assert changed == (".lora_A." in name or ".lora_B." in name), name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.slow
def test_compiled_lora_model_matches_eager_and_honours_the_switch():
    model = apply_lora(tiny(num_hidden_layers=1), LoRAConfig(rank=2, alpha=4, targets="all-linear"))
    randomise_adapters(model)
    ids = batch(B=1, T=6)
    eager = logits(model, ids)
    with adapters_disabled(model):
        eager_base = logits(model, ids)
    # aot_eager traces with dynamo and AOTAutograd like inductor does, without minutes of C++ compilation on CPU;
    # fullgraph=True fails on any graph break
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(logits(compiled, ids), eager, atol=1e-6, rtol=1e-6)
    with adapters_disabled(compiled):
        torch.testing.assert_close(logits(compiled, ids), eager_base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(compiled, ids), eager, atol=1e-6, rtol=1e-6)
    # gradients through the compiled graph reach the adapters as in eager mode
    layer = model.model.layers[0].mlp.up_proj
    compiled(ids).logits.square().mean().backward()
    compiled_grad = layer.lora_B.weight.grad.clone()
    layer.lora_B.weight.grad = None
    model(ids).logits.square().mean().backward()
    assert compiled_grad.abs().max() > 0
    torch.testing.assert_close(compiled_grad, layer.lora_B.weight.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Adapter files (PEFT layout)
# ---------------------------------------------------------------------------------------------------------------

def test_adapter_checkpoint_holds_only_adapter_tensors_under_peft_names(tmp_path):
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj"]))
    out = save_adapter(model, None, str(tmp_path / "adapter"), base_model_path="out/pretrain/final")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(os.path.join(out, "adapter_model.safetensors"), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    expected = {}
    for i in range(2):
        prefix = f"base_model.model.model.layers.{i}.self_attn"
        expected[f"{prefix}.q_proj.lora_A.weight"] = (4, 64)
        expected[f"{prefix}.q_proj.lora_B.weight"] = (64, 4)
        expected[f"{prefix}.v_proj.lora_A.weight"] = (4, 64)
        expected[f"{prefix}.v_proj.lora_B.weight"] = (32, 4)
    assert shapes == expected
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert {k: config[k] for k in ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                   "use_rslora", "bias", "base_model_name_or_path", "fan_in_fan_out",
                                   "inference_mode"]} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"], "use_rslora": False, "bias": "none",
        "base_model_name_or_path": "out/pretrain/final", "fan_in_fan_out": False, "inference_mode": True}
    assert not [p for p in os.listdir(tmp_path) if p != "adapter"]           # no temporary directory left behind


def test_save_load_round_trip_gives_equal_logits(tmp_path):
    model = apply_lora(tiny("tiny-moe"), LoRAConfig(rank=3, alpha=6, dropout=0.1, targets="all-linear",
                                                   use_rslora=True))
    randomise_adapters(model)
    model.eval()
    ids = batch()
    expected = logits(model, ids)
    save_adapter(model, None, str(tmp_path / "adapter"))
    save_adapter(model, None, str(tmp_path / "adapter"))                     # replaces an existing directory
    fresh = tiny("tiny-moe")                                                 # same seed: same base weights
    loaded = load_adapter(fresh, str(tmp_path / "adapter"))
    assert loaded.lora_config == model.lora_config
    assert set(lora_layers(loaded)) == set(lora_layers(model))
    torch.testing.assert_close(logits(loaded, ids), expected, atol=0, rtol=0)  # eval mode kept: no dropout
    assert loaded.model.layers[0].self_attn.q_proj.scale == 6 / math.sqrt(3)


DELETE = object()


def bad_adapter_cases():
    """(name, edit of a good adapter directory, text the ConfigError must hold)."""
    def edit_config(**changes):
        def edit(d):
            config = json.load(open(os.path.join(d, "adapter_config.json")))
            config.update(changes)
            config = {k: v for k, v in config.items() if v is not DELETE}
            json.dump(config, open(os.path.join(d, "adapter_config.json"), "w"))
        return edit

    def write(name, text):
        return lambda d: open(os.path.join(d, name), "w").write(text)

    def drop_tensor(d):
        path = os.path.join(d, "adapter_model.safetensors")
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if "layers.1.self_attn.v_proj.lora_B" not in k}
        save_file(tensors, path)

    return [
        ("no config", lambda d: os.remove(os.path.join(d, "adapter_config.json")), "adapter_config.json: not found"),
        ("no weights", lambda d: os.remove(os.path.join(d, "adapter_model.safetensors")),
         "adapter_model.safetensors: not found"),
        ("bad json", write("adapter_config.json", '{"r": 4,\n'), "adapter_config.json: line 2: not valid JSON"),
        ("missing r", edit_config(r=DELETE), "adapter_config.json: field 'r' is missing"),
        ("bad rank", edit_config(r=0), "adapter_config.json: field 'r' must be a positive integer"),
        ("not lora", edit_config(peft_type="IA3"), "adapter_config.json: field 'peft_type'"),
        ("dora", edit_config(use_dora=True), "adapter_config.json: field 'use_dora'"),
        ("unknown target", edit_config(target_modules=["q_proj", "c_attn"]),
         "adapter_config.json: field 'target_modules': 'c_attn' matches no linear layer"),
        ("rank mismatch", edit_config(r=8), "has shape (4, 64), the model under adapter_config.json (r = 8, "
                                            "target_modules) needs (8, 64)"),
        ("fewer targets", edit_config(target_modules=["q_proj"]), "tensor 'base_model.model.model.layers.0.self_attn."
                                                                  "v_proj.lora_A.weight' is not an adapter"),
        ("missing tensor", drop_tensor, "adapter tensors missing: base_model.model.model.layers.1.self_attn.v_proj"),
        ("damaged weights", write("adapter_model.safetensors", "garbage"), "not a readable safetensors file"),
    ]


def test_bad_adapter_directories_are_one_line_errors_naming_file_and_field(tmp_path):
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match="adapter directory not found"):
        load_adapter(tiny(), str(tmp_path / "missing"))
    for i, (name, edit, message) in enumerate(bad_adapter_cases()):
        bad = str(tmp_path / f"bad{i}")
        save_adapter(model, None, bad)
        edit(bad)
        fresh = tiny()
        with pytest.raises(ConfigError) as error:
            load_adapter(fresh, bad)
        assert message in str(error.value) and bad in str(error.value) and "\n" not in str(error.value), name
        assert not lora_layers(fresh), f"{name}: the model was changed before the error"


# ---------------------------------------------------------------------------------------------------------------
# PEFT, the real peer (test-only)
# ---------------------------------------------------------------------------------------------------------------

def test_peft_loads_our_adapter_and_we_load_peft_s_with_the_same_logits(tmp_path):
    import peft
    import transformers
    model = tiny()
    save_checkpoint(model, None, str(tmp_path / "base"))
    model = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="all-linear", use_rslora=True))
    randomise_adapters(model)
    save_adapter(model, None, str(tmp_path / "ours"), base_model_path=str(tmp_path / "base"))
    ids = batch()
    ours = logits(model, ids)
    with adapters_disabled(model):
        base = logits(model, ids)
    assert (ours - base).abs().max() > 0.05

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(peft_model, ids), ours, atol=2e-5, rtol=1e-4)
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, ids), base, atol=2e-5, rtol=1e-4)

    with torch.no_grad():                                                    # PEFT's own files, read by us
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.mul_(-1.5)
        theirs = logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    loaded = load_adapter(load_model(str(tmp_path / "base"), with_tokenizer=False)[0], str(tmp_path / "theirs"))
    assert loaded.lora_config.use_rslora and loaded.lora_config.rank == 4
    torch.testing.assert_close(logits(loaded, ids), theirs, atol=2e-5, rtol=1e-4)
    assert (theirs - ours).abs().max() > 0.05
