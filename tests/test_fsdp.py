# Run: pytest tests/test_fsdp.py   (slow except the last four: torchrun with 2 gloo ranks, as subprocesses)
# FSDP2 (--fsdp, trainer/sharding.py) against DDP on 2 CPU ranks: the same losses and the same checkpoint (the
# weights and optimizer moments gathered whole, in DDP's layout), which transformers loads; a resume that repeats
# the uninterrupted run; bf16 mixed precision; DPO and PPO from a checkpoint read shard by shard (policy, frozen
# reference, critic) and resumed; on-policy distillation
# (rollouts and the head read outside the forward); the combinations it refuses; the memory table's formula.
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_prepared, run_script
from safetensors.torch import load_file

from minitrain.model.checkpoint import load_model
from minitrain.model.config import ConfigError, ModelConfig
from minitrain.model.transformer import CausalLM
from minitrain.trainer import modeling, sharding
from minitrain.trainer.configuration import FlagError, TrainConfig
from minitrain.trainer.distributed import DistInfo
from minitrain.trainer.train_ppo import PPOConfig
from minitrain.trainer.train_sft import SFTConfig

TOLERANCE = 1e-4     # FSDP vs DDP: the same sums in another order (reduce-scatter of shards vs all-reduce)


def records(out_dir, kind: str) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(Path(out_dir) / "metrics.jsonl")) if r["kind"] == kind}


def pretrain_args(prepared: str, out_dir, *extra: str) -> list[str]:
    """6 steps of 2 ranks x 2 micro-batches x 2 sequences of 64 tokens; evaluation (loss, arithmetic accuracy,
    samples: generation on rank 0 alone) and a checkpoint every 3 steps."""
    return ["--prepared_dir", prepared, "--out_dir", str(out_dir), "--max_seq_len", "64",
            "--batch_size", "2", "--accumulation_steps", "2", "--max_steps", "6", "--learning_rate", "3e-3",
            "--warmup_steps", "2", "--log_interval", "1", "--eval_interval", "3", "--eval_batches", "3",
            "--eval_tasks", "arithmetic", "--eval_task_samples", "2", "--eval_max_new_tokens", "4",
            "--save_interval", "3", "--keep_checkpoints", "0", "--sample_prompts", "The", "--sample_tokens", "4",
            "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def runs(prepared_pretrain, tmp_path_factory) -> dict[str, Path]:
    """The same pretraining run under DDP and under FSDP, 2 ranks each, on a copy of the session's prepared data."""
    root = tmp_path_factory.mktemp("fsdp")
    out = {"ddp": root / "ddp", "fsdp": root / "fsdp", "root": root}
    copy_prepared(prepared_pretrain, root / "prepared")
    for mode in ("ddp", "fsdp"):
        extra = ["--fsdp", "--use_prepared"] if mode == "fsdp" else ["--use_prepared"]
        r = run_script("train_pretrain.py", *pretrain_args(str(root / "prepared"), out[mode], *extra), ranks=2)
        assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_fsdp_losses_equal_ddp_losses(runs):
    for kind, steps in (("train", range(1, 7)), ("eval", (0, 3, 6))):
        ddp, fsdp = records(runs["ddp"], kind), records(runs["fsdp"], kind)
        assert sorted(ddp) == sorted(fsdp) == list(steps)
        for step in steps:
            assert fsdp[step]["loss"] == pytest.approx(ddp[step]["loss"], abs=TOLERANCE), (kind, step)
    assert records(runs["fsdp"], "train")[6]["loss"] < records(runs["fsdp"], "train")[1]["loss"] - 0.5


@pytest.mark.slow
def test_fsdp_mixed_precision_follows_ddp_autocast(runs):
    """Under --dtype bfloat16 FSDP gathers the weights in bf16 and reduces gradients in fp32 (MixedPrecisionPolicy),
    DDP casts them under autocast: the same losses to bf16's precision, and the checkpoint holds the fp32 master
    weights."""
    out = {}
    for mode in ("ddp", "fsdp"):
        out[mode] = runs["root"] / f"bf16-{mode}"
        extra = ["--fsdp"] if mode == "fsdp" else []
        r = run_script("train_pretrain.py", "--prepared_dir", str(runs["root"] / "prepared"), "--use_prepared",
                       "--out_dir", str(out[mode]), "--max_seq_len", "64", "--batch_size", "4", "--max_steps", "4",
                       "--learning_rate", "3e-3", "--log_interval", "1", "--eval_interval", "0", "--eval_batches", "1",
                       "--sample_prompts", "", "--report_to", "none", "--dtype", "bfloat16", *extra, ranks=2)
        assert r.returncode == 0, r.stderr
    ddp, fsdp = records(out["ddp"], "train"), records(out["fsdp"], "train")
    assert sorted(ddp) == sorted(fsdp) == [1, 2, 3, 4]
    for step in ddp:
        assert fsdp[step]["loss"] == pytest.approx(ddp[step]["loss"], abs=0.01), step
    assert json.loads((out["fsdp"] / "final" / "config.json").read_text())["torch_dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in load_file(out["fsdp"] / "final" / "model.safetensors").values())


@pytest.mark.slow
def test_fsdp_writes_the_ddp_checkpoint(runs):
    """Whole weights under Hugging Face names, and the resume state in DDP's layout: the same tensors, the same
    optimizer moments, the same param groups."""
    for name, close in (("model.safetensors", 1e-5), ("resume_state.safetensors", 1e-5)):
        ddp = load_file(runs["ddp"] / "final" / name)
        fsdp = load_file(runs["fsdp"] / "final" / name)
        assert sorted(ddp) == sorted(fsdp)
        for key in ddp:
            assert ddp[key].shape == fsdp[key].shape, key
            if key.startswith(("optimizer.", "model.", "lm_head.")):
                assert torch.allclose(ddp[key].double(), fsdp[key].double(), atol=close), key
    ddp_state = json.loads((runs["ddp"] / "final" / "resume_state.json").read_text())
    fsdp_state = json.loads((runs["fsdp"] / "final" / "resume_state.json").read_text())
    assert ddp_state["optimizer_param_groups"] == fsdp_state["optimizer_param_groups"]
    assert ddp_state["optimizer_scalars"] == fsdp_state["optimizer_scalars"]
    assert fsdp_state["config"]["fsdp"] is True


@pytest.mark.slow
def test_fsdp_checkpoint_loads_in_transformers(runs):
    transformers = pytest.importorskip("transformers")
    path = str(runs["fsdp"] / "final")
    ours, _ = load_model(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-4)


def resume_from(run: Path, into: Path, step: int, last: int) -> None:
    """A copy of the run as a kill after `step`'s checkpoint would leave it: later checkpoints gone, `latest` there."""
    shutil.copytree(run, into, symlinks=True)
    for later in range(step + 1, last + 1):
        shutil.rmtree(into / f"step_{later:06d}", ignore_errors=True)
    (into / "final").unlink()
    (into / "latest").write_text(f"step_{step:06d}\n")


@pytest.mark.slow
def test_resume_of_an_fsdp_run_repeats_it(runs):
    """--resume under FSDP repeats the uninterrupted run's steps 4-6: the weights and moments saved whole are cut
    into shards again. (The files are DDP's, test_fsdp_writes_the_ddp_checkpoint, so DDP resumes them as its own.)"""
    out = runs["root"] / "resumed"
    resume_from(runs["fsdp"], out, 3, 6)
    r = run_script("train_pretrain.py", *pretrain_args(str(runs["root"] / "prepared"), out, "--resume", "--fsdp",
                                                       "--use_prepared"), ranks=2)
    assert r.returncode == 0, r.stderr
    uninterrupted, resumed = records(runs["fsdp"], "train"), records(out, "train")
    assert sorted(resumed) == list(range(1, 7))
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], abs=1e-6), step


@pytest.mark.slow
def test_fsdp_dpo_with_a_sharded_reference_equals_ddp(runs):
    """DPO from the pretrained checkpoint, its frozen reference sharded like the policy: the DDP losses, rewards and
    validation metrics."""
    args = ["--init_from", str(runs["fsdp"] / "final"), "--max_steps", "2", "--batch_size", "2", "--max_seq_len", "64",
            "--log_interval", "1", "--eval_interval", "2", "--eval_batches", "3", "--eval_tasks", "",
            "--save_interval", "1", "--keep_checkpoints", "0", "--report_to", "none",
            "--prepared_dir", str(runs["root"] / "dpo-data")]
    out = {}
    for mode in ("ddp", "fsdp"):
        out[mode] = runs["root"] / f"dpo-{mode}"
        extra = ["--fsdp"] if mode == "fsdp" else []
        r = run_script("train_dpo.py", *args, "--out_dir", str(out[mode]), *extra, ranks=2)
        assert r.returncode == 0, r.stderr
        assert "reference: a frozen copy" in r.stdout
        assert ("read shard by shard" in r.stdout) == (mode == "fsdp")
    for kind in ("train", "eval"):
        ddp, fsdp = records(out["ddp"], kind), records(out["fsdp"], kind)
        assert sorted(ddp) == sorted(fsdp) and ddp
        for step in ddp:
            for key in ("loss", "rewards/margins", "logps/chosen"):
                assert fsdp[step][key] == pytest.approx(ddp[step][key], abs=TOLERANCE), (kind, step, key)
    # resumed from step 1: the policy's shards read from the checkpoint, the moments kept until they are sharded
    resumed = runs["root"] / "dpo-resumed"
    resume_from(out["fsdp"], resumed, 1, 2)
    r = run_script("train_dpo.py", *args, "--out_dir", str(resumed), "--fsdp", "--resume", ranks=2)
    assert r.returncode == 0, r.stderr
    assert records(resumed, "train")[2]["loss"] == pytest.approx(records(out["fsdp"], "train")[2]["loss"], abs=1e-6)


@pytest.mark.slow
def test_fsdp_ppo_reads_policy_reference_and_critic_shard_by_shard(runs, tmp_path):
    """PPO from a checkpoint under --fsdp: the policy, its frozen reference and the critic (a copy of the policy's
    trunk with a new value head) are built on the meta device and read shard by shard: DDP's losses and values;
    a resume puts the saved critic and both optimizers' moments into the shards and repeats the run."""
    args = ["--init_from", str(runs["fsdp"] / "final"), "--max_steps", "2", "--batch_size", "2", "--max_new_tokens",
            "6", "--log_interval", "1", "--eval_interval", "0", "--eval_tasks", "", "--save_interval", "1",
            "--keep_checkpoints", "0", "--report_to", "none", "--prepared_dir", str(runs["root"] / "ppo-data")]
    out = {}
    for mode in ("ddp", "fsdp"):
        out[mode] = tmp_path / mode
        extra = ["--fsdp"] if mode == "fsdp" else []
        r = run_script("train_ppo.py", *args, "--out_dir", str(out[mode]), *extra, ranks=2)
        assert r.returncode == 0, r.stderr
    ddp, fsdp = records(out["ddp"], "train"), records(out["fsdp"], "train")
    assert sorted(ddp) == sorted(fsdp) == [1, 2]
    for step in ddp:
        for key in ("loss", "loss/value", "returns/mean", "critic/grad_norm"):
            assert fsdp[step][key] == pytest.approx(ddp[step][key], abs=TOLERANCE), (step, key)
    resumed = tmp_path / "resumed"
    resume_from(out["fsdp"], resumed, 1, 2)
    r = run_script("train_ppo.py", *args, "--out_dir", str(resumed), "--fsdp", "--resume", ranks=2)
    assert r.returncode == 0, r.stderr
    for key in ("loss", "loss/value", "returns/mean", "critic/grad_norm"):
        assert records(resumed, "train")[2][key] == pytest.approx(fsdp[2][key], abs=1e-6), key


def test_fsdp_builds_a_checkpoint_on_the_meta_device(tmp_path):
    """Under --fsdp a model from --init_from holds no weights until it is sharded (each rank then reads its rows),
    its files checked from their headers before anything runs; LoRA adapters get the values DDP's get."""
    asset = str(Path(__file__).parent / "assets" / "mini-pretrained")
    device = torch.device("cpu")
    torch.manual_seed(0)                  # as the trainers seed before build_model
    deferred, _ = modeling.build_model(TrainConfig(fsdp=True, init_from=asset, lora_rank=4), device)
    torch.manual_seed(0)
    whole, _ = modeling.build_model(TrainConfig(init_from=asset, lora_rank=4), device)
    assert sharding.is_deferred(deferred) and not sharding.is_deferred(whole)
    adapters = {n: p for n, p in deferred.named_parameters() if "lora_" in n}
    assert adapters and all(p.is_meta == ("lora_" not in n) for n, p in deferred.named_parameters())
    for name, p in whole.named_parameters():
        if "lora_" in name:
            assert torch.equal(adapters[name], p), name
    bad = tmp_path / "bad"
    shutil.copytree(asset, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="mlp.*has shape"):
        modeling.build_model(TrainConfig(fsdp=True, init_from=str(bad)), device)


@pytest.mark.slow
def test_fsdp_on_policy_distillation_equals_ddp(runs):
    """A fresh student distilled from the pretrained model, half the micro-batches its own samples (generated with
    the model gathered): the DDP losses, divergence and agreement (the head gathered after the backward)."""
    args = ["--teacher", str(runs["fsdp"] / "final"), "--model_config", "tiny",
            "--prepared_dir", str(runs["root"] / "distill-data"), "--max_seq_len", "64",
            "--batch_size", "2", "--accumulation_steps", "2", "--max_steps", "3", "--lmbda", "0.5",
            "--max_new_tokens", "6", "--log_interval", "1", "--eval_interval", "3", "--eval_batches", "3",
            "--eval_tasks", "", "--sample_prompts", "", "--save_interval", "0", "--report_to", "none"]
    out = {}
    for mode in ("ddp", "fsdp"):
        out[mode] = runs["root"] / f"distill-{mode}"
        extra = ["--fsdp", "--use_prepared"] if mode == "fsdp" else []       # the DDP run prepares the chat data
        r = run_script("train_distill.py", *args, "--out_dir", str(out[mode]), *extra, ranks=2)
        assert r.returncode == 0, r.stderr
    for kind, keys in (("train", ("loss", "loss/distill", "distill/agreement")), ("eval", ("distill", "agreement"))):
        ddp, fsdp = records(out["ddp"], kind), records(out["fsdp"], kind)
        assert sorted(ddp) == sorted(fsdp) and ddp
        for step in ddp:
            for key in keys:
                assert fsdp[step][key] == pytest.approx(ddp[step][key], abs=TOLERANCE), (kind, step, key)


def test_fsdp_refuses_what_it_does_not_shard_yet():
    """Each refusal names its flag before anything runs: PPO's shared critic, learned-decoding heads, MoE."""
    with pytest.raises(FlagError, match="fsdp"):
        SFTConfig(fsdp=True, train_temp=True).validate()
    with pytest.raises(FlagError, match="shared_critic"):
        PPOConfig(fsdp=True, shared_critic=True).validate()
    moe = CausalLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
                               moe_intermediate_size=32))
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        modeling.wrap_model(moe, TrainConfig(fsdp=True), DistInfo(0, 0, 1, torch.device("cpu")))


def test_memory_formula_by_hand():
    """16 bytes a parameter under DDP plus the bf16 copy (18 P); under FSDP 16 P / W plus 6 bytes for each gathered
    parameter of the root and two blocks."""
    assert sharding.training_memory(1000, 100, 200, 4, fsdp=False) == 18 * 1000
    assert sharding.training_memory(1000, 100, 200, 4, fsdp=True) == 16 * 1000 / 4 + 6 * (200 + 2 * 100)


def test_llama_8b_shape_has_its_published_parameter_count():
    """The memory table's 8B row is Llama 3 8B's shape: 8,030,261,248 parameters, as Meta's checkpoint has."""
    total, per_block, root = sharding.parameter_counts(ModelConfig(**sharding.LLAMA_8B))
    assert total == 8_030_261_248
    assert root == 2 * 128256 * 4096 + 4096
    assert total == root + 32 * per_block
