# Run: pytest tests/test_dpo.py   (slow tests train the shared fixture first; the rest: -m "not slow")
# Preference training (trainer/train_dpo.py) and pair making (trainer/make_pairs.py): each loss equals its formula on
# hand-made log-probabilities; the β-DPO and risk-aware beta rules and the β-DPO filter equal their written rules on
# hand-made gaps; the answer mask covers exactly each answer and its <|im_end|>; the concatenated [2B, T] forward
# equals separate forwards; precomputed reference log-probs equal the live reference's and their cache is reused;
# end to end, DPO from the session's SFT model raises the validation reward accuracy without lowering held-out
# arithmetic accuracy, 2 ranks (torchrun, gloo) give the losses of 1 rank with twice the accumulation, make_pairs.py
# writes pairs that train_dpo.py trains on (and a resumed run repeats its losses and beta tracker), bad input is one
# line with exit status 2.
import copy
import json
import math
import os
import re
import shutil
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import run_script, script_error

from minitrain.dataset.embedded import ensure_embedded_data
from minitrain.dataset.formats import normalize_preference
from minitrain.dataset.jsonl import DataError
from minitrain.dataset.preference import PreferenceDataset, collate_pairs, tokenize_pair
from minitrain.model.checkpoint import load_model, load_tokenizer, save_checkpoint
from minitrain.model.config import load_model_config
from minitrain.model.lora import LoRAConfig, apply_lora
from minitrain.model.transformer import CausalLM
from minitrain.trainer import make_pairs, train_dpo
from minitrain.trainer.distributed import DistInfo
from minitrain.trainer.sequences import (cached_reference_logps, compute_reference_logps, live_reference_logps,
                                         reference_cache_path, reference_fingerprint)
from minitrain.trainer.train_dpo import (BetaTracker, DPOConfig, beta_dpo_beta, dpop_loss, filter_pairs, gap_weights,
                                         hinge_loss, ipo_loss, pair_losses, quantile_update, risk_beta, rpo_loss,
                                         sequence_logps, sft_loss, sigmoid_loss)

REPO = Path(__file__).resolve().parents[1]
TWO_RANKS_TOLERANCE = 1e-4      # logged losses of 2 ranks vs 1 rank with 2x accumulation (float summation order)
MIN_EVAL_ACCURACY = 0.65        # validation rewards/accuracies after the short DPO run (0 before: policy = reference)
TASK_PROBLEMS = 200             # held-out arithmetic problems, the same before and after, greedy
TASK_TOLERANCE = 0.04           # held-out arithmetic accuracy may not fall by more than 8 of the 200 problems
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(REPO / "dataset" / "tokenizer"))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- losses -------------------------------------------------------------------------------------------------------

# two pairs of summed log-probs: policy chosen/rejected, reference chosen/rejected
PC, PR, RC, RR = [-3.0, -5.0], [-4.0, -2.5], [-3.5, -4.0], [-3.0, -3.0]
H = [1.5, -1.5]                  # (pc - rc) - (pr - rr), worked out by hand
T = lambda xs: torch.tensor(xs)


def test_each_loss_equals_its_formula():
    beta = 0.5
    args = (T(PC), T(PR), T(RC), T(RR))
    # DPO: -log sigmoid(beta h)
    assert torch.allclose(sigmoid_loss(*args, beta), T([-math.log(sigmoid(beta * h)) for h in H]))
    # cDPO: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    eps = 0.1
    expected = [-(1 - eps) * math.log(sigmoid(beta * h)) - eps * math.log(sigmoid(-beta * h)) for h in H]
    assert torch.allclose(sigmoid_loss(*args, beta, label_smoothing=eps), T(expected))
    # DPOP: -log sigmoid(beta (h - lam max(0, rc - pc))); pair 0's chosen rose above the reference (-3 > -3.5): no
    # penalty, plain DPO; pair 1's fell by 1 (-5 < -4): h - 50 * 1 = -51.5
    assert torch.allclose(dpop_loss(*args, beta, 50.0), T([-math.log(sigmoid(beta * 1.5)),
                                                           -math.log(sigmoid(beta * -51.5))]))
    assert torch.allclose(dpop_loss(*args, beta, 0.0), sigmoid_loss(*args, beta))      # lambda 0 is DPO
    # IPO: (h - 1 / (2 beta))^2 = (1.5 - 1)^2, (-1.5 - 1)^2
    assert torch.allclose(ipo_loss(*args, beta), T([0.25, 6.25]))
    # hinge: max(0, 1 - beta h) = max(0, 0.25), max(0, 1.75)
    assert torch.allclose(hinge_loss(*args, beta), T([0.25, 1.75]))
    # rpo: each chosen answer's per-token NLL, 3 / 2 and 5 / 4
    assert torch.allclose(rpo_loss(T(PC), T([2.0, 4.0])), T([1.5, 1.25]))
    # sft (TRL's): one token mean over the batch, (3 + 5) / (2 + 4), spread as -pc_i * B / sum(n) over the pairs
    assert torch.allclose(sft_loss(T(PC), T([2.0, 4.0])), T([1.0, 5 / 3]))
    assert sft_loss(T(PC), T([2.0, 4.0])).mean().item() == pytest.approx(8 / 6)


def test_sft_term_is_trls_token_mean_and_rpo_the_mean_of_answer_means():
    # one pair of a 1-token chosen answer with NLL 3 beside a 9-token one with NLL 9 (1 a token):
    # TRL's "sft" = (3 + 9) / (1 + 9) = 1.2; RPO's = (3 / 1 + 9 / 9) / 2 = 2
    logps = {"pc": T([-3.0, -9.0]), "pr": T([-4.0, -9.5]), "rc": T([-3.0, -9.0]), "rr": T([-4.0, -9.5]),
             "nc": T([1.0, 9.0]), "nr": T([1.0, 9.0])}
    _, parts = pair_losses(["sft", "rpo"], [1.0, 1.0], logps, 0.1, 0.0, 50.0)
    assert parts["sft"].mean().item() == pytest.approx(1.2)
    assert parts["rpo"].mean().item() == pytest.approx(2.0)


def test_mixed_losses_and_ipo_on_length_averaged_log_probs():
    logps = {"pc": T(PC), "pr": T(PR), "rc": T(RC), "rr": T(RR), "nc": T([2.0, 4.0]), "nr": T([5.0, 1.0])}
    total, parts = pair_losses(["sigmoid", "sft"], [1.0, 0.1], logps, 0.5, 0.0, 50.0)
    assert torch.allclose(total, parts["sigmoid"] + 0.1 * parts["sft"])
    assert torch.allclose(parts["sft"], T([1.0, 5 / 3]))
    _, parts = pair_losses(["ipo"], [1.0], logps, 0.5, 0.0, 50.0)
    # per-token means: pair 0 h = (-1.5 + 1.75) - (-0.8 + 0.6) = 0.45; pair 1 h = (-1.25 + 1.0) - (-2.5 + 3.0) = -0.75
    assert torch.allclose(parts["ipo"], T([(0.45 - 1) ** 2, (-0.75 - 1) ** 2]))


def test_loss_flags_are_checked():
    assert train_dpo.parse_losses("sigmoid, sft", "1,0.1") == (["sigmoid", "sft"], [1.0, 0.1])
    for types, weights, message in [("dpo", "", "unknown loss 'dpo'"), ("sigmoid,sft", "1", "2 losses but"),
                                    ("sigmoid,sigmoid", "", "twice"), ("sigmoid", "-1", "non-negative")]:
        with pytest.raises(ValueError, match=message):
            train_dpo.parse_losses(types, weights)


# ---- dynamic beta -------------------------------------------------------------------------------------------------

def tracker(**flags) -> BetaTracker:
    return BetaTracker(DPOConfig(init_from="unused", beta=0.1, beta_min=0.01, beta_max=0.3, beta_momentum=0.9,
                                 **flags))


def test_beta_dpo_rule_on_hand_made_gaps():
    # as β-DPO's released code: M_0 and sigma start at 0 and take each batch in BEFORE beta (unbiased std)
    t = BetaTracker(DPOConfig(init_from="unused", beta=0.1, beta_min=0.01, beta_max=1.0, beta_momentum=0.9,
                              beta_mode="beta_dpo", beta_dpo_alpha=0.5))
    gen = torch.Generator().manual_seed(0)
    # batch 1, mean 3, std sqrt(14 / 3): M_0 = 0.1 * 3 = 0.3, sigma = 0.1 std; beta = 0.1 (1 + 0.5 (3 - 0.3)) = 0.235
    beta, keep = t.step(T([1.0, 2.0, 3.0, 6.0]), gen)
    assert beta == pytest.approx(0.235) and keep.all()
    assert (t.mean, t.std, t.count) == pytest.approx((0.3, 0.1 * math.sqrt(14 / 3), 1))
    # batch 2, mean 6, std sqrt(2): M_0 = 0.9 * 0.3 + 0.6 = 0.87; beta = 0.1 (1 + 0.5 (6 - 0.87)) = 0.3565
    beta, _ = t.step(T([5.0, 7.0]), gen)
    assert beta == pytest.approx(0.3565)
    assert (t.mean, t.std) == pytest.approx((0.87, 0.09 * math.sqrt(14 / 3) + 0.1 * math.sqrt(2)))
    # far below M_0: floored at beta_min; far above: capped at beta_max
    assert t.step(T([-10.0, -12.0]), gen)[0] == pytest.approx(0.01)
    assert t.step(T([40.0]), gen)[0] == pytest.approx(1.0)
    assert beta_dpo_beta(0.1, 0.5, 2.0, 1.0, 0.01, 1.0) == pytest.approx(0.15)


def test_beta_dpo_filter_weights_and_draws():
    gaps = T([0.0, 1.0, 2.0])
    weights = gap_weights(gaps, mean=0.0, std=1.0)                          # exp(-(M_i - M_0)^2 / (2 sigma^2))
    assert torch.allclose(weights, T([1.0, math.exp(-0.5), math.exp(-2.0)]))
    # 2 of 3 drawn without replacement with probability proportional to the weights: P(i kept) = p_i +
    # sum_j p_j w_i / (W - w_j)
    w = weights.double().tolist()
    W = sum(w)
    expected = [w[i] / W + sum(w[j] / W * w[i] / (W - w[j]) for j in range(3) if j != i) for i in range(3)]
    gen = torch.Generator().manual_seed(0)
    counts = sum(filter_pairs(gaps, 0.0, 1.0, 2 / 3, gen).double() for _ in range(4000))
    assert torch.allclose(counts / 4000, torch.tensor(expected, dtype=torch.float64), atol=0.03)
    # in the tracker: the outlier is never kept and beta follows the mean gap of the kept pairs (0, not 25)
    # (M_0 <- 0.9 * 0 + 0.1 * 25 = 2.5 and sigma <- 0.9 + 0.1 * 50 = 5.9 first; beta = 0.1 (1 + 0.2 (0 - 2.5)))
    t = tracker(beta_mode="beta_dpo", beta_dpo_alpha=0.2, beta_filter_keep=0.75)
    t.mean, t.std, t.count = 0.0, 1.0, 5
    beta, keep = t.step(T([0.0, 0.0, 0.0, 100.0]), gen)
    assert keep.tolist() == [True, True, True, False] and beta == pytest.approx(0.05)


def test_risk_aware_rule_on_hand_made_gaps():
    # q <- q + lr (tau - fraction of gaps below q): 2 of 4 below 1.0
    assert quantile_update(1.0, T([0.0, 0.5, 2.0, 3.0]), tau=0.25, lr=0.1) == pytest.approx(1.0 + 0.1 * (0.25 - 0.5))
    # beta = beta0 exp(kappa (q - M_batch)), bounded
    assert risk_beta(0.1, 0.5, 1.0, 0.0, 0.01, 1.0) == pytest.approx(0.1 * math.exp(0.5))
    assert risk_beta(0.1, 0.5, 1.0, 3.0, 0.01, 1.0) == pytest.approx(0.1 * math.exp(-1.0))
    assert risk_beta(0.1, 0.5, 10.0, 0.0, 0.01, 0.3) == 0.3 and risk_beta(0.1, 5.0, 0.0, 10.0, 0.01, 0.3) == 0.01
    t = tracker(beta_mode="risk", risk_quantile=0.25, risk_lr=0.2, risk_scale=0.5)
    gen = torch.Generator()
    # the first batch seeds q with its exact 0.25-quantile, 0.75 (linear interpolation of 0, 1, 2, 3)
    beta, _ = t.step(T([0.0, 1.0, 2.0, 3.0]), gen)
    assert beta == pytest.approx(0.1 * math.exp(0.5 * (0.75 - 1.5)))
    assert t.quantile == pytest.approx(0.75)                             # 1 of 4 below: tau - 0.25 = 0
    beta, _ = t.step(T([2.0, 2.0]), gen)                                 # above q: a smaller beta
    assert beta == pytest.approx(0.1 * math.exp(0.5 * (0.75 - 2.0))) and t.quantile == pytest.approx(0.75 + 0.05)
    # on a stream of N(0, 1) gaps the tracked quantile approaches the true one, -0.674
    q, stream = 0.0, torch.randn(4000, 8, generator=torch.Generator().manual_seed(0))
    for gaps in stream:
        q = quantile_update(q, gaps, 0.25, 0.02)
    assert q == pytest.approx(-0.674, abs=0.08)
    restored = tracker(beta_mode="risk")
    restored.load_state_dict(json.loads(json.dumps(t.state_dict())))   # what the checkpoint holds, JSON
    assert restored.state_dict() == t.state_dict()


# ---- data and forward passes ------------------------------------------------------------------------------------

PAIRS = [{"prompt": "What is 2 + 3?", "chosen": "<think>2+3=5</think>\n<answer>5</answer>",
          "rejected": "<answer>6</answer>"},
         {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 3 1 2"}],
          "chosen": "1 2 3", "rejected": "3 2 1, which is sorted from largest to smallest"},
         {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
          "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."}]


def write_pairs(path: Path, rows) -> str:
    canonical = [normalize_preference(r)[0] for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in canonical))
    return str(path)


def test_answer_mask_covers_each_answer_and_truncation_drops_pairs(tokenizer, tmp_path):
    data = PreferenceDataset(write_pairs(tmp_path / "pairs.jsonl", PAIRS), tokenizer, max_seq_len=128)
    batch = collate_pairs([data[i] for i in range(3)], tokenizer.pad_id)
    assert batch["input_ids"].shape[0] == 6 and batch["loss_mask"].shape[1] == batch["input_ids"].shape[1] - 1
    rows = [normalize_preference(r)[0] for r in PAIRS]
    expected = [r["chosen"][0]["content"] for r in rows] + [r["rejected"][0]["content"] for r in rows]
    for r in range(6):      # the tokens the loss covers are the answer and its <|im_end|>, nothing else
        targets = batch["input_ids"][r, 1:][batch["loss_mask"][r].bool()].tolist()
        assert tokenizer.decode(targets, skip_special=False) == expected[r] + "<|im_end|>"
    # a prompt as long as max_seq_len leaves no answer token: dropped; a long answer is cut, keeping the pair
    limit = len(tokenizer.chat_prompt_ids(normalize_preference(PAIRS[1])[0]["prompt"])) + 4
    long = [{"prompt": "word " * 80, "chosen": "a", "rejected": "b"}, PAIRS[1]]
    data = PreferenceDataset(write_pairs(tmp_path / "long.jsonl", long), tokenizer, max_seq_len=limit)
    assert (len(data), data.dropped, data.truncated) == (1, 1, 1)
    pair = data[0]
    assert len(pair["prompt"]) + len(pair["rejected"]) == limit and all(pair["rejected_mask"])


def test_concatenated_forward_equals_separate_forwards(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = CausalLM(load_model_config("tiny")).eval()
    data = PreferenceDataset(write_pairs(tmp_path / "pairs.jsonl", PAIRS), tokenizer, max_seq_len=128)
    batch = collate_pairs([data[i] for i in range(3)], tokenizer.pad_id)
    with torch.no_grad():
        sums, tokens = sequence_logps(model, batch)                   # one [6, T] pass, fused log-probs
        for b in range(3):
            for side, row in (("chosen", b), ("rejected", 3 + b)):
                pair = data[b]
                ids = torch.tensor([pair["prompt"] + pair[side]])    # alone, no padding, full logits
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                token_logp = logp.gather(-1, ids[0, 1:, None])[:, 0]
                mask = torch.tensor([0.0] * (len(pair["prompt"]) - 1) + pair[f"{side}_mask"], dtype=torch.float64)
                assert sums[row].item() == pytest.approx((token_logp * mask).sum().item(), abs=1e-4)
                assert tokens[row].item() == sum(pair[f"{side}_mask"])


def test_precomputed_reference_equals_live_and_the_cache_is_reused(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = CausalLM(load_model_config("tiny"))
    checkpoint = tmp_path / "ckpt"
    save_checkpoint(model, tokenizer, str(checkpoint))
    data_file = write_pairs(tmp_path / "pairs.jsonl", PAIRS * 3)
    data = PreferenceDataset(data_file, tokenizer, max_seq_len=128)
    collate = partial(collate_pairs, pad_id=tokenizer.pad_id)
    pre = compute_reference_logps(model, {"train": data}, 4, collate, CPU, nullcontext())["train"]   # [N, 2]
    assert model.training                                              # given back in the mode it came in
    reference = copy.deepcopy(model).eval()
    for start in range(0, len(data), 2):                               # live, other batches (other padding)
        indices = list(range(start, min(start + 2, len(data))))
        live = live_reference_logps(reference, model, collate([data[i] for i in indices]))
        B = len(indices)
        assert torch.allclose(pre[indices], torch.stack([live[:B], live[B:]], 1), atol=1e-4)
    # under LoRA the reference is the model with its adapters off: the base model's log-probs
    lora = apply_lora(copy.deepcopy(model), LoRAConfig(rank=4, alpha=8, targets="all-linear"))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    assert torch.allclose(compute_reference_logps(lora, {"train": data}, 4, collate, CPU, nullcontext())["train"],
                          pre, atol=1e-4)

    # the cache: computed once, then reused while the fingerprint holds; another max_seq_len is another file
    fingerprint = reference_fingerprint({"train": data_file}, str(checkpoint), tokenizer.path, 128, torch.float32)
    path = reference_cache_path(str(tmp_path), fingerprint)
    calls = []
    compute = lambda: calls.append(1) or {"train": pre}
    _, reused = cached_reference_logps(path, fingerprint, compute, CPU)
    assert not reused and calls == [1] and os.path.isfile(path)
    second, reused = cached_reference_logps(path, fingerprint, compute, CPU)
    assert reused and calls == [1] and torch.equal(second["train"], pre)
    other = reference_fingerprint({"train": data_file}, str(checkpoint), tokenizer.path, 64, torch.float32)
    assert reference_cache_path(str(tmp_path), other) != path
    save_checkpoint(model, tokenizer, str(checkpoint))                 # the reference rewritten: a new fingerprint
    assert reference_fingerprint({"train": data_file}, str(checkpoint), tokenizer.path, 128,
                                 torch.float32) != fingerprint


# ---- the scripts, end to end --------------------------------------------------------------------------------------

def embedded_rows() -> list[dict]:
    return [json.loads(line) for line in open(ensure_embedded_data(str(REPO / "data" / "embedded"))["dpo"])]


def metrics(out) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"]


def common(checkpoints, out, *extra) -> list[str]:
    return ["--init_from", checkpoints["sft"], "--prepared_dir", checkpoints["prepared"], "--out_dir", str(out),
            "--report_to", "none", "--eval_tasks", "", "--log_interval", "1", "--warmup_steps", "2", *extra]


@pytest.mark.slow
def test_dpo_raises_reward_accuracy_and_keeps_task_accuracy(trained_checkpoints, tmp_path):
    """The embedded pairs of one-digit arithmetic ("What is 7 + 4?") and sorting (599 pairs): 120 held out for
    validation, 40 steps of 8 pairs from the session's SFT model, sigmoid loss (DPO) at beta 0.5."""
    from minitrain.eval.task_eval import evaluate_tasks
    rows = [r for r in embedded_rows() if re.fullmatch(r"What is \d [-+*] \d\?", r["prompt"]) or
            r["prompt"].startswith("Sort")]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mixture = tmp_path / "one_digit_and_sort.yaml"
    mixture.write_text(f"phase: dpo\nvalidation_fraction: 0.2\nsources:\n  - name: one_digit_and_sort\n"
                       f"    path: {tmp_path / 'pairs.jsonl'}\n    weight: 1\n")
    out = tmp_path / "dpo"
    r = run_script("train_dpo.py", *common(trained_checkpoints, out, "--data_config", str(mixture), "--max_seq_len",
                                           "80", "--batch_size", "8", "--max_steps", "40", "--learning_rate", "1e-4",
                                           "--beta", "0.5", "--eval_interval", "40", "--eval_batches", "15",
                                           "--log_interval", "10"))
    assert r.returncode == 0, r.stderr
    assert "reference: a frozen copy" in r.stdout
    train, evals = metrics(out)
    names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "beta", "loss", "lr", "grad_norm", "tokens_per_sec"}
    assert names <= set(train[-1]) and names - {"beta", "lr", "grad_norm", "tokens_per_sec"} <= set(evals[-1])
    before, after = evals[0], evals[-1]
    assert (before["step"], after["step"]) == (0, 40) and "validation: 120 pairs" in r.stdout
    assert before["rewards/accuracies"] == 0.0 and before["loss"] == pytest.approx(math.log(2))   # policy = reference
    assert after["rewards/accuracies"] >= MIN_EVAL_ACCURACY, after
    assert after["rewards/margins"] > 0.5 and after["loss"] < math.log(2) - 0.1
    margins = [json.loads(line) for line in open(out / "margins.jsonl")]
    assert len(margins) == 40 * 8 and {m["step"] for m in margins} == set(range(1, 41))
    m = margins[-1]
    assert m["margin"] == pytest.approx(m["chosen"] - m["rejected"])

    # held-out arithmetic (eval.tasks' evaluation seed), the same problems before and after
    accuracy = {}
    for name, path in (("before", trained_checkpoints["sft"]), ("after", str(out / "final"))):
        model, tokenizer = load_model(path)
        results = evaluate_tasks(model, tokenizer, ["arithmetic"], TASK_PROBLEMS, max_new_tokens=40)
        accuracy[name] = results["arithmetic"]["accuracy"]
    print(f"arithmetic accuracy before {accuracy['before']:.3f}, after {accuracy['after']:.3f}; validation reward "
          f"accuracy {after['rewards/accuracies']:.3f}")
    assert accuracy["after"] >= accuracy["before"] - TASK_TOLERANCE, accuracy


@pytest.mark.slow
def test_two_ranks_give_the_losses_of_one_rank_with_twice_the_accumulation(trained_checkpoints, tmp_path):
    """torchrun --nproc_per_node 2 with a --data_config mixture (embedded pairs + a user file of whole chat
    conversations), losses sigmoid + sft. The 2 ranks precompute the reference log-probs (each half the pairs,
    gathered); the single process uses the live frozen copy: equal losses also check the precomputation."""
    user = [{"chosen": [{"role": "user", "content": f"What is {a} + {b}?"},
                        {"role": "assistant", "content": f"<answer>{a + b}</answer>"}],
             "rejected": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"<answer>{a + b + 1}</answer>"}]}
            for a in range(10) for b in range(4)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in user))
    mixture = tmp_path / "mixed.yaml"
    mixture.write_text(f"phase: dpo\nnum_samples: 200\nsources:\n  - name: embedded\n    embedded: dpo\n"
                       f"    weight: 3\n  - name: mine\n    path: {tmp_path / 'mine.jsonl'}\n    weight: 1\n")
    args = lambda out, *extra: common(trained_checkpoints, out, "--data_config", str(mixture), "--max_seq_len", "80",
                                      "--batch_size", "4", "--max_steps", "4", "--learning_rate", "1e-3",
                                      "--eval_interval", "0", "--eval_batches", "2", "--loss_type", "sigmoid,sft",
                                      "--loss_weights", "1,0.1", "--prepared_dir", str(tmp_path / "prepared"), *extra)
    r = run_script("train_dpo.py", *args(tmp_path / "two", "--precompute_ref_logps"), ranks=2)
    assert r.returncode == 0, r.stderr
    assert "computed once and saved" in r.stdout and "2 rank(s)" in r.stdout
    r = run_script("train_dpo.py", *args(tmp_path / "one", "--accumulation_steps", "2"))
    assert r.returncode == 0, r.stderr
    two, one = metrics(tmp_path / "two")[0], metrics(tmp_path / "one")[0]
    assert [x["step"] for x in two] == [x["step"] for x in one] == [1, 2, 3, 4]
    keys = ("loss", "loss/sigmoid", "loss/sft", "rewards/margins", "logps/chosen")
    worst = max(abs(a[key] - b[key]) for a, b in zip(two, one) for key in keys)
    print(f"2 ranks vs 1 rank x 2 accumulation: largest difference {worst:.2e} over {len(keys)} metrics x 4 steps")
    for a, b in zip(two, one):
        for key in keys:
            assert abs(a[key] - b[key]) < TWO_RANKS_TOLERANCE, (a["step"], key, a[key], b[key])
    assert one[-1]["rewards/margins"] != 0.0                            # it trained: equal numbers are not constants
    margins = [json.loads(line) for line in open(tmp_path / "two" / "margins.jsonl")]
    assert len(margins) == 4 * 8                                        # every pair of both ranks, every step


def test_make_pairs_leaves_out_answers_that_change_the_prompts_tokens(tokenizer):
    """A sampled answer that starts with a space merges with the newline after the assistant header: the DPO reader
    refuses such a pair (line 378 of a pipeline run's pairs did this), so make_pairs never picks that answer."""
    prompt = [{"role": "user", "content": "What is 88 - 65?"}]
    good, spaced = "<think>8-5=3,8-6=2,23</think>\n<answer>23</answer>", " <think>8-6=0,3</think>\n<answer>3</answer>"
    assert make_pairs.keeps_the_prompt(tokenizer, prompt, good)
    assert not make_pairs.keeps_the_prompt(tokenizer, prompt, spaced)
    with pytest.raises(DataError, match="prompt's tokens change"):
        tokenize_pair(tokenizer, {"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
                                  "rejected": [{"role": "assistant", "content": spaced}]}, 128)
    cfg = make_pairs.PairsConfig()
    record = {"answers": [good, spaced, "<answer>5</answer>"], "finished": [True, True, True],
              "keeps_prompt": [True, False, True], "scores": [1.0, 0.0, 0.0]}
    assert make_pairs.select_pair(record, cfg) == (0, 2)                 # the spaced wrong answer is not rejected
    record["keeps_prompt"] = [True, False, False]
    assert make_pairs.select_pair(record, cfg) == "too_few_finished"


@pytest.mark.slow
def test_make_pairs_output_trains_and_a_resumed_run_repeats_it(trained_checkpoints, tmp_path):
    rlaif = [json.loads(line) for line in open(ensure_embedded_data(str(REPO / "data" / "embedded"))["rlaif"])]
    prompts = tmp_path / "prompts.jsonl"
    arithmetic = [r for r in rlaif if r["task"] == "arithmetic"][:24]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in arithmetic))
    out = tmp_path / "pairs"
    r = run_script("make_pairs.py", "--init_from", trained_checkpoints["sft"], "--data_path", str(prompts),
                   "--prepared_dir", trained_checkpoints["prepared"], "--out_dir", str(out), "--samples_per_prompt",
                   "4", "--max_new_tokens", "32", "--reward_funcs", "tiered,format", "--reward_weights", "1,0.1")
    assert r.returncode == 0, r.stderr
    manifest = json.load(open(out / "manifest.json"))
    rows = [json.loads(line) for line in open(out / "pairs.jsonl")]
    counts = manifest["counts"]
    assert manifest["k"] == 4 and counts["answers"] == 4 * counts["prompts"] == 4 * 23      # one held out
    assert counts["pairs"] == len(rows) >= 6
    assert counts["pairs"] + counts["skipped_alike"] + counts["skipped_too_few_finished"] == counts["prompts"]
    for row in rows:
        assert row["score_chosen"] > row["score_rejected"]
        assert normalize_preference(row)[0] == {k: row[k] for k in ("prompt", "chosen", "rejected")}
    assert manifest["score_spread"]["min_gap"] > 0

    # train_dpo.py reads the file; beta_dpo with filtering, checkpoints at every step, then resume from step 1
    args = common(trained_checkpoints, tmp_path / "dpo", "--data_path", str(out / "pairs.jsonl"), "--max_seq_len",
                  "128", "--batch_size", "2", "--max_steps", "3", "--eval_interval", "0", "--eval_batches", "1",
                  "--save_interval", "1", "--keep_checkpoints", "0", "--beta_mode", "beta_dpo",
                  "--beta_filter_keep", "0.5", "--learning_rate", "1e-3")
    r = run_script("train_dpo.py", *args)
    assert r.returncode == 0, r.stderr
    full = metrics(tmp_path / "dpo")[0]
    state = json.load(open(tmp_path / "dpo" / "step_000003" / "resume_state.json"))["method_state"]
    assert state["mode"] == "beta_dpo" and state["count"] == 3
    assert all(x["beta"] > 0 for x in full) and "gap/running_mean" in full[0]
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "dpo", resumed, symlinks=True)
    for name in ("step_000002", "step_000003"):
        shutil.rmtree(resumed / name)
    os.unlink(resumed / "final")
    (resumed / "latest").write_text("step_000001\n")
    r = run_script("train_dpo.py", *[str(resumed) if a == str(tmp_path / "dpo") else a for a in args], "--resume")
    assert r.returncode == 0, r.stderr
    assert "beta tracker restored" in r.stdout
    keys = ("step", "loss", "beta", "rewards/margins", "gap/running_mean")
    assert [[x[k] for k in keys] for x in metrics(resumed)[0]] == [[x[k] for k in keys] for x in full]
    assert json.load(open(resumed / "step_000003" / "resume_state.json"))["method_state"] == state
    margins = [json.loads(line) for line in open(resumed / "margins.jsonl")]
    assert [m["step"] for m in margins] == [1, 1, 2, 2, 3, 3]


# ---- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bad_input_is_one_line_with_exit_2_before_training(trained_checkpoints, tmp_path, capsys):
    base = ["--init_from", trained_checkpoints["sft"], "--report_to", "none", "--prepared_dir",
            str(tmp_path / "prepared")]
    dpo = train_dpo.main
    assert "--loss_type unknown loss 'dpo'" in script_error(dpo, base + ["--loss_type", "dpo"], capsys)
    assert "--loss_type has 2 losses but --loss_weights has 1" in \
        script_error(dpo, base + ["--loss_type", "sigmoid,sft", "--loss_weights", "1"], capsys)
    assert "alternatives" in script_error(dpo, base + ["--reference_free", "--precompute_ref_logps"], capsys)
    assert "--beta_filter_keep filters pairs under --beta_mode beta_dpo only" in \
        script_error(dpo, base + ["--beta_filter_keep", "0.5"], capsys)
    assert "--label_smoothing applies to the sigmoid loss only" in \
        script_error(dpo, base + ["--loss_type", "ipo", "--label_smoothing", "0.1"], capsys)
    assert "--dpop_lambda must be a non-negative number, got -1.0" in \
        script_error(dpo, base + ["--loss_type", "dpop", "--dpop_lambda", "-1"], capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n" +
                   json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")
    err = script_error(dpo, base + ["--data_path", str(bad), "--out_dir", str(tmp_path / "a")], capsys)
    assert f"{bad}: 1 of 2 rows" in err and "line 2: field 'rejected' is missing" in err
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    err = script_error(make_pairs.main, ["--samples_per_prompt", "1"], capsys)
    assert "--samples_per_prompt must be at least 2" in err
    err = script_error(make_pairs.main, ["--reward_funcs", "no_such_reward"], capsys)
    assert "--reward_funcs" in err and "no_such_reward" in err
    # and as users run it: a subprocess, one line, no traceback
    r = run_script("train_dpo.py", "--init_from", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "b"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "model directory not found" in r.stderr
