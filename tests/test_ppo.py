# Run: pytest tests/test_ppo.py   (slow tests train the shared fixture first; the rest: -m "not slow")
# PPO with a critic (trainer/train_ppo.py, model/heads.py): GAE against the hand-written recursion (gamma, lambda
# below 1, a completion that ends early), the per-token KL rewards, clipped policy and value losses, masked whitening,
# explained variance, approximate KL and the adaptive KL controller against their formulas; end to end a short run
# logs TRL's metrics, --resume repeats it exactly (critic and its optimizer included), 2 ranks keep policy and critic
# identical, the shared-trunk critic under LoRA runs, and bad input is a one-line error.
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script
from minitrain.model.checkpoint import load_model
from minitrain.model.config import load_model_config
from minitrain.model.heads import RewardModel, ValueHead, ValueModel, save_reward_model
from minitrain.model.transformer import CausalLM
from minitrain.trainer.train_ppo import clipped_surrogate
from minitrain.trainer.train_ppo import (adaptive_kl_update, approx_kl, explained_variance, gae, main, masked_moments,
                                         per_token_rewards, value_loss, whiten)


def test_gae_equals_the_hand_written_recursion():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[9.0, 0.5, -0.2, 0.1, 1.0, 7.0], [9.0, 0.3, 2.0, 7.0, 7.0, 7.0]])
    values = torch.tensor([[5.0, 0.4, 0.3, -0.1, 0.6, 5.0], [5.0, 1.0, 0.5, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 1, 0], [0.0, 1, 1, 0, 0, 0]])        # row 1 ends early; 9, 7, 5: padding
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b, (start, end) in enumerate([(1, 5), (1, 3)]):
        r, v = rewards[b, start:end].tolist(), values[b, start:end].tolist()
        expected, running = [0.0] * len(r), 0.0
        for t in reversed(range(len(r))):
            next_value = v[t + 1] if t + 1 < len(r) else 0.0                # nothing after the last token
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            expected[t] = running
        assert advantages[b, start:end].tolist() == pytest.approx(expected, abs=1e-6)
        assert returns[b, start:end].tolist() == pytest.approx([a + x for a, x in zip(expected, v)], abs=1e-6)
    assert torch.all(advantages[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)
    # gamma = lambda = 1: A_t = (sum of the rewards from t on) - V_t, the Monte-Carlo return minus the baseline
    advantages, _ = gae(rewards, values, mask, 1.0, 1.0)
    assert advantages[0, 1:5].tolist() == pytest.approx([1.4 - 0.4, 0.9 - 0.3, 1.1 + 0.1, 1.0 - 0.6], abs=1e-6)


def test_per_token_rewards_pay_the_kl_and_score_the_last_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-1.0, -1.0, -3.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-1.0, -2.0, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1.0, 1, 0, 0]])
    rewards, kl = per_token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, -1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]     # log pi - log pi_ref, masked
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [0.0, -0.1 - 1.0, 0.0, 0.0]]))


def test_clipped_policy_and_value_losses_equal_their_formulas():
    logp = torch.log(torch.tensor([[0.5, 1.5, 0.5, 1.1]]))
    A = torch.tensor([[1.0, 1.0, -1.0, 2.0]])
    loss, low, high = clipped_surrogate(logp, torch.zeros(1, 4), A, 0.2, 0.2)   # -min(r A, clip(r, 0.8, 1.2) A)
    assert loss.tolist()[0] == pytest.approx([-0.5, -1.2, 0.8, -2.2], abs=1e-6)
    assert (low | high).tolist() == [[False, True, True, False]]             # policy/clipfrac counts these
    V = torch.tensor([1.0, 0.5, 3.0, -1.0])
    V_old = torch.tensor([0.0, 0.4, 2.0, -1.1])
    R = torch.tensor([2.0, 0.0, 0.0, 0.0])
    per_token, clipped = value_loss(V, V_old, R, cliprange_value=0.2)
    V_clip = [0.2, 0.5, 2.2, -1.0]
    expected = [0.5 * max((v - r) ** 2, (c - r) ** 2) for v, c, r in zip(V.tolist(), V_clip, R.tolist())]
    assert per_token.tolist() == pytest.approx(expected)
    assert clipped.tolist() == [True, False, False, False]                   # only where the clipped loss is larger
    Vg = V.clone().requires_grad_(True)
    value_loss(Vg, V_old, R, 0.2)[0].sum().backward()
    assert Vg.grad.tolist() == pytest.approx([0.0, 0.5, 3.0, -1.0])           # clipped branch: no gradient to V


def test_whitening_is_masked_and_padding_does_not_move_the_statistics():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [-50.0, 4.0, 5.0, 1e6]])
    mask = torch.tensor([[1.0, 1, 1, 0], [0.0, 1, 1, 0]])
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    w = whiten(x, mask)
    expected = (real - real.mean()) / torch.sqrt(real.var(unbiased=True) + 1e-8)
    assert w[mask.bool()].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert torch.all(w[mask == 0] == 0)
    other = x.clone()
    other[mask == 0] = torch.tensor([-7.0, 3.0, 0.0])                        # other padding, same result
    assert torch.equal(whiten(other, mask), w)
    kept = whiten(x, mask, shift_mean=False)                                  # unit variance, mean kept
    assert kept[mask.bool()].mean().item() == pytest.approx(3.0, abs=1e-6)


def test_whitening_does_not_move_when_every_value_shifts():
    x = torch.tensor([[0.5, -0.25, 1.0, 0.0], [0.125, 0.75, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1.0, 1, 1, 0]])
    shifted = whiten(x + 1000.0, mask)                    # one float32 pass of E[x^2] - mean^2 lost the variance
    assert torch.allclose(shifted, whiten(x, mask), atol=1e-4)
    mean, variance = masked_moments(x + 1e4, mask)
    real = x[mask.bool()].double()
    assert (mean, variance) == pytest.approx((1e4 + real.mean().item(), real.var().item()), rel=1e-9)


def test_explained_variance_and_approx_kl():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    values = torch.tensor([[1.5, 2.0, 2.0, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(1 - torch.tensor([-0.5, 0, 1.0]).var() / 1.0)
    assert math.isnan(explained_variance(values, torch.ones(1, 4), mask))
    logp, old = torch.tensor([-1.0, -0.5, -2.0]), torch.tensor([-1.0, -1.0, -1.0])
    ratio = torch.exp(logp - old)
    assert torch.allclose(approx_kl(logp, old), ratio - 1 - (logp - old))
    assert approx_kl(logp, old)[0] == 0 and torch.all(approx_kl(logp, old) >= 0)


def test_a_huge_log_ratio_at_a_padding_column_leaves_ppo_losses_finite():
    logp = torch.tensor([[-1.0, -0.5, -300.0]], requires_grad=True)     # column 2: padding, 299 nats from old
    old = torch.tensor([[-1.2, -0.4, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    A = torch.tensor([[0.5, -1.0, 0.0]])
    pg = clipped_surrogate(logp, old, A, 0.2, 0.2, mask)[0]
    kl = approx_kl(logp, old, mask)
    loss = ((pg + kl) * mask).sum() / mask.sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    r = torch.exp(torch.tensor([0.2, -0.1]))
    by_hand = (-torch.min(r * A[0, :2], r.clamp(0.8, 1.2) * A[0, :2]) + (r - 1 - r.log())).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_adaptive_kl_controller_update():
    # error = clip(KL / target - 1, -0.2, 0.2); kl_coef *= 1 + error * n_steps / horizon
    assert adaptive_kl_update(0.1, 12.0, 6.0, 512, 10000) == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    assert adaptive_kl_update(0.1, 0.0, 6.0, 512, 10000) == pytest.approx(0.1 * (1 - 0.2 * 512 / 10000))
    assert adaptive_kl_update(0.1, 6.6, 6.0, 100, 1000) == pytest.approx(0.1 * (1 + 0.1 * 100 / 1000))
    assert adaptive_kl_update(0.1, 6.0, 6.0, 100, 1000) == pytest.approx(0.1)


def test_value_head_starts_at_zero_and_the_critic_has_no_lm_head():
    torch.manual_seed(0)
    policy = CausalLM(load_model_config("tiny"))
    critic = ValueModel.from_trunk(policy)
    ids = torch.randint(3, 100, (2, 7))
    assert torch.equal(critic(ids, torch.ones_like(ids)), torch.zeros(2, 7))
    assert critic.model is policy.model and not hasattr(critic, "lm_head")   # the trunk is shared, not copied
    head = ValueHead(64)
    with torch.no_grad():
        head.out.weight.fill_(1.0)
    assert head(torch.randn(3, 5, 64)).shape == (3, 5)


@pytest.fixture(scope="module")
def reward_model_dir(trained_checkpoints, tmp_path_factory):
    """A reward checkpoint around the SFT trunk with a random score head (the PPO plumbing does not need a trained
    one; tests/test_reward.py trains one)."""
    torch.manual_seed(0)
    lm, tokenizer = load_model(trained_checkpoints["sft"])
    path = str(tmp_path_factory.mktemp("rm") / "reward")
    save_reward_model(RewardModel.from_trunk(lm), tokenizer, path)
    return path


def ppo_args(checkpoints, out, *extra):
    return ["--init_from", checkpoints["sft"], "--prepared_dir", checkpoints["prepared"], "--out_dir", str(out),
            "--batch_size", "4", "--max_new_tokens", "16", "--max_steps", "3", "--ppo_epochs", "2",
            "--num_mini_batches", "2", "--log_interval", "1", "--eval_interval", "0", "--eval_tasks=",
            "--save_interval", "1", "--keep_checkpoints", "0", "--report_to", "none", "--learning_rate", "1e-3",
            "--critic_learning_rate", "1e-3", "--warmup_steps", "0", "--critic_warmup_steps", "0",
            "--target_approx_kl", "0", *extra]


def records(out):
    return [x for x in map(json.loads, open(out / "metrics.jsonl")) if x["kind"] == "train"]


TRL_METRICS = {"loss/policy", "loss/value", "policy/entropy", "policy/approxkl", "policy/clipfrac", "val/clipfrac",
               "val/explained_variance", "val/mean", "returns/mean", "objective/scores", "objective/kl",
               "objective/kl_coef", "objective/rlhf_reward", "rollout_tokens_per_sec"}


@pytest.fixture(scope="module")
def ppo_run(trained_checkpoints, reward_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "run"
    args = ppo_args(trained_checkpoints, out, "--reward_model", reward_model_dir, "--target_kl", "0.5",
                    "--critic_warmup_steps", "1", "--missing_eos_penalty", "1.0")
    r = run_script("train_ppo.py", *args)
    assert r.returncode == 0, r.stderr
    return {"out": out, "args": args}


@pytest.mark.slow
def test_ppo_run_logs_trl_metrics(ppo_run):
    train = records(ppo_run["out"])
    assert [x["step"] for x in train] == [1, 2, 3]
    assert "loss/policy" not in train[0]                                      # critic warmup: the policy waits
    assert TRL_METRICS <= set(train[1]) and {"rewards/reward_model/mean", "rewards/exact_answer/mean"} <= set(train[1])
    assert train[1]["objective/kl"] == pytest.approx(0.0, abs=1e-5)          # still the reference after warmup
    assert abs(train[2]["objective/kl"]) > 0                                  # then the policy moves
    # adaptive KL: below target the coefficient shrinks by 20% of n_steps / horizon per step
    assert [x["objective/kl_coef"] for x in train[:2]] == pytest.approx([0.05, 0.05 * (1 - 0.2 * 4 / 10000)])
    assert train[0]["val/mean"] == 0.0 and train[2]["val/mean"] != 0.0       # the value head starts at 0, learns
    for x in train:
        assert x["objective/rlhf_reward"] == pytest.approx(x["objective/scores"]
                                                           - x["objective/kl_coef"] * x["objective/kl"], abs=1e-5)
    final = load_file(str(ppo_run["out"] / "step_000003" / "resume_state.safetensors"))
    assert "method.critic.value_head.out.weight" in final and "method.critic.model.embed_tokens.weight" in final
    assert any(k.startswith("method.critic_optimizer.") for k in final)


@pytest.mark.slow
def test_resume_restores_the_critic_and_repeats_the_run(ppo_run, tmp_path):
    out, resumed = ppo_run["out"], tmp_path / "resumed"
    shutil.copytree(out, resumed, symlinks=True)
    for name in ("step_000002", "step_000003"):
        shutil.rmtree(resumed / name)
    os.unlink(resumed / "final")
    (resumed / "latest").write_text("step_000001\n")
    args = [a if a != str(out) else str(resumed) for a in ppo_run["args"]]
    r = run_script("train_ppo.py", *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "critic restored" in r.stdout
    assert [x["loss"] for x in records(resumed)] == [x["loss"] for x in records(out)]
    before = load_file(str(out / "step_000003" / "resume_state.safetensors"))
    after = load_file(str(resumed / "step_000003" / "resume_state.safetensors"))
    for key in before:
        if key.startswith(("method.", "optimizer.")):
            assert torch.equal(before[key], after[key]), key


@pytest.mark.slow
def test_two_ranks_keep_policy_and_critic_identical(trained_checkpoints, tmp_path):
    r = run_script("train_ppo.py", *ppo_args(trained_checkpoints, tmp_path / "ddp", "--max_steps", "2",
                                             "--target_approx_kl", "1e-9"), ranks=2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("replicas: policy and critic parameters identical on 2 ranks") == 2   # steps 1 and 2
    # the approximate KL after the first epoch (all ranks) exceeds --target_approx_kl: the second epoch is skipped
    assert [x["ppo/epochs"] for x in records(tmp_path / "ddp")] == [1.0, 1.0]


@pytest.mark.slow
def test_shared_critic_under_lora(trained_checkpoints, tmp_path):
    out = tmp_path / "shared"
    r = run_script("train_ppo.py", *ppo_args(trained_checkpoints, out, "--max_steps", "2", "--shared_critic",
                                             "--lora_rank", "4", "--save_interval", "2"))
    assert r.returncode == 0, r.stderr
    assert (out / "step_000002" / "adapter_model.safetensors").exists()      # the policy: PEFT adapters
    tensors = load_file(str(out / "step_000002" / "resume_state.safetensors"))
    assert {"method.value_head.fc.weight", "method.value_head.out.weight"} <= set(tensors)
    assert not any(k.startswith("method.critic") for k in tensors)
    assert TRL_METRICS <= set(records(out)[-1])


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--num_mini_batches", "3"], "--num_mini_batches (3) must divide batch_size * accumulation_steps (4)"),
    (["--reward_funcs="], "--reward_funcs is empty and no --reward_model is given"),
    (["--shared_critic", "--critic_from", "x"], "--critic_from cannot be combined with --shared_critic"),
    (["--vf_coef", "0.5"], "--vf_coef weighs the value loss with --shared_critic only"),   # AdamW: scale-invariant
    (["--lam", "1.5"], "--lam must be in [0, 1]"),
    (["--target_kl", "0"], "--target_kl must be positive"),
    (["--reward_model", "SFT"], "not a sequence classifier"),
])
def test_bad_input_is_a_one_line_error(flags, message, trained_checkpoints, tmp_path, capsys):
    flags = [trained_checkpoints["sft"] if f == "SFT" else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(ppo_args(trained_checkpoints, tmp_path / "out", *flags))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err
