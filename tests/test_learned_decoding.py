# Run: pytest tests/test_learned_decoding.py   (slow tests train the shared fixture first; the rest: -m "not slow")
# Learned decoding (model/decoding_heads.py): T* and the hinge against hand-computed numbers and against the sampler's
# own min-p / top-p rules, the goldilocks filter's fractions on hand-made batches (including the fill from the other
# bucket), heads saved and loaded with the model (absent when off; transformers still loads the checkpoint), a short
# train_sft.py run whose heads then predict lower temperatures on easy held-out tokens than on hard ones, and
# generation that samples with the heads' per-row temperatures.
import glob
import json
import math
import os

import pytest
import torch
from safetensors import safe_open

from minitrain.dataset.chat import ChatDataset, collate_chat
from minitrain.kernels.reference import filtered_probs_reference
from minitrain.model import generate as generate_module
from minitrain.model.checkpoint import load_model, load_weights, save_checkpoint
from minitrain.model.config import load_model_config
from minitrain.model.decoding_heads import (TEMPERATURE_FLOOR, DecodingHeads, HeadsObjective, attach_decoding_heads,
                                            easy_hard_temperatures, goldilocks_select, min_p_temperature_target,
                                            temperature_hinge_loss, top_p_target)
from minitrain.model.generate import generate
from minitrain.model.transformer import CausalLM
from minitrain.trainer import train_sft
from conftest import run_script, script_error

LN10 = math.log(10.0)


def tiny_with_heads(temperature=True, top_p=False, seed=0):
    torch.manual_seed(seed)
    model = CausalLM(load_model_config("tiny")).eval()
    heads = attach_decoding_heads(model, temperature, top_p, min_p_ratio=0.1)
    with torch.no_grad():   # weights large enough that the heads' outputs differ clearly between positions
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Targets and the hinge
# ---------------------------------------------------------------------------------------------------------------

def test_min_p_temperature_target_equals_its_formula_and_the_sampler_agrees():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 3.0, 1.0, 0.0], [1.0, 1.0, -2.0, 0.0]])
    labels = torch.tensor([2, 1, 1])
    target = min_p_temperature_target(logits, labels, 0.1)
    # (z_max - z_gt) / ln(1/r): (2 - 0) / ln 10, 0 (label is the top), 0 (label tied with the top)
    torch.testing.assert_close(target, torch.tensor([2.0 / LN10, 0.0, 0.0]))
    assert min_p_temperature_target(logits[:1], labels[:1], 0.5).item() == pytest.approx(2.0 / math.log(2.0))
    # the sampler's min-p filter keeps the label at T* (and above) and drops it just below
    row, t_star = logits[:1].double(), target[0].item()
    assert filtered_probs_reference(row, temperature=t_star * 1.001, min_p=0.1)[0, 2] > 0
    assert filtered_probs_reference(row, temperature=t_star * 0.999, min_p=0.1)[0, 2] == 0


def test_hinge_equals_its_formula_and_reaches_only_the_prediction():
    predicted = torch.tensor([0.3, 0.8, 1.5, 0.2], requires_grad=True)
    target = torch.tensor([2.0 / LN10, 0.0, 1.0, 0.0], requires_grad=True)
    easy = torch.tensor([False, True, False, True])
    loss = temperature_hinge_loss(predicted, target, easy, hinge_weight=2.0, reg_weight=0.5)
    # 2 * max(0, 0.8686 - 0.3) + 0 | 0 + 0.5 * 0.8 | 2 * max(0, 1 - 1.5) = 0 | 0 + 0.5 * 0.2
    expected = (2 * (2.0 / LN10 - 0.3) + 0.5 * 0.8 + 0.0 + 0.5 * 0.2) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(predicted.grad, torch.tensor([-2.0, 0.5, 0.0, 0.5]) / 4)
    assert target.grad is None                     # T* is a target, not something to move
    empty = torch.zeros(0, requires_grad=True)
    assert temperature_hinge_loss(empty, empty, empty.bool(), 1.0, 1.0).item() == 0.0


def test_top_p_target_is_the_mass_up_to_the_label_and_the_sampler_agrees():
    probs = torch.tensor([[0.5, 0.2, 0.3]])
    logits = probs.log()
    for label, expected in ((0, 0.5), (2, 0.8), (1, 1.0)):
        got = top_p_target(logits, torch.tensor([label]), 1.0)
        assert got.item() == pytest.approx(expected, abs=1e-6)
    # at T = 2 the probabilities are softmax(z / 2)
    p2 = torch.softmax(logits / 2, dim=-1)[0]
    assert top_p_target(logits, torch.tensor([2]), torch.tensor([2.0])).item() == pytest.approx(
        (p2[0] + p2[2]).item(), abs=1e-6)
    # the sampler keeps label 2 with top_p = P* and drops it at top_p = the mass strictly above it
    assert filtered_probs_reference(logits.double(), top_p=0.8)[0, 2] > 0
    assert filtered_probs_reference(logits.double(), top_p=0.5)[0, 2] == 0


# ---------------------------------------------------------------------------------------------------------------
# The goldilocks filter
# ---------------------------------------------------------------------------------------------------------------

def select(ranks, n, **kw):
    return goldilocks_select(torch.tensor(ranks), n, generator=torch.Generator().manual_seed(0), **kw)


def test_goldilocks_realises_its_fractions_when_both_buckets_suffice():
    ranks = [0] * 50 + [1, 2, 5, 9] * 20 + [10, 40] * 25          # 50 easy, 80 top-10, 50 other
    chosen, fractions = select(ranks, 40)
    picked = torch.tensor(ranks)[chosen]
    assert chosen.unique().numel() == 40
    assert ((picked == 0).sum(), ((picked > 0) & (picked < 10)).sum(), (picked >= 10).sum()) == (4, 36, 0)
    assert fractions == {"easy": 0.1, "topk": 0.9, "other": 0.0, "selected": 40.0}
    _, fractions = select(ranks, 40, easy_frac=0.25, topk_frac=0.5, topk=3)   # a remainder from any valid token
    assert fractions["selected"] == 40.0 and fractions["easy"] >= 0.25 and fractions["topk"] >= 0.5


def test_goldilocks_fills_a_short_bucket_from_the_other_then_from_any_token():
    # too few top-k tokens: the easy bucket fills in
    _, fractions = select([0] * 30 + [3] * 5 + [20] * 30, 20)
    assert fractions == {"easy": 0.75, "topk": 0.25, "other": 0.0, "selected": 20.0}
    # too few easy tokens: the top-k bucket fills in
    _, fractions = select([0] * 1 + [2] * 40 + [20] * 30, 20)
    assert fractions == {"easy": 0.05, "topk": 0.95, "other": 0.0, "selected": 20.0}
    # both short: every top-k token, then other valid tokens
    _, fractions = select([0] * 3 + [2] * 4 + [50] * 30, 20)
    assert fractions == {"easy": 0.15, "topk": 0.2, "other": 0.65, "selected": 20.0}
    # fewer valid tokens than asked for: all of them
    chosen, fractions = select([0, 4, 11], 20)
    assert sorted(chosen.tolist()) == [0, 1, 2] and fractions["selected"] == 3.0


def test_objective_on_a_batch_uses_selected_tokens_and_reports_buckets():
    model = tiny_with_heads(top_p=True)
    ids = torch.randint(3, 6000, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, compute_logits=False)
    objective = HeadsObjective(num_tokens=16, goldilocks=True, topk=50)
    loss, stats = objective(out.hidden_states, out.temperature, out.top_p, labels, model.lm_head.weight,
                            torch.Generator().manual_seed(0))
    assert stats["tokens"] == 16 and stats["easy"] + stats["topk"] + stats["other"] == 16
    loss.backward()
    heads = model.decoding_heads
    assert heads.temperature.weight.grad.abs().sum() > 0 and heads.top_p.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------

def safetensors_keys(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_heads_round_trip_and_are_absent_when_off(tmp_path):
    model = tiny_with_heads(top_p=True)
    save_checkpoint(model, None, str(tmp_path / "heads"))
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert config["minitrain_decoding_heads"] == {"temperature": True, "top_p": True, "min_p_ratio": 0.1}
    assert {"decoding_heads.temperature.weight", "decoding_heads.top_p.bias"} <= safetensors_keys(tmp_path / "heads")
    loaded, _ = load_model(str(tmp_path / "heads"), with_tokenizer=False)
    ids = torch.randint(3, 6000, (2, 9), generator=torch.Generator().manual_seed(0))
    a, b = model(ids), loaded(ids)
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.temperature, a.temperature)
    torch.testing.assert_close(b.top_p, a.top_p)
    assert a.temperature.min() > TEMPERATURE_FLOOR and a.temperature.std() > 0.01 and 0 < a.top_p.min()

    # a model without heads: no field, no tensor, and the same files as the model saved before heads existed
    plain = CausalLM(load_model_config("tiny")).eval()
    save_checkpoint(plain, None, str(tmp_path / "plain"))
    assert "minitrain_decoding_heads" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not any(k.startswith("decoding_heads") for k in safetensors_keys(tmp_path / "plain"))
    assert load_model(str(tmp_path / "plain"), with_tokenizer=False)[0].decoding_heads is None
    attach_decoding_heads(plain)
    plain.decoding_heads = None
    save_checkpoint(plain, None, str(tmp_path / "plain2"))
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "plain2" / name).read_bytes()

    # a model without heads (what other trainers build from --init_from) skips the heads' tensors
    bare = CausalLM(load_model_config("tiny")).eval()
    load_weights(bare, str(tmp_path / "heads"))
    torch.testing.assert_close(bare(ids).logits, a.logits)
    assert bare.decoding_heads is None


def test_transformers_loads_a_checkpoint_with_heads_and_gives_equal_logits(tmp_path):
    import transformers
    model = tiny_with_heads(top_p=True)
    save_checkpoint(model, None, str(tmp_path / "heads"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "heads", attn_implementation="eager").eval()
    ids = torch.randint(3, 6000, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-4)


def test_bad_heads_field_is_a_config_error(tmp_path):
    model = tiny_with_heads()
    save_checkpoint(model, None, str(tmp_path / "m"))
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["minitrain_decoding_heads"] = {"temperature": "yes"}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="minitrain_decoding_heads.temperature' must be true or false"):
        load_model(str(tmp_path / "m"), with_tokenizer=False)
    with pytest.raises(ValueError, match="needs a temperature head, a top-p head or both"):
        DecodingHeads(64, temperature=False, top_p=False)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------

PROMPTS = [[5, 17, 300, 42], [9, 8], [100, 200, 300, 400, 500, 600]]


def test_learned_decoding_equals_sampling_with_the_heads_per_row_temperatures():
    model = tiny_with_heads()
    with torch.no_grad():   # the heads' temperature at each prompt's last token, each prompt alone
        temps = torch.stack([model(torch.tensor([p])).temperature[0, -1] for p in PROMPTS])
    assert temps.max() - temps.min() > 0.05                     # the rows really get different temperatures
    for seed in range(5):
        learned = generate(model, PROMPTS, 1, learned_decoding=True, generator=torch.Generator().manual_seed(seed))
        explicit = generate(model, PROMPTS, 1, temperature=temps, min_p=0.1,
                            generator=torch.Generator().manual_seed(seed))
        assert learned.completions == explicit.completions


def test_learned_decoding_passes_each_steps_predictions_to_the_sampler(monkeypatch):
    model = tiny_with_heads(top_p=True)
    calls = []

    def recording_sample(logits, temperature, top_k, top_p, min_p, generator=None):
        calls.append((temperature.clone(), top_p.clone(), min_p))
        return real_sample(logits, temperature, top_k, top_p, min_p, generator=generator)

    real_sample = generate_module.sample
    monkeypatch.setattr(generate_module, "sample", recording_sample)
    out = generate(model, PROMPTS, 6, learned_decoding=True, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 6 and all(c[2] == 0.1 for c in calls)   # min-p: the ratio the heads were trained for
    with torch.no_grad():
        for row, (prompt, completion) in enumerate(zip(PROMPTS, out.completions)):
            full = model(torch.tensor([prompt + completion]))
            for step in range(6):      # the step's settings = the heads at the position before the new token
                position = len(prompt) + step - 1
                assert calls[step][0][row].item() == pytest.approx(full.temperature[0, position].item(), abs=1e-5)
                assert calls[step][1][row].item() == pytest.approx(full.top_p[0, position].item(), abs=1e-5)
    with pytest.raises(ValueError, match="learned_decoding needs a model with decoding heads"):
        generate(CausalLM(load_model_config("tiny")), PROMPTS, 2, learned_decoding=True)


# ---------------------------------------------------------------------------------------------------------------
# train_sft.py: the heads learn, the base stays, flags are checked, evaluate.py uses them
# ---------------------------------------------------------------------------------------------------------------

def held_out_temperatures(model, tokenizer, prepared) -> dict[str, float]:
    """Mean predicted T over the validation conversations' assistant tokens, easy (label top-1) vs hard."""
    val = sorted(glob.glob(os.path.join(prepared, "sft*", "val.jsonl")))[0]
    data = ChatDataset(val, tokenizer, 128)
    pooled = {}
    for start in range(0, len(data), 16):
        batch = collate_chat([data[i] for i in range(start, min(start + 16, len(data)))], tokenizer.pad_id)
        with torch.no_grad():
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"], compute_logits=False)
        stats = easy_hard_temperatures(out.hidden_states, out.temperature, batch["labels"], model.lm_head.weight)
        for k, v in stats.items():
            pooled[k] = pooled.get(k, 0.0) + v
    return {"easy": pooled["temp_easy_sum"] / pooled["easy"], "hard": pooled["temp_hard_sum"] / pooled["hard"],
            "n_easy": pooled["easy"], "n_hard": pooled["hard"]}


@pytest.fixture(scope="module")
def heads_run(trained_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "run"
    r = run_script("train_sft.py", "--init_from", trained_checkpoints["sft"], "--out_dir", str(out),
                   "--prepared_dir", trained_checkpoints["prepared"], "--use_prepared",    # the fixture's SFT data
                   "--max_steps", "60", "--batch_size", "16",
                   "--max_seq_len", "128", "--learning_rate", "1e-2", "--warmup_steps", "5", "--log_interval", "10",
                   "--eval_interval", "0", "--eval_batches", "4", "--eval_tasks", "", "--sample_prompts", "",
                   "--report_to", "none", "--train_temp", "--freeze_base", "--goldilocks_filter")
    assert r.returncode == 0, r.stderr
    return out, r


@pytest.mark.slow
def test_short_run_lowers_temperature_on_easy_tokens_and_raises_it_on_hard_ones(heads_run, trained_checkpoints):
    out, r = heads_run
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [rec for rec in records if rec["kind"] == "train"]
    assert len(train) == 6 and all(abs(rec["frac_easy"] + rec["frac_topk"] + rec["frac_other"] - 1) < 1e-6
                                   for rec in train)
    assert "frac_easy" in r.stdout and "temp_easy" in r.stdout and "temp_hard" in r.stdout
    assert train[-1]["temp_loss"] < train[0]["temp_loss"]

    before, tokenizer = load_model(trained_checkpoints["sft"])
    attach_decoding_heads(before)            # untrained heads: T about 1 everywhere
    start = held_out_temperatures(before, tokenizer, trained_checkpoints["prepared"])
    after, _ = load_model(str(out / "final"))
    end = held_out_temperatures(after, tokenizer, trained_checkpoints["prepared"])
    print(f"held-out mean T: before easy {start['easy']:.3f} hard {start['hard']:.3f}; after easy {end['easy']:.3f} "
          f"hard {end['hard']:.3f} ({end['n_easy']:.0f} easy, {end['n_hard']:.0f} hard tokens)")
    assert end["n_easy"] > 100 and end["n_hard"] > 100
    assert abs(start["hard"] - start["easy"]) < 0.05
    assert end["easy"] < start["easy"] - 0.3                   # the penalty pulled T down on easy tokens
    assert end["hard"] > end["easy"] + 0.15                    # and the hinge kept it up on hard ones

    # --freeze_base: the language model is bit for bit the one it started from
    base, _ = load_model(trained_checkpoints["sft"])
    after_state = after.state_dict()
    assert all(torch.equal(v, after_state[k]) for k, v in base.state_dict().items())


@pytest.mark.slow
def test_evaluate_compares_learned_decoding_with_fixed_temperature(heads_run, tmp_path):
    out, _ = heads_run
    common = ["--model", str(out / "final"), "--tasks", "arithmetic", "--num_samples", "16", "--max_new_tokens", "24"]
    r = run_script("eval/evaluate.py", *common, "--learned_decoding", "--json", str(tmp_path / "learned.json"))
    assert r.returncode == 0, r.stderr
    assert "learned decoding" in r.stdout
    report = json.loads((tmp_path / "learned.json").read_text())
    assert report["settings"]["learned_decoding"] is True and report["tasks"]["arithmetic"]["num_samples"] == 16
    r = run_script("eval/evaluate.py", *common, "--temperature", "1.0", "--json", str(tmp_path / "fixed.json"))
    assert r.returncode == 0, r.stderr
    r = run_script("eval/compare.py", str(tmp_path / "learned.json"), str(tmp_path / "fixed.json"))
    assert r.returncode == 0 and "learned" in r.stdout and "fixed" in r.stdout
    r = run_script("eval/chat.py", "--model", str(out / "final"), "--learned_decoding", "--prompt", "What is 2+3?",
                   "--max_new_tokens", "8")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_bad_learned_decoding_flags_are_one_line_errors(trained_checkpoints, tmp_path, capsys):
    # the flag checks run in this process (train_sft.main, as the script's entry point calls it: one stderr line,
    # exit status 2); the evaluation's check runs as a real subprocess, so a traceback there would show
    base = ["--init_from", trained_checkpoints["sft"], "--report_to", "none"]
    cases = [(["--train_temp", "--temp_objective", "likelihood"], "--temp_objective must be analytic_min_p_hinge"),
             (["--goldilocks_filter"], "--goldilocks_filter needs --train_temp or --train_top_p"),
             (["--freeze_base"], "--freeze_base needs --train_temp or --train_top_p"),
             (["--train_temp", "--min_p_ratio", "1.5"], "--min_p_ratio must be in (0, 1)"),
             (["--train_temp", "--goldilocks_easy_frac", "0.5", "--goldilocks_topk_frac", "0.9"],
              "must be at most 1")]
    for i, (flags, message) in enumerate(cases):
        assert message in script_error(train_sft.main, [*base, "--out_dir", str(tmp_path / str(i)), *flags], capsys)
        assert not (tmp_path / str(i)).exists()                  # nothing written before the error
    r = run_script("eval/evaluate.py", "--model", trained_checkpoints["sft"], "--tasks", "arithmetic",
                   "--learned_decoding")
    assert r.returncode == 2 and "has no decoding heads" in r.stderr and "Traceback" not in r.stderr
