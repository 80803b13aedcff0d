# Run: pytest tests/test_reward.py   (slow tests train the shared fixture first; the rest: -m "not slow")
# Reward model (model/heads.py, trainer/train_reward.py): the Bradley-Terry loss equals its formula, scores are read
# at the last real token whatever the padding, pairs are laid out as PPO scores them with per-row margins; end to end
# a short run from the SFT model lowers the loss and lifts validation accuracy above 0.8, and transformers'
# AutoModelForSequenceClassification loads the checkpoint with the same scores; bad input is a one-line error.
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script

from minitrain.dataset.embedded import ensure_embedded_data
from minitrain.dataset.formats import normalize_preference
from minitrain.model.checkpoint import load_tokenizer
from minitrain.model.config import load_model_config
from minitrain.model.heads import RewardModel, last_token_index, load_reward_model
from minitrain.model.transformer import CausalLM
from minitrain.trainer.configuration import DEFAULT_TOKENIZER_DIR
from minitrain.trainer.train_reward import PairDataset, bradley_terry_loss, collate_pairs, main


def test_bradley_terry_loss_equals_its_formula():
    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 0.5, 1.0])
    margin = torch.tensor([0.0, 0.0, 0.5])
    expected = [-math.log(1 / (1 + math.exp(-(c - r - m)))) for c, r, m in zip([2.0, 0.5, -1.0], [1.0, 0.5, 1.0],
                                                                                 [0.0, 0.0, 0.5])]
    assert torch.allclose(bradley_terry_loss(chosen, rejected, margin), torch.tensor(expected), atol=1e-6)
    assert bradley_terry_loss(chosen, rejected, 1.0)[1].item() == pytest.approx(-math.log(1 / (1 + math.e)))
    # stable far out: no overflow, and the gradient is -(1 - sigmoid(d)) on the chosen score
    assert bradley_terry_loss(torch.tensor([100.0]), torch.tensor([-100.0])).item() == 0.0
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0)
    c = chosen.clone().requires_grad_(True)
    bradley_terry_loss(c, rejected).sum().backward()
    assert torch.allclose(c.grad, -(1 - torch.sigmoid(chosen - rejected)))


def test_score_is_read_at_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    model = RewardModel.from_trunk(CausalLM(load_model_config("tiny"))).eval()
    tokens = [5, 17, 300, 42, 9]
    alone = model(torch.tensor([tokens]), torch.ones(1, 5, dtype=torch.long))
    ids = torch.tensor([[0, 0, 0] + tokens, tokens + [0, 0, 0]])           # left-padded, right-padded
    mask = (torch.arange(8) >= 3).long().expand(2, 8).clone()
    mask[1] = (torch.arange(8) < 5).long()
    assert last_token_index(mask).tolist() == [7, 4]
    scores = model(ids, mask)
    assert scores.shape == (2,)
    torch.testing.assert_close(scores, alone.expand(2), atol=1e-5, rtol=1e-5)
    assert "lm_head.weight" not in model.state_dict() and model.state_dict()["score.weight"].shape == (1, 64)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pairs_are_laid_out_as_ppo_scores_them_with_their_margins(tmp_path):
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER_DIR)
    rows = [{"prompt": "What is 2 + 3?", "chosen": "<answer>5</answer>", "rejected": "<answer>6</answer>",
             "margin": 2.0},
            {"prompt": "What is 1 + 1?", "chosen": "<answer>2</answer>", "rejected": "<answer>3</answer>"},
            {"prompt": "long " * 300, "chosen": "a", "rejected": "b"}]
    prepared = write_jsonl(tmp_path / "prepared.jsonl", [normalize_preference(r)[0] for r in rows])  # margin kept
    pairs = PairDataset(prepared, tokenizer, max_seq_len=64, default_margin=0.5)
    assert len(pairs) == 2 and pairs.dropped == 1                            # the long prompt is dropped, not cut
    prompt = tokenizer.chat_prompt_ids([{"role": "user", "content": "What is 2 + 3?"}])
    chosen, rejected, margin = pairs.pairs[0]
    assert chosen == prompt + tokenizer.encode("<answer>5</answer>") + [tokenizer.eos_id]
    assert rejected == prompt + tokenizer.encode("<answer>6</answer>") + [tokenizer.eos_id]
    assert margin == 2.0 and pairs.pairs[1][2] == 0.5                        # the row's own, else --margin
    ids, attention, m = collate_pairs(pairs.pairs, tokenizer.pad_id, "cpu")
    assert ids.shape[0] == 4 and ids[0, :len(chosen)].tolist() == chosen and attention[2].sum() == len(rejected)
    assert m.tolist() == [2.0, 0.5]
    assert pairs.own_margins == 1
    assert normalize_preference({**rows[0], "margin": "big"}) == (None, "field 'margin' must be a number, got str")


@pytest.fixture(scope="module")
def reward_run(trained_checkpoints, tmp_path_factory):
    """A short reward-model run on preference pairs built from the embedded ones: chosen = the reference response
    (<think> reasoning </think> <answer>), rejected = the near miss's <answer> alone, without reasoning (the
    preference trainer/rewards.py's format reward encodes). On the embedded pairs themselves, whose answers differ by
    one wrong number, the tiny model's validation accuracy stays at 0.5-0.65 (56 pairs): telling them apart means
    solving the task, which the SFT model's own likelihood does only 61% of the time. Every fourth row has its own
    margin."""
    root = tmp_path_factory.mktemp("reward")
    rows = [json.loads(line) for line in open(ensure_embedded_data(str(REPO / "data" / "embedded"))["dpo"])][:480]
    pairs = [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": "<answer>" + row["rejected"].split(
              "<answer>")[-1], **({"margin": 1.0} if i % 4 == 0 else {})} for i, row in enumerate(rows)]
    data = write_jsonl(root / "prefs.jsonl", pairs)
    mixture = root / "mixture.yaml"
    mixture.write_text(f"phase: dpo\nvalidation_fraction: 0.1\nsources:\n  - name: prefs\n    path: {data}\n"
                       f"    weight: 1\n")
    out = root / "reward"
    r = run_script("train_reward.py", "--init_from", trained_checkpoints["sft"], "--data_config", str(mixture),
                   "--prepared_dir", trained_checkpoints["prepared"], "--out_dir", str(out), "--max_steps", "30",
                   "--batch_size", "16", "--max_seq_len", "128", "--learning_rate", "1e-3", "--warmup_steps", "5",
                   "--log_interval", "5", "--eval_interval", "15", "--save_interval", "30", "--report_to", "none")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {"out": out, "stdout": r.stdout, "records": records, "sft": trained_checkpoints["sft"],
            "prepared": Path(trained_checkpoints["prepared"])}


@pytest.mark.slow
def test_reward_model_learns_the_preference(reward_run):
    train = [x for x in reward_run["records"] if x["kind"] == "train"]
    evals = [x for x in reward_run["records"] if x["kind"] == "eval"]
    assert {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= set(train[0])
    assert [x["step"] for x in evals] == [0, 15, 30]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3                        # from about 0.82 (ln 2 and margins)
    assert evals[-1]["margin"] > evals[0]["margin"] + 1.0                     # r_chosen - r_rejected: about 0 -> 3
    # threshold 0.8, well above chance (0.5). A random head already ranks many of these pairs by their form (its
    # step-0 accuracy varies with the seed), so the loss and the margin above are what show the learning.
    assert evals[-1]["accuracy"] > 0.8
    # every fourth of the 480 rows has its own margin; the mixer's train split (90%) keeps it, and the pairs longer
    # than --max_seq_len 128 (about one in eight) are dropped with theirs
    train_file = reward_run["prepared"] / "dpo-mixture" / "train.jsonl"
    with_margin = sum("margin" in json.loads(line) for line in open(train_file))
    kept = PairDataset(str(train_file), load_tokenizer(reward_run["sft"]), max_seq_len=128)
    assert 90 < with_margin < 120 and 0.7 * with_margin < kept.own_margins <= with_margin
    assert f"rows with their own: {kept.own_margins}" in reward_run["stdout"]


@pytest.mark.slow
def test_transformers_loads_the_reward_checkpoint_with_equal_scores(reward_run):
    import transformers
    final = str(reward_run["out"] / "final")
    config = json.load(open(f"{final}/config.json"))
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert config["pad_token_id"] == 0
    ours, tokenizer = load_reward_model(final)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert theirs.score.weight.shape == (1, 64)
    prompt = tokenizer.chat_prompt_ids([{"role": "user", "content": "What is 7 + 5?"}])
    pairs = [(prompt + tokenizer.encode(a) + [tokenizer.eos_id], prompt + tokenizer.encode(b) + [tokenizer.eos_id], 0.0)
             for a, b in [("<think>7+5=12</think>\n<answer>12</answer>", "12"), ("<answer>13</answer>", "thirteen")]]
    ids, attention, _ = collate_pairs(pairs, tokenizer.pad_id, "cpu")          # right-padded, as in training
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=attention).logits.squeeze(-1)
        torch.testing.assert_close(ours(ids, attention), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a sequence classifier"):    # a causal LM is not a reward model
        load_reward_model(reward_run["sft"])


@pytest.mark.parametrize("flags, message", [
    (["--margin", "nan"], "--margin must be a finite number"),
    (["--eval_tasks", "arithmetic"], "--eval_tasks does not apply"),
    (["--init_from", "/nonexistent/sft"], "/nonexistent/sft: model directory not found"),
])
def test_bad_input_is_a_one_line_error(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--init_from", "/unused", "--out_dir", str(tmp_path / "out"), "--report_to", "none", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err
