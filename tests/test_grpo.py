# Run: pytest tests/test_grpo.py   (slow tests train the shared fixture first; the rest: -m "not slow")
# GRPO (trainer/train_grpo.py) and the RL pieces of the runtime: group advantages under each scaling, the clipped
# surrogate with separate low/high bounds, the k3 KL estimator, each loss aggregation, rollout layout and
# log-probabilities against full logits; end to end a short run on the embedded prompts, and 2 ranks whose
# parameters stay identical after updates (and a check that catches ranks that drift apart; the collectives GRPO and
# SPO use, over 2 ranks).
import json
import math
import textwrap

import pytest
import torch

from conftest import run_script
from minitrain.model.config import load_model_config
from minitrain.model.transformer import CausalLM
from minitrain.trainer.distributed import mean_var_over_ranks
from minitrain.trainer.sequences import gather_logprobs, pack_sequences, rollout, sample_completions
from minitrain.trainer.configuration import FlagError
from minitrain.trainer.train_grpo import GRPOConfig, aggregate_loss, group_advantages, k3_kl, weight_negative_advantages
from minitrain.trainer.train_ppo import clipped_surrogate


def test_group_advantages_under_each_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0])   # 3 groups of 4
    mean = torch.tensor([0.5, 0.5, 1.0]).repeat_interleave(4)
    assert torch.allclose(group_advantages(rewards, 4, "none"), rewards - mean)
    std = torch.tensor([math.sqrt(1 / 3), 0.0, math.sqrt(2 / 3)]).repeat_interleave(4)   # Bessel-corrected
    assert torch.allclose(group_advantages(rewards, 4, "group"), (rewards - mean) / (std + 1e-4))
    assert torch.all(group_advantages(rewards, 4, "group")[4:8] == 0)                     # equal rewards: no signal
    assert torch.allclose(group_advantages(rewards, 4, "batch"), (rewards - mean) / (rewards.std() + 1e-4))
    assert torch.allclose(group_advantages(rewards, 4, "batch", batch_std=2.0), (rewards - mean) / (2.0 + 1e-4))


def test_negative_advantages_are_weighted_and_positive_ones_kept():
    A = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.1, 1.0, 0.1, 0.0]), 4, "none")    # 2 groups of 4
    assert torch.allclose(A, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.55, 0.45, -0.45, -0.55]))
    assert torch.equal(weight_negative_advantages(A, 1.0), A)                                    # GRPO
    assert torch.allclose(weight_negative_advantages(A, 0.0), torch.tensor([0.75, 0, 0, 0, 0.55, 0.45, 0, 0]))
    assert torch.allclose(weight_negative_advantages(A, 0.2),
                          torch.tensor([0.75, -0.05, -0.05, -0.05, 0.55, 0.45, -0.09, -0.11]))
    with pytest.raises(FlagError, match="negative_advantage_weight"):
        GRPOConfig(negative_advantage_weight=1.5).validate()


def test_batch_scaled_advantages_do_not_move_when_every_reward_shifts():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0])   # 3 groups of 4
    batch_std = lambda r: mean_var_over_ranks(r, correction=1)[1].sqrt().item()       # what scale "batch" divides by
    assert batch_std(rewards) == pytest.approx(rewards.double().std().item(), rel=1e-12)
    for offset in (100.0, 1000.0):      # one float32 pass of E[r^2] - mean^2: 12% off at 100, exactly 0 at 1000
        shifted = rewards + offset
        assert batch_std(shifted) == pytest.approx(batch_std(rewards), rel=1e-6)
        A = group_advantages(shifted, 4, "batch")
        assert torch.allclose(A, group_advantages(rewards, 4, "batch", batch_std(rewards)), atol=1e-5)


def test_clipped_surrogate_and_its_clip_indicators():
    logp = torch.log(torch.tensor([[0.5, 1.5, 0.5, 1.5, 1.1]]))
    old = torch.zeros(1, 5)                                   # ratio = exp(logp - old) = 0.5, 1.5, 0.5, 1.5, 1.1
    A = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]])
    loss, low, high = clipped_surrogate(logp, old, A, epsilon_low=0.2, epsilon_high=0.28)
    # -min(r A, clip(r, 0.8, 1.28) A)
    expected = [-min(0.5, 0.8), -min(1.5, 1.28), -min(-0.5, -0.8), -min(-1.5, -1.28), -min(2.2, 2.2)]
    assert torch.allclose(loss, torch.tensor([expected]), atol=1e-6)
    assert low.tolist() == [[False, False, True, False, False]]     # ratio < 0.8 with A < 0
    assert high.tolist() == [[False, True, False, False, False]]    # ratio > 1.28 with A > 0
    # gradient through the unclipped branch only: d/dlogp of -(r A) = -r A
    logp = logp.clone().requires_grad_(True)
    clipped_surrogate(logp, old, A, 0.2, 0.28)[0].sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, 0.0, 0.0, 1.5, -2.2]]), atol=1e-6)


def test_k3_kl_is_the_schulman_estimator_and_its_mean_approaches_kl():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(k3_kl(logp, ref), torch.exp(ref - logp) - (ref - logp) - 1)
    assert k3_kl(torch.tensor([-0.7]), torch.tensor([-0.7])).item() == 0.0
    # over samples of p, mean k3 = KL(p || q)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    draws = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = k3_kl(p.log()[draws], q.log()[draws]).mean().item()
    assert estimate == pytest.approx((p * (p / q).log()).sum().item(), abs=0.01)


def test_a_huge_log_ratio_at_a_masked_column_leaves_loss_and_gradient_finite():
    # column 0 is a prompt column (mask 0) where policy and old/reference differ by 200 nats: exp(200) = inf in fp32
    logp = torch.tensor([[-250.0, -1.0, -2.0, -0.5], [-1.0, -0.7, -1.2, -300.0]])
    old = torch.tensor([[-50.0, -1.1, -1.9, -0.5], [-1.0, -0.8, -1.0, -100.0]])
    ref = torch.tensor([[-50.0, -1.3, -2.5, -0.4], [-1.0, -0.6, -1.0, -100.0]])
    mask = torch.tensor([[0.0, 1, 1, 1], [0.0, 1, 1, 0]])
    A = torch.tensor([[1.5], [-0.5]])

    def loss_of(logp, old, ref, mask):
        per_token = clipped_surrogate(logp, old, A, 0.2, 0.28, mask)[0] + 0.1 * k3_kl(logp, ref, mask)
        return aggregate_loss(per_token, mask, "bnpo", 4)

    x = logp.clone().requires_grad_(True)
    loss = loss_of(x, old, ref, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.all(x.grad[mask == 0] == 0)
    # the same computed on the unmasked columns alone (huge gaps replaced by 0, which the mask must make irrelevant)
    keep = mask.bool()
    y = torch.where(keep, logp, old).requires_grad_(True)
    expected = loss_of(y, old, torch.where(keep, ref, old), mask)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(x.grad, y.grad, atol=1e-7)
    # by hand: ratio r and k3 at the 5 unmasked tokens
    r = torch.exp(logp[keep] - old[keep])
    adv = A.expand(2, 4)[keep]
    d = ref[keep] - logp[keep]
    by_hand = (-torch.min(r * adv, r.clamp(0.8, 1.28) * adv) + 0.1 * (d.exp() - d - 1)).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_each_loss_aggregation():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate_loss(per_token, mask, "grpo", 4).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate_loss(per_token, mask, "bnpo", 4).item() == pytest.approx(10 / 4)
    assert aggregate_loss(per_token, mask, "dr_grpo", 8).item() == pytest.approx(10 / (2 * 8))
    assert aggregate_loss(per_token, mask, "dapo", 4, tokens_in_step=20).item() == pytest.approx(10 / 20)
    empty = torch.zeros(2, 4)
    assert aggregate_loss(per_token, empty, "grpo", 4).item() == 0.0    # all masked: no NaN


def test_rollout_layout_and_logprobs_equal_full_logits():
    torch.manual_seed(0)
    model = CausalLM(load_model_config("tiny")).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    out = rollout(model, prompts, max_new_tokens=5, temperature=1.0, eos_token_id=2, pad_token_id=0,
                  generator=torch.Generator().manual_seed(1))
    P = out.prompt_length
    assert P == 4 and out.input_ids[1, :2].tolist() == [0, 0] and out.attention_mask[1, :2].tolist() == [0, 0]
    for b, completion in enumerate(out.completions):
        assert out.input_ids[b, P:P + len(completion)].tolist() == completion
        assert out.completion_mask[b].tolist() == [0.0] * (P - 1) + [1.0] * len(completion) + \
            [0.0] * (out.completion_mask.shape[1] - P + 1 - len(completion))
    logp = gather_logprobs(model, out.input_ids, out.attention_mask, temperature=0.7)
    logits = model(out.input_ids, attention_mask=out.attention_mask).logits[:, :-1].float() / 0.7
    expected = logits.log_softmax(-1).gather(-1, out.input_ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(logp, expected, atol=1e-5)
    # pack_sequences gives the same layout for the same prompts and completions
    ids, attention, mask, P2 = pack_sequences(prompts, out.completions, 0, torch.device("cpu"))
    assert P2 == P and torch.equal(ids, out.input_ids) and torch.equal(mask, out.completion_mask)
    # sample_completions draws the same completions, unpacked; in chunks of batch_size prompts, greedy rows alike
    same = sample_completions(model, prompts, 5, 1.0, 2, 0, generator=torch.Generator().manual_seed(1))
    assert same.completions == out.completions and same.finished == out.finished.tolist()
    greedy = sample_completions(model, prompts * 2, 5, 0.0, 2, 0).completions
    assert sample_completions(model, prompts * 2, 5, 0.0, 2, 0, batch_size=3).completions == greedy


def grpo_args(checkpoints, out, *extra):
    return ["--init_from", checkpoints["sft"], "--prepared_dir", checkpoints["prepared"], "--out_dir", str(out),
            "--batch_size", "4", "--num_generations", "4", "--max_new_tokens", "24", "--max_steps", "3",
            "--log_interval", "1", "--eval_interval", "0", "--eval_tasks", "", "--save_interval", "3",
            "--report_to", "none", "--learning_rate", "1e-3", *extra]


def records(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


SHIFTED_REWARD = '''
def digits(prompts, completions, **rows):
    # the share of digits in multiples of 1/64, so that 1000 + r is exact in float32
    return [round(64 * sum(ch.isdigit() for ch in c) / max(1, len(c))) / 64 for c in completions]


def digits_plus_1000(prompts, completions, **rows):
    return [1000 + r for r in digits(prompts, completions)]
'''


@pytest.mark.slow
def test_shifting_every_reward_leaves_the_batch_scaled_run_unchanged(trained_checkpoints, tmp_path):
    """The same first step with rewards r and 1000 + r under --scale_rewards batch: the same loss (the one-pass
    float32 std gave -0.336 against -0.094)."""
    (tmp_path / "shifted_reward.py").write_text(SHIFTED_REWARD)
    losses = []
    for name in ("digits", "digits_plus_1000"):
        out = tmp_path / name
        r = run_script("train_grpo.py", *grpo_args(trained_checkpoints, out, "--max_steps", "1", "--save_interval",
                                                   "0", "--scale_rewards", "batch", "--reward_funcs",
                                                   f"shifted_reward:{name}", "--reward_weights", "1"),
                       env={"PYTHONPATH": str(tmp_path)})
        assert r.returncode == 0, r.stderr
        losses.append([x["loss"] for x in records(out) if x["kind"] == "train"][0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and abs(losses[0]) > 0.01


@pytest.mark.slow
def test_grpo_runs_and_logs_trl_metrics(trained_checkpoints, tmp_path):
    r = run_script("train_grpo.py", *grpo_args(trained_checkpoints, tmp_path / "grpo", "--beta", "0.05",
                                               "--loss_type", "grpo"))
    assert r.returncode == 0, r.stderr
    train = [x for x in records(tmp_path / "grpo") if x["kind"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3]
    assert {"reward", "reward_std", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
            "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std",
            "rollout_tokens_per_sec", "rewards/exact_answer/mean", "rewards/format/std"} <= set(train[0])
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6)      # the first update starts at the reference
    assert train[-1]["kl"] > 0                                   # then the policy moves away from it
    assert 0 < train[0]["completions/mean_length"] <= 24


@pytest.mark.slow
def test_two_ranks_keep_identical_parameters(trained_checkpoints, tmp_path):
    r = run_script("train_grpo.py", *grpo_args(trained_checkpoints, tmp_path / "ddp", "--max_steps", "2",
                                               "--save_interval", "1", "--filter_zero_std_groups",
                                               "--num_iterations", "2", "--beta", "0.05", "--scale_rewards",
                                               "batch"), ranks=2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("replicas: parameters identical on 2 ranks") == 2   # after steps 1 and 2


DRIFT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from minitrain.model.config import load_model_config
    from minitrain.model.transformer import CausalLM
    from minitrain.trainer.distributed import check_replicas, setup_distributed
    info = setup_distributed("cpu")
    torch.manual_seed(0)
    model = CausalLM(load_model_config("tiny"))
    check_replicas(model, info)                       # identical: passes
    if info.rank == 1:
        with torch.no_grad():
            model.lm_head.weight[0, 0] += 1e-3        # what an update outside DDP does
    try:
        check_replicas(model, info)
        result = "not caught"
    except RuntimeError as e:
        result = f"caught: {e}"
    with open(f"{sys.argv[1]}/rank{info.rank}.txt", "w") as f:
        f.write(result)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_check_replicas_catches_ranks_that_drift_apart(tmp_path):
    script = tmp_path / "drift.py"
    script.write_text(DRIFT)
    r = run_script(str(script), str(tmp_path), ranks=2, timeout=120)
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):     # every rank stops, not only the one that sees the difference
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith(
            "caught: parameters differ between rank 0 and ranks [1]")


COLLECTIVES = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from minitrain.trainer import distributed
    info = distributed.setup_distributed("cpu")
    mine = torch.tensor([1000.0, 1001.5, 1003.0]) + 4 * info.rank           # rank 1: 1004, 1005.5, 1007
    mean, var = distributed.mean_var_over_ranks(mine, correction=1)
    result = {"mean": mean.item(), "var": var.item(),
              "any": [distributed.any_rank(info.rank == 1, info.device), distributed.any_rank(False, info.device)],
              "json": distributed.all_gather_json([{"rank": info.rank}], info.device)}
    with open(f"{sys.argv[1]}/rank{info.rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_the_collectives_of_grpo_and_spo_over_two_ranks(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    r = run_script(str(script), str(tmp_path), ranks=2, timeout=120)
    assert r.returncode == 0, r.stderr
    both = torch.tensor([1000.0, 1001.5, 1003.0, 1004.0, 1005.5, 1007.0], dtype=torch.float64)
    for rank in (0, 1):     # every rank gets the statistics of all ranks' values, and every rank's records in order
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["mean"] == pytest.approx(both.mean().item()) and result["var"] == pytest.approx(both.var().item())
        assert result["any"] == [True, False] and result["json"] == [[{"rank": 0}], [{"rank": 1}]]


@pytest.mark.slow
def test_grpo_takes_its_reward_from_a_reward_model(trained_checkpoints, tmp_path):
    from minitrain.model.checkpoint import load_model
    from minitrain.model.heads import RewardModel, save_reward_model
    policy, tokenizer = load_model(trained_checkpoints["sft"])
    torch.manual_seed(0)
    save_reward_model(RewardModel.from_trunk(policy), tokenizer, str(tmp_path / "rm"))     # a random score head
    r = run_script("train_grpo.py", *grpo_args(trained_checkpoints, tmp_path / "grpo", "--max_steps", "1",
                                               "--reward_funcs", "", "--reward_model", str(tmp_path / "rm"),
                                               "--reward_model_weight", "2"))
    assert r.returncode == 0, r.stderr
    train = [x for x in records(tmp_path / "grpo") if x["kind"] == "train"][0]
    assert train["reward"] == pytest.approx(2 * train["rewards/reward_model/mean"], rel=1e-4)
    assert train["rewards/reward_model/std"] > 0 and "rewards/exact_answer/mean" not in train
    r = run_script("train_grpo.py", *grpo_args(trained_checkpoints, tmp_path / "none", "--reward_funcs", ""))
    assert r.returncode == 2 and "nothing scores the completions" in r.stderr
