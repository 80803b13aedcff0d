# Run: pytest tests/test_spo.py   (slow tests train the shared fixture first; the rest: -m "not slow")
# SPO (trainer/train_spo.py): the tracker's initialisation, forgetting factor and update equal the paper's rules,
# advantages are r minus the estimate before the update, normalised over the batch, prioritised sampling follows
# sqrt(p(1-p)) + eps; end to end the tracker is saved with the checkpoint and a resumed run continues exactly.
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script
from minitrain.dataset.embedded import ensure_embedded_data
from minitrain.trainer.train_spo import (BetaTracker, choose_prompts, forgetting_factor, normalise_advantages,
                                         policy_change, policy_loss, sampling_weights)

REPO = Path(__file__).resolve().parents[1]


def test_forgetting_factor_and_policy_change():
    assert forgetting_factor(0.0, 0.06, 0.875, 0.96) == 0.96                  # no change: remember (capped)
    assert forgetting_factor(0.06, 0.06, 0.1, 0.99) == pytest.approx(0.5)      # D = D_half: rho = 1/2
    assert forgetting_factor(0.03, 0.06, 0.1, 0.99) == pytest.approx(2 ** -0.5)
    assert forgetting_factor(5.0, 0.06, 0.875, 0.96) == 0.875                  # large change: floor
    assert policy_change(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, -0.1])) == pytest.approx(0.3)


def test_tracker_initialisation_update_and_estimate():
    tracker = BetaTracker(3, rho_min=0.8, rho_max=0.95, d_half=0.06)
    assert tracker.effective_count == pytest.approx(5.0)                       # N = 1 / (1 - rho_min)
    tracker.initialise(0, [1.0, 0.0, 1.0, 1.0])                   # s = 3 of n = 4: N (s + 1/2) / (n + 1), ...
    assert (tracker.alpha[0].item(), tracker.beta[0].item()) == pytest.approx((3.5, 1.5))
    assert tracker.p_hat([0]).item() == pytest.approx(0.7)
    tracker.update(0, r=0.0, rho=0.9)                                          # alpha <- rho alpha + r, ...
    assert (tracker.alpha[0].item(), tracker.beta[0].item()) == pytest.approx((0.9 * 3.5, 0.9 * 1.5 + 1))
    assert tracker.p_hat([0]).item() == pytest.approx(3.15 / (3.15 + 2.35))
    assert tracker.p_hat([1]).item() == 0.5                                    # untouched: Beta(1, 1)
    assert tracker.rho(None) == 0.95 and tracker.rho(0.06) == pytest.approx(0.8)   # 0.5 clipped up to rho_min
    assert BetaTracker(1, 0.8, 0.95, 0.06, constant_rho=0.9).rho(10.0) == 0.9
    tracker.last[2] = ([5, 6, 7], [-0.5, -1.0, -2.0])
    restored = BetaTracker(3, 0.8, 0.95, 0.06)
    restored.load_state_tensors(tracker.state_tensors())
    assert torch.equal(restored.alpha, tracker.alpha) and torch.equal(restored.beta, tracker.beta)
    assert restored.last == tracker.last


def test_tracker_initialisation_is_smoothed_as_in_the_authors_code():
    # N = 1 / (1 - 0.875) = 8; 0 of 2: alpha = 8 * 0.5 / 3, beta = 8 * 2.5 / 3, p_hat = 1/6 (not 0); 2 of 2: 5/6
    tracker = BetaTracker(2, rho_min=0.875, rho_max=0.96, d_half=0.06)
    tracker.initialise(0, [0.0, 0.0])
    tracker.initialise(1, [1.0, 1.0])
    assert tracker.alpha.tolist() == pytest.approx([4 / 3, 20 / 3])
    assert tracker.beta.tolist() == pytest.approx([20 / 3, 4 / 3])
    assert tracker.p_hat([0, 1]).tolist() == pytest.approx([1 / 6, 5 / 6])
    weights = sampling_weights(tracker.p_hat([0, 1]), 0.05)                    # sqrt(5/36) + 0.05, not the floor
    assert weights.tolist() == pytest.approx([0.4227, 0.4227], abs=1e-4)


def test_advantage_normalisation_does_not_move_when_every_advantage_shifts():
    raw = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]) - torch.tensor([0.25, 0.5, 0.75, 0.5, 0.125])
    A = normalise_advantages(raw)
    shifted = normalise_advantages(raw + 1000.0)                   # one-pass E[x^2] - mean^2 in float32 gave 0 std
    assert torch.allclose(shifted, A, atol=1e-4)
    assert A.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_global_token_normalisation_over_ranks_and_micro_steps_equals_one_rank_on_the_whole_batch():
    # 8 completions of ragged lengths 1..5 split over W = 2 ranks x A = 2 micro-steps of 2 rows each
    per_token = torch.arange(1.0, 41.0).view(8, 5) / 10
    lengths = [1, 5, 2, 4, 3, 3, 5, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    tokens = mask.sum().item()                                                  # 24, all ranks
    W, A = 2, 2

    def split(normalization):
        x = per_token.clone().requires_grad_(True)
        ranks = []
        for r in range(W):
            loss = sum(policy_loss(x[rows], mask[rows], normalization, tokens, A, W)
                       for rows in (slice(4 * r + 2 * m, 4 * r + 2 * m + 2) for m in range(A)))
            ranks.append(loss)
        (sum(ranks) / W).backward()                                 # DDP: the mean of the ranks' gradients
        return (sum(ranks) / W).item(), x.grad

    loss, grad = split("global")
    assert loss == pytest.approx(((per_token * mask).sum() / tokens).item())   # one token mean over the batch
    assert torch.allclose(grad, mask / tokens)                                  # every token weighs 1 / 24
    x = per_token.clone().requires_grad_(True)
    policy_loss(x, mask, "global", tokens, 1, 1).backward()                      # one rank, one micro-batch
    assert torch.allclose(grad, x.grad)
    # micro_batch: the mean of the 4 micro-batches' token means, where a token of a short micro-batch weighs more
    loss, grad = split("micro_batch")
    means = [((per_token * mask)[i:i + 2].sum() / mask[i:i + 2].sum()).item() for i in range(0, 8, 2)]
    assert loss == pytest.approx(sum(means) / 4)
    assert grad[0, 0].item() == pytest.approx(1 / 4 / 6) and grad[2, 0].item() == pytest.approx(1 / 4 / 6)


def test_advantages_are_normalised_over_the_batch():
    raw = torch.tensor([1.0, 0.0, 0.0, 0.0]) - torch.tensor([0.25, 0.25, 0.5, 0.0])
    A = normalise_advantages(raw)
    mean, std = raw.mean(), raw.std(unbiased=False)
    assert torch.allclose(A, (raw - mean) / (std + 1e-6))


def test_prioritised_sampling_weights_and_draws():
    tracker = BetaTracker(4, 0.8, 0.95, 0.06)
    p = torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.float64)
    tracker.alpha, tracker.beta = 5 * p, 5 * (1 - p)                         # p_hat = p
    weights = sampling_weights(tracker.p_hat([0, 1, 2, 3]), 0.05)
    assert torch.allclose(weights.double(), torch.tensor([0.05, 0.55, 0.05, (0.25 * 0.75) ** 0.5 + 0.05],
                                                         dtype=torch.float64))
    torch.manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[choose_prompts(tracker, [0, 1, 2, 3], 1, 0.05)[0]] += 1
    assert torch.allclose(counts / counts.sum(), weights.float() / weights.sum(), atol=0.03)
    assert sorted(choose_prompts(tracker, [0, 1, 2, 3], 4, 0.05)) == [0, 1, 2, 3]


def spo_args(checkpoints, prompts, out, *extra):
    return ["--init_from", checkpoints["sft"], "--data_path", prompts, "--prepared_dir", checkpoints["prepared"],
            "--out_dir", str(out), "--batch_size", "6", "--candidate_factor", "2", "--init_samples", "2",
            "--max_new_tokens", "24", "--max_steps", "3", "--log_interval", "1", "--eval_interval", "0",
            "--eval_tasks", "", "--save_interval", "1", "--keep_checkpoints", "0", "--report_to", "none",
            "--learning_rate", "1e-3", *extra]


@pytest.mark.slow
def test_tracker_is_saved_and_resume_continues_exactly(trained_checkpoints, tmp_path):
    rows = [json.loads(line) for line in open(ensure_embedded_data(str(REPO / "data" / "embedded"))["rlaif"])]
    rows = [row for row in rows if row["task"].startswith("arithmetic")][:40]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "spo"
    r = run_script("train_spo.py", *spo_args(trained_checkpoints, str(prompts), out))
    assert r.returncode == 0, r.stderr
    train = [x for x in map(json.loads, open(out / "metrics.jsonl")) if x["kind"] == "train"]
    assert {"spo/rho", "spo/D", "spo/p_hat", "spo/effective_count", "advantage/q10", "advantage/q90"} <= set(train[0])
    assert all(0.875 <= x["spo/rho"] <= 0.96 for x in train)
    final = load_file(str(out / "step_000003" / "resume_state.safetensors"))
    assert {"method.spo.alpha", "method.spo.beta", "method.spo.last_tokens"} <= set(final)
    assert final["method.spo.alpha"].numel() == 39            # 40 rows, one held out for validation
    assert not torch.equal(final["method.spo.alpha"],
                           load_file(str(out / "step_000001" / "resume_state.safetensors"))["method.spo.alpha"])

    # resume from step 1: steps 2 and 3 repeat the uninterrupted run, tracker included
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, symlinks=True)
    for name in ("step_000002", "step_000003"):
        shutil.rmtree(resumed / name)
    os.unlink(resumed / "final")
    (resumed / "latest").write_text("step_000001\n")
    r = run_script("train_spo.py", *spo_args(trained_checkpoints, str(prompts), resumed), "--resume")
    assert r.returncode == 0, r.stderr
    assert "tracker restored" in r.stdout
    again = load_file(str(resumed / "step_000003" / "resume_state.safetensors"))
    for key in ("method.spo.alpha", "method.spo.beta", "method.spo.last_tokens", "method.spo.last_logps"):
        assert torch.equal(again[key], final[key]), key
    resumed_train = [x for x in map(json.loads, open(resumed / "metrics.jsonl")) if x["kind"] == "train"]
    assert [x["loss"] for x in resumed_train] == [x["loss"] for x in train]
