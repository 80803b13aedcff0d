# Run: pytest tests/test_runtime.py   (without the subprocesses and the checkpoint round trip: -m "not slow")
# The shared training runtime (trainer/runtime.py) piece by piece: the learning-rate schedule, AdamW groups, config
# parsing (dataclass defaults < --config YAML < flags) and its one-line errors, the global batch sampler, MFU
# arithmetic, metrics.jsonl, and checkpoints: no-pickle resume state round trips, exact resume in-process, atomic
# saves that survive an exception or a SIGKILL in the middle.
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from conftest import run_script
from minitrain.model.checkpoint import load_model
from minitrain.model.config import load_model_config
from minitrain.model.transformer import CausalLM
from minitrain.trainer import batches, checkpointing, distributed, optim, reporting
from minitrain.dataset import jsonl
from minitrain.model import config
from minitrain.trainer.batches import GlobalBatchSampler
from minitrain.trainer.configuration import TrainConfig, parse_config
from minitrain.trainer.distributed import DistInfo
from minitrain.trainer.optim import cosine_lr, param_groups
from minitrain.trainer.reporting import flops_per_token

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


# ---- learning-rate schedule ----------------------------------------------------------------------------------

def test_cosine_lr_warmup_decay_and_floor():
    lr = lambda step: cosine_lr(step, max_steps=110, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)                                   # decay starts at the peak
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5)                       # half way: cos(pi/2) = 0
    assert lr(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)  # the floor, also past the end
    decay = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert cosine_lr(5, 10, 0, 3e-4, 0.0) == pytest.approx(3e-4 * 0.5)    # no warmup, anneal to zero


# ---- AdamW parameter groups ----------------------------------------------------------------------------------

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 6)                 # weight decays, bias does not
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 10, bias=False)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_decay_only_matrices_and_skip_frozen():
    toy = Toy()
    decay, no_decay = param_groups(toy, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(toy.proj.weight), id(toy.head.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(toy.embed.weight), id(toy.proj.bias), id(toy.norm.weight),
                                                  id(toy.norm.bias)}


def test_param_groups_of_the_tiny_model_count_every_trainable_parameter_once():
    model = CausalLM(load_model_config("tiny"))    # tied: lm_head is the embedding
    decay, no_decay = param_groups(model, 0.1)
    c = model.config
    kv = c.num_key_value_heads * c.resolved_head_dim
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    assert sum(p.numel() for p in decay["params"]) == c.num_hidden_layers * per_layer
    assert sum(p.numel() for p in no_decay["params"]) == \
        c.vocab_size * c.hidden_size + (2 * c.num_hidden_layers + 1) * c.hidden_size
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()


# ---- config parsing ------------------------------------------------------------------------------------------

@dataclass
class MethodConfig(TrainConfig):
    """A method's config for the tests."""
    learning_rate: float = 1e-3          # a shared field at this method's default (its help comes from TrainConfig)
    dtype: str = "float32"               # a shared field with choices
    beta: float = field(default=0.5, metadata={"help": "a method-only field"})
    reference: str | None = field(default=None, metadata={"help": "an optional field"})


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_precedence_dataclass_defaults_then_config_yaml_then_flags(tmp_path):
    user = write(tmp_path / "user.yaml", """\
        batch_size: 16
        compile: true
        num_hidden_layers: 3
        hidden_size: 96
    """)
    cfg = parse_config(MethodConfig, ["--config", user, "--batch_size", "32", "--num_hidden_layers", "5",
                                      "--grad_checkpointing", "--compile", "false", "--reference", "none"])
    assert cfg.batch_size == 32                        # flag > --config
    assert cfg.learning_rate == 1e-3 and cfg.dtype == "float32"   # the method's defaults of shared fields
    assert cfg.beta == 0.5 and cfg.epochs == 1         # a method field's default; TrainConfig's default
    assert cfg.compile is False and cfg.grad_checkpointing is True and cfg.reference is None
    assert cfg.model_overrides == {"hidden_size": 96, "num_hidden_layers": 5}
    assert cfg.config == user
    assert parse_config(MethodConfig, []) == MethodConfig()       # a bare run is exactly the dataclass
    assert parse_config(MethodConfig, ["--rope_scaling", "{rope_type: yarn, factor: 4}"]).model_overrides == \
        {"rope_scaling": {"rope_type": "yarn", "factor": 4}}


def test_a_shared_field_a_method_sets_keeps_its_help_and_choices(capsys):
    with pytest.raises(SystemExit):
        parse_config(MethodConfig, ["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--learning_rate FLOAT peak learning rate (AdamW) [default: 0.001]" in help_text
    assert "float32, bfloat16, float16 [default: float32]" in help_text
    with pytest.raises(SystemExit):
        parse_config(MethodConfig, ["--dtype", "float64"])
    assert "invalid choice: 'float64'" in capsys.readouterr().err


@pytest.mark.parametrize("yaml_text, argv, message", [
    ("batch_size: 4\nbatchsize: 8\n", [], "bad.yaml: line 2: key 'batchsize' is unknown"),
    ("epochs: 2\nbatch_size: eight\n", [], "bad.yaml: line 2: key 'batch_size' must be int, got 'eight'"),
    ("hidden_size: 1.5\n", [], "bad.yaml: line 1: key 'hidden_size' must be int, got 1.5"),
    ("compile: 1\n", [], "bad.yaml: line 1: key 'compile' must be bool, got 1"),
    ("report_to: tensorboard\n", [], "key 'report_to' must be one of wandb, none, got 'tensorboard'"),
    ("min_lr_ratio: 2.0\n", [], "bad.yaml: line 1: key 'min_lr_ratio' must be in [0, 1], got 2.0"),
    ("epochs: 1\nbatch_size: 4: 5\n", [], "bad.yaml: line 2: not valid YAML (mapping values are not allowed"),
    ("- 1\n- 2\n", [], "bad.yaml: must hold a mapping"),
    ("", ["--batch_size", "0"], "command line: --batch_size must be at least 1, got 0"),
    ("", ["--batch_size", "x"], "command line: argument --batch_size: invalid int value: 'x'"),
    ("", ["--no_such_flag", "1"], "command line: unrecognized arguments: --no_such_flag 1"),
    ("", ["--data_path", "a.jsonl", "--data_config", "b.yaml"],
     "command line: --data_path and --data_config are alternatives"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, yaml_text, argv, message):
    bad = write(tmp_path / "bad.yaml", yaml_text)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(MethodConfig, ["--config", bad, *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_missing_config_file_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(MethodConfig, ["--config", str(tmp_path / "nope.yaml")])
    assert exit_info.value.code == 2 and "nope.yaml: config file not found" in capsys.readouterr().err


# ---- data order ----------------------------------------------------------------------------------------------

def steps_of(num_samples, batch, accum, world, steps, seed=0):
    """For each step, the micro-batches of every rank in order (micro-step major, then rank)."""
    samplers = [GlobalBatchSampler(num_samples, batch, accum, world, r, seed) for r in range(world)]
    out = []
    for _ in range(steps):
        per_rank = [s.next_step() for s in samplers]
        out.append([per_rank[r][m] for m in range(accum) for r in range(world)])
    return out, samplers[0]


def test_ranks_times_accumulation_read_what_one_rank_reads_with_more_accumulation():
    two_ranks, _ = steps_of(100, batch=3, accum=2, world=2, steps=20)
    one_rank, _ = steps_of(100, batch=3, accum=4, world=1, steps=20)
    assert two_ranks == one_rank
    # 100 samples, global batch 12: 8 steps per epoch, the last 4 samples of each epoch are skipped
    epoch0 = sorted(i for step in one_rank[:8] for micro in step for i in micro)
    assert len(epoch0) == 96 and len(set(epoch0)) == 96
    epoch1 = [i for step in one_rank[8:16] for micro in step for i in micro]
    assert epoch1 != [i for step in one_rank[:8] for micro in step for i in micro]   # reshuffled


def test_sampler_resumes_at_the_same_sample_with_another_world_size():
    reference, _ = steps_of(50, batch=2, accum=2, world=1, steps=9)        # global batch 4: 12 steps / epoch
    flat = lambda steps: [i for step in steps for micro in step for i in micro]
    _, first = steps_of(50, batch=2, accum=2, world=1, steps=5)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["epoch_samples"] == 20 and state["samples_seen"] == 20
    resumed = [GlobalBatchSampler(50, 2, 1, 2, r, seed=0) for r in range(2)]  # 2 ranks, same global batch
    for s in resumed:
        s.load_state_dict(state)
    rest = []
    for _ in range(4):
        per_rank = [s.next_step() for s in resumed]
        rest.append([per_rank[r][0] for r in range(2)])
    assert flat(rest) == flat(reference[5:9])


def test_sampler_refuses_too_little_data_and_other_data_on_resume():
    with pytest.raises(jsonl.DataError, match="fewer than one global batch of 16"):
        GlobalBatchSampler(10, 4, 2, 2, 0, 0)
    s = GlobalBatchSampler(40, 4, 1, 1, 0, seed=1)
    with pytest.raises(config.ConfigError, match="differs from this run"):
        s.load_state_dict({**s.state_dict(), "num_samples": 41})


# ---- metrics -------------------------------------------------------------------------------------------------

def test_flops_per_token_formula():
    model = CausalLM(load_model_config("tiny"))
    c = model.config
    n = sum(p.numel() for p in model.parameters())   # tied: the embedding matrix is used once, as the output head
    assert flops_per_token(model, 128) == 6 * n + 12 * c.num_hidden_layers * c.hidden_size * 128
    untied = CausalLM(load_model_config("tiny", {"tie_word_embeddings": False}))
    # untied: one more V x H matrix, but the input embedding is a lookup, not a matrix product
    assert untied.num_parameters() == n + c.vocab_size * c.hidden_size
    assert flops_per_token(untied, 128) == flops_per_token(model, 128)


def test_run_logger_writes_one_json_record_per_log_step(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), report_to="none")
    logger = reporting.RunLogger(cfg, CPU, total_steps=10, start_step=0, flops_per_token=1e6)
    for step in (1, 2):
        time.sleep(0.01)
        logger.tick(tokens=1000, samples=10)
        logger.log_train(step, loss=3.0 - step, lr=1e-3, grad_norm=0.5, epoch=0.1 * step)
    logger.log_eval(2, {"loss": 2.5})
    logger.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["kind"], r["loss"]) for r in records] == [(1, "train", 2.0), (2, "train", 1.0),
                                                                     (2, "eval", 2.5)]
    r = records[1]
    assert 0 < r["tokens_per_sec"] < 1000 / 0.01
    assert r["samples_per_sec"] == pytest.approx(r["tokens_per_sec"] / 100)
    assert r["mfu_percent"] == pytest.approx(100 * 1e6 * r["tokens_per_sec"] / reporting.CPU_ASSUMED_PEAK_FLOPS)


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "kind": "train", "loss": s}) + "\n" for s in range(1, 8))
                    + '{"step": 8, "kind": "tr')   # a line cut short by kill -9
    checkpointing.truncate_metrics(str(path), 5)
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3, 4, 5]


# ---- checkpoints and resume ----------------------------------------------------------------------------------

def test_resume_state_round_trip_without_pickle():
    torch.manual_seed(0)
    toy = Toy()
    opt = torch.optim.AdamW(param_groups(toy, 0.1), lr=1e-2, betas=(0.9, 0.95))

    def step():
        loss = toy.head(toy.norm(toy.proj(toy.embed(torch.arange(10))))).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    for _ in range(3):
        step()
    tensors, groups, scalars = checkpointing.optimizer_state_tensors(opt)
    groups = json.loads(json.dumps(groups))          # what resume_state.json holds
    saved_params = [p.detach().clone() for p in toy.parameters()]
    expected = [step() for _ in range(3)]

    with torch.no_grad():
        for p, saved in zip(toy.parameters(), saved_params):
            p.copy_(saved)
    opt = torch.optim.AdamW(param_groups(toy, 0.1), lr=5.0)   # a different lr: the state must restore it
    opt.load_state_dict(checkpointing.optimizer_state_dict(tensors, groups, scalars))
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert [step() for _ in range(3)] == expected


def test_rng_state_round_trip():
    import random
    import numpy as np
    json_part, tensors = checkpointing.rng_state()
    json_part = json.loads(json.dumps(json_part))
    draws = (random.random(), np.random.rand(), torch.rand(3).tolist())
    distributed.seed_everything(123)
    checkpointing.set_rng_state(json_part, tensors)
    assert (random.random(), np.random.rand(), torch.rand(3).tolist()) == draws


class ToyData:
    """Fixed random token sequences, as a PackedTokenDataset would give them."""

    def __init__(self, n=32, seq_len=16, vocab=6400):
        self.tokens = torch.randint(3, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def train_steps(model, opt, scaler, sampler, data, steps, start, cfg):
    losses = []
    for step in range(start, start + steps):
        for indices in sampler.next_step():
            loss = model(**batches.load_batch(data, indices, CPU.device)).loss
            (loss / cfg.accumulation_steps).backward()
        lr = cosine_lr(step, 10, 2, cfg.learning_rate, cfg.min_lr_ratio)
        optim.optimizer_step(opt, scaler, lr, cfg.grad_clip)
        losses.append(loss.item())
    return losses


def fresh_run(cfg, data):
    distributed.seed_everything(cfg.seed)
    model = CausalLM(load_model_config("tiny", {"dropout": 0.1}))   # dropout: the RNG state matters
    opt = optim.build_optimizer(model, cfg, CPU.device)
    scaler = optim.make_grad_scaler(CPU.device, torch.float32)
    sampler = GlobalBatchSampler(len(data), cfg.batch_size, cfg.accumulation_steps, 1, 0, cfg.seed)
    return model, opt, scaler, sampler


@pytest.mark.slow
def test_checkpoint_and_restore_repeat_the_uninterrupted_losses_exactly(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), batch_size=4, accumulation_steps=2, learning_rate=1e-2, report_to="none",
                      keep_checkpoints=2)
    data = ToyData()
    model, opt, scaler, sampler = fresh_run(cfg, data)
    logger = reporting.RunLogger(cfg, CPU, 10, 0, 1.0)
    train_steps(model, opt, scaler, sampler, data, 3, 0, cfg)
    path = checkpointing.save_training_checkpoint(cfg, CPU, 3, model, None, opt, scaler, sampler, logger, "test")
    expected = train_steps(model, opt, scaler, sampler, data, 4, 3, cfg)      # crosses an epoch boundary at step 4

    # everything in the checkpoint is JSON or safetensors; nothing is pickled
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "minitrain.json",
                                        "model.safetensors", "resume_state.json", "resume_state.safetensors"]
    with safe_open(os.path.join(path, "resume_state.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"rng.0.torch_cpu", "optimizer.0.exp_avg", "optimizer.0.exp_avg_sq", "optimizer.0.step"} <= keys
    assert open(tmp_path / "latest").read().strip() == "step_000003"
    state = json.load(open(os.path.join(path, "resume_state.json")))
    assert state["step"] == 3 and state["data"]["epoch_samples"] == 24 and state["world_size"] == 1

    distributed.seed_everything(999)                                              # the checkpoint must override this
    model2, opt2, scaler2, sampler2 = fresh_run(cfg, data)
    resume = checkpointing.load_resume_state(str(tmp_path))
    checkpointing.restore_training_state(resume, cfg, model2, opt2, scaler2, sampler2, CPU)
    assert resume.step == 3
    assert train_steps(model2, opt2, scaler2, sampler2, data, 4, 3, cfg) == expected


def test_an_exception_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = TrainConfig(out_dir=str(tmp_path), batch_size=4, report_to="none", keep_checkpoints=1)
    data = ToyData()
    model, opt, scaler, sampler = fresh_run(cfg, data)
    logger = reporting.RunLogger(cfg, CPU, 10, 0, 1.0)
    train_steps(model, opt, scaler, sampler, data, 1, 0, cfg)
    checkpointing.save_training_checkpoint(cfg, CPU, 1, model, None, opt, scaler, sampler, logger, "test")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, opt, scaler, sampler, data, 1, 1, cfg)

    def crash(directory, tensors, state):
        open(os.path.join(directory, "resume_state.json"), "w").write('{"half": ')
        raise OSError("disk full")
    monkeypatch.setattr(checkpointing, "write_resume_state", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.save_training_checkpoint(cfg, CPU, 2, model, None, opt, scaler, sampler, logger, "test")
    assert not (tmp_path / "step_000002").exists()
    assert checkpointing.read_latest(str(tmp_path)) == str(tmp_path / "step_000001")
    loaded, _ = load_model(str(tmp_path / "step_000001"), with_tokenizer=False)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    monkeypatch.undo()
    checkpointing.save_training_checkpoint(cfg, CPU, 3, model, None, opt, scaler, sampler, logger, "test", final=True)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("step_")) == ["step_000003"]  # leftovers pruned
    assert os.path.realpath(tmp_path / "final") == str(tmp_path / "step_000003")


SAVE_FOREVER = """
import sys, torch
from minitrain.model.config import load_model_config
from minitrain.model.transformer import CausalLM
from minitrain.trainer import batches, checkpointing, configuration, distributed, optim, reporting
from minitrain.dataset import jsonl
from minitrain.model import config
cfg = configuration.TrainConfig(out_dir=sys.argv[1], report_to="none", keep_checkpoints=2, batch_size=2)
dist = distributed.DistInfo(0, 0, 1, torch.device("cpu"))
model = CausalLM(load_model_config("tiny"))
opt = optim.build_optimizer(model, cfg, dist.device)
scaler = optim.make_grad_scaler(dist.device, torch.float32)
sampler = batches.GlobalBatchSampler(100, 2, 1, 1, 0, 0)
logger = reporting.RunLogger(cfg, dist, 10**6, 0, 1.0)
for step in range(1, 10**6):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)                     # every weight equals the step it was saved at
    sampler.next_step()
    checkpointing.save_training_checkpoint(cfg, dist, step, model, None, opt, scaler, sampler, logger, "test")
    print(step, flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_saves_leaves_latest_complete(tmp_path):
    script = tmp_path / "save_forever.py"
    script.write_text(SAVE_FOREVER)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:                 # let 8 saves complete, then kill in the middle of the next ones
        if line.strip() == "8":
            break
    time.sleep(0.013)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = checkpointing.read_latest(str(out))
    step = int(os.path.basename(latest).split("_")[1])
    assert step >= 8
    model, _ = load_model(latest, with_tokenizer=False)
    assert all(torch.all(p == step) for p in model.parameters())
    state = json.load(open(os.path.join(latest, "resume_state.json")))
    assert state["step"] == step and state["data"]["samples_seen"] == 2 * step


TEARDOWN = """
import os, sys, torch
from minitrain.model.config import load_model_config
from minitrain.model.transformer import CausalLM
from minitrain.trainer.distributed import cleanup_distributed, setup_distributed

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
info = setup_distributed("cpu")
model = torch.nn.parallel.DistributedDataParallel(CausalLM(load_model_config("tiny")))   # what wrap_model builds
ids = torch.randint(0, 100, (2, 8))
model(ids, labels=ids).loss.backward()
model.cycle = [model]          # a reference cycle: only the garbage collector frees this wrapper and its group
del model
cleanup_distributed()
with open(f"{sys.argv[1]}/rank{info.rank}.txt", "w") as f:
    f.write(f"{before} {threads()}")
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_cleanup_distributed_stops_gloo_threads_after_ddp(tmp_path):
    """A gloo group still alive when the interpreter shuts down can abort the process after a finished run
    (distributed.cleanup_distributed says how): after DDP, even a DDP wrapper caught in a reference cycle, cleanup must
    leave no thread of the group running."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN)
    r = run_script(str(script), str(tmp_path), ranks=2, timeout=120)
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        before, after = map(int, (tmp_path / f"rank{rank}.txt").read_text().split())
        assert after == before, f"rank {rank}: {before} threads before the group, {after} after cleanup"
