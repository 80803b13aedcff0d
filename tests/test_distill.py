# Run: pytest tests/test_distill.py   (slow tests train the shared fixture first; the rest: -m "not slow")
# Distillation (trainer/train_distill.py): forward KL, reverse KL and the generalised JSD equal their formulas on
# hand-made logits (temperature and the T^2 convention included, the JSD's endpoints as documented); the fused path
# equals the naive full-logits one, gradients too, at odd shapes and chunk sizes; the chunked argmax
# (kernels.fused_linear_argmax) and the agreement; the on-policy schedule and prompts. End to end: a fresh tiny
# student distilled from the SFT checkpoint lowers the divergence; on-policy batches (lmbda 1) run, log agreement and
# resume exactly; --from_teacher_generations writes the JSONL and its manifest (trainer/generations.py) with only
# answers the checker accepts; bad input is a one-line error, exit 2.
import hashlib
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_script, script_error
from minitrain.dataset.chat import tokenize_conversation
from minitrain.eval.tasks import get_task, score_row, training_seed
from minitrain.model.checkpoint import load_tokenizer, save_checkpoint
from minitrain.model.config import load_model_config
from minitrain.model.transformer import CausalLM
from minitrain.kernels import fused_linear_argmax
from minitrain.trainer.train_distill import (divergence, is_on_policy, last_answer_start, main, objective,
                                             token_agreement, token_weights)

LOSSES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)]


# ---- the divergences against their formulas ----------------------------------------------------------------------

STUDENT = [[1.0, 2.0, 0.5, -1.0, 0.0], [0.2, 0.1, 3.0, 1.0, -2.0], [2.0, 2.0, 2.0, 2.0, 2.0]]
TEACHER = [[0.5, 2.5, 0.0, -0.5, 1.0], [1.0, -1.0, 2.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]]
MASK = [True, True, False]          # the third row is not a target: it must not count


def softmax(z: list[float], T: float) -> list[float]:
    e = [math.exp(x / T) for x in z]
    return [x / sum(e) for x in e]


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def by_hand(loss: str, beta: float, T: float) -> float:
    """The definition, in plain Python: mean over target rows of D(P = teacher, Q = student) at temperature T."""
    values = []
    for s, t, target in zip(STUDENT, TEACHER, MASK):
        if not target:
            continue
        p, q = softmax(t, T), softmax(s, T)
        if loss == "forward_kl":
            values.append(kl(p, q))
        elif loss == "reverse_kl":
            values.append(kl(q, p))
        else:
            m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
            values.append(beta * kl(p, m) + (1 - beta) * kl(q, m))
    return sum(values) / len(values)


def on_logits(student, teacher, mask, loss, beta, T):
    """divergence() on given logits: hidden = the logits, head = the identity (logits = hidden @ I.T)."""
    eye = torch.eye(student.shape[1])
    return divergence(student, eye, teacher, eye, mask, loss, beta, T)


@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("loss,beta", LOSSES)
def test_each_divergence_equals_its_formula(loss, beta, T):
    got = on_logits(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(MASK), loss, beta, T)
    assert got.item() == pytest.approx(by_hand(loss, beta, T), rel=1e-5, abs=1e-7)


def test_jsd_endpoints_are_the_two_kls_and_the_formula_approaches_them():
    s, t, mask = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(MASK)
    forward, reverse = by_hand("forward_kl", 0, 1.0), by_hand("reverse_kl", 0, 1.0)
    # beta = 0 and 1 are taken as forward and reverse KL (TRL's GKD and Liger's convention) ...
    assert on_logits(s, t, mask, "jsd", 0.0, 1.0).item() == pytest.approx(forward, rel=1e-5)
    assert on_logits(s, t, mask, "jsd", 1.0, 1.0).item() == pytest.approx(reverse, rel=1e-5)
    # ... while the formula itself vanishes there, as beta * KL(P || Q) and (1 - beta) * KL(Q || P)
    eps = 1e-3
    assert by_hand("jsd", eps, 1.0) / eps == pytest.approx(forward, rel=2e-2)
    assert by_hand("jsd", 1 - eps, 1.0) / eps == pytest.approx(reverse, rel=2e-2)
    assert on_logits(s, t, mask, "jsd", eps, 1.0).item() / eps == pytest.approx(forward, rel=2e-2)
    assert on_logits(s, t, mask, "jsd", 1 - eps, 1.0).item() / eps == pytest.approx(reverse, rel=2e-2)
    # and every divergence is 0 when the student equals the teacher
    for loss, beta in LOSSES:
        assert on_logits(t, t, mask, loss, beta, 2.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_objective_mixes_ce_and_t_squared_divergence(T):
    """loss = alpha CE + (1 - alpha) T^2 D_T; with forward KL the soft term's gradient on a target row's student
    logits is T (q_T - p_T) / targets (Hinton et al. 2015, section 2.1), so its scale does not shrink as 1 / T."""
    assert objective(torch.tensor(2.0), torch.tensor(3.0), 0.25, T).item() == pytest.approx(0.5 + 0.75 * T * T * 3)
    student = torch.tensor(STUDENT, requires_grad=True)
    objective(torch.tensor(0.0), on_logits(student, torch.tensor(TEACHER), torch.tensor(MASK), "forward_kl", 0, T),
              0.0, T).backward()
    for row, target in enumerate(MASK):
        expected = [T * (q - p) / sum(MASK) if target else 0.0
                    for q, p in zip(softmax(STUDENT[row], T), softmax(TEACHER[row], T))]
        assert torch.allclose(student.grad[row], torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("normalization", ["global", "micro_batch"])
def test_token_normalisation_over_ranks_and_micro_steps(normalization):
    """W = 2 ranks x A = 2 micro-steps with ragged target counts (1, 5, 3, 2 of 6 rows): global normalisation gives
    the loss and gradient of one rank over the whole batch, each term's token mean; micro_batch the mean of the 4
    micro-batches' token means."""
    g = torch.Generator().manual_seed(3)
    H, V, T, alpha, W, A = 5, 11, 2.0, 0.3, 2, 2
    hidden, teacher = torch.randn(4, 6, H, generator=g), torch.randn(4, 6, H, generator=g)
    head, teacher_head = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (4, 6), generator=g)
    mask = torch.tensor([[True] * n + [False] * (6 - n) for n in (1, 5, 3, 2)])
    labels[~mask] = -100

    def terms(w, k):                  # micro-batch k's token means: CE and the divergence
        ce = F.cross_entropy(hidden[k] @ w.T, labels[k], ignore_index=-100) if mask[k].any() else 0 * w.sum()
        return ce, divergence(hidden[k], w, teacher[k], teacher_head, mask[k], "forward_kl", 0.0, T)

    w = head.clone().requires_grad_(True)
    total, ranks = float(mask.sum()), []
    for r in range(W):
        loss = 0
        for m in range(A):
            k = r * A + m
            w_ce, w_div = token_weights(float(mask[k].sum()), float(mask[k].sum()), normalization, total, total,
                                        A, W)
            ce, div = terms(w, k)
            loss = loss + objective(w_ce * ce, w_div * div, alpha, T)
        ranks.append(loss)
    split = sum(ranks) / W                                          # DDP: the mean of the ranks' gradients
    split.backward()
    if normalization == "global":
        one = head.clone().requires_grad_(True)
        flat = mask.reshape(-1)
        ce = F.cross_entropy(hidden.reshape(-1, H) @ one.T, labels.reshape(-1), ignore_index=-100)
        div = divergence(hidden.reshape(-1, H), one, teacher.reshape(-1, H), teacher_head, flat, "forward_kl", 0.0, T)
        expected = objective(ce, div, alpha, T)                      # one token mean of each term over all 11
        expected.backward()
        assert split.item() == pytest.approx(expected.item(), rel=1e-5)
        assert torch.allclose(w.grad, one.grad, atol=1e-6)
    else:
        means = [objective(*terms(head, k), alpha, T).item() for k in range(4)]
        assert split.item() == pytest.approx(sum(means) / 4, rel=1e-5)


# ---- the fused path against the naive one ------------------------------------------------------------------------

def naive_divergence(sh, sw, th, tw, mask, loss, beta, T):
    """The full [N, V] logits and autograd: the definition the chunked kernel must equal."""
    log_q = F.log_softmax((sh @ sw.T) / T, dim=-1)
    log_p = F.log_softmax((th @ tw.T) / T, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if loss == "forward_kl":
        per_row = (p * (log_p - log_q)).sum(-1)
    elif loss == "reverse_kl":
        per_row = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        per_row = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    return per_row[mask].mean()


@pytest.mark.parametrize("chunk_mb", ["256", "0.001"])        # one chunk, and a few rows per chunk
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("loss,beta", LOSSES[:3] + [("jsd", 0.3)])
def test_fused_divergence_and_its_gradients_equal_the_naive_ones(loss, beta, T, chunk_mb, monkeypatch):
    monkeypatch.setenv("KERNELS_CHUNK_MB", chunk_mb)
    g = torch.Generator().manual_seed(7)
    N, H, Ht, V = 13, 7, 9, 37                                  # odd shapes; the teacher is wider than the student
    sh, sw = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    th, tw = torch.randn(N, Ht, generator=g), torch.randn(V, Ht, generator=g) * 0.5
    mask = torch.rand(N, generator=g) > 0.3
    ours_h, ours_w = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    ref_h, ref_w = sh.double().requires_grad_(True), sw.double().requires_grad_(True)
    ours = divergence(ours_h, ours_w, th, tw, mask, loss, beta, T)
    ref = naive_divergence(ref_h, ref_w, th.double(), tw.double(), mask, loss, beta, T)
    (ours * 1.7).backward()
    (ref * 1.7).backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(ours_h.grad.double(), ref_h.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(ours_w.grad.double(), ref_w.grad, rtol=1e-4, atol=1e-6)


def test_agreement_by_chunked_argmax(monkeypatch):
    monkeypatch.setenv("KERNELS_CHUNK_MB", "0.0005")             # a few rows per chunk
    g = torch.Generator().manual_seed(3)
    sh, sw = torch.randn(11, 6, generator=g), torch.randn(29, 6, generator=g)
    th, tw = torch.randn(11, 5, generator=g), torch.randn(29, 5, generator=g)
    assert torch.equal(fused_linear_argmax(sh, sw), (sh @ sw.T).argmax(-1))
    mask = torch.tensor([True, False] * 5 + [True])
    same = ((sh @ sw.T).argmax(-1) == (th @ tw.T).argmax(-1))[mask]
    assert token_agreement(sh, sw, th, tw, mask) == (int(same.sum()), int(mask.sum()))
    assert token_agreement(sh, sw, sh, sw, mask) == (6, 6)


# ---- on-policy batches ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lmbda", [0.0, 0.25, 1 / 3, 0.5, 0.7, 1.0])
def test_on_policy_schedule_holds_exactly_its_fraction(lmbda):
    picks = [is_on_policy(k, lmbda) for k in range(30)]
    for n in range(31):
        assert sum(picks[:n]) == math.floor(n * lmbda + 1e-9)


def test_on_policy_prompt_is_the_chat_prompt_of_the_last_answer():
    tokenizer = load_tokenizer(str(REPO / "dataset" / "tokenizer"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "<think>2+3=5</think>\n<answer>5</answer>"},
                {"role": "user", "content": "And 4 * 4?"}, {"role": "assistant", "content": "16"}]
    for turns in (messages, messages[1:3]):
        ids, labels = tokenize_conversation(tokenizer, turns, 512)
        assert ids[:last_answer_start(labels)] == tokenizer.chat_prompt_ids(turns[:-1])


# ---- the script ---------------------------------------------------------------------------------------------------

def common(checkpoints, out, *extra, prepared: str | None = None) -> list[str]:
    """Flags of a short run from the session's SFT teacher; the chat data the session prepared, or `prepared`."""
    data = ["--prepared_dir", prepared] if prepared else ["--prepared_dir", checkpoints["prepared"], "--use_prepared"]
    return ["--teacher", checkpoints["sft"], "--out_dir", str(out), *data, "--max_seq_len", "96", "--batch_size", "8",
            "--warmup_steps", "0", "--log_interval", "1", "--eval_batches", "2", "--eval_tasks", "",
            "--sample_prompts", "", "--report_to", "none", *extra]


def records(out, kind: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.slow
def test_fresh_student_distilled_from_the_sft_model_lowers_the_divergence(trained_checkpoints, tmp_path):
    out = tmp_path / "distill"
    r = run_script("train_distill.py", *common(trained_checkpoints, out, "--max_steps", "24", "--eval_interval", "24",
                                               "--learning_rate", "5e-3", "--alpha", "0.2",
                                               "--distill_temperature", "2"))
    assert r.returncode == 0, r.stderr
    assert "fresh tiny" in r.stdout and "0.2 * CE + 0.8 * 2^2 * forward_kl" in r.stdout
    train = records(out, "train")
    assert [t["step"] for t in train] == list(range(1, 25))
    first, last = train[0]["loss/distill"], sum(t["loss/distill"] for t in train[-3:]) / 3
    assert last < 0.5 * first
    assert all(0 <= t["distill/agreement"] <= 1 and t["distill/on_policy"] == 0 for t in train)
    assert all(t["loss"] == pytest.approx(0.2 * t["loss/ce"] + 0.8 * 4 * t["loss/distill"], rel=1e-5) for t in train)
    start, end = records(out, "eval")
    assert set(end) >= {"loss", "distill", "agreement"}
    assert end["distill"] < 0.5 * start["distill"] and end["loss"] < start["loss"]
    assert 0 <= end["agreement"] <= 1


def losses(train: list[dict]) -> dict[int, tuple]:
    keys = ("loss", "loss/ce", "loss/distill", "distill/agreement", "completions/mean_length", "grad_norm")
    return {t["step"]: tuple(t[k] for k in keys) for t in train}


@pytest.mark.slow
def test_on_policy_batches_run_log_agreement_and_resume_exactly(trained_checkpoints, tmp_path):
    out = tmp_path / "gkd"
    args = common(trained_checkpoints, out, "--init_from", trained_checkpoints["pretrain"], "--lmbda", "1",
                  "--max_new_tokens", "12", "--max_steps", "4", "--batch_size", "4", "--save_interval", "2",
                  "--eval_interval", "0", "--distill_loss", "jsd", "--jsd_beta", "0.5", "--learning_rate", "1e-3")
    r = run_script("train_distill.py", *args)
    assert r.returncode == 0, r.stderr
    full = records(out, "train")
    assert len(full) == 4
    for t in full:
        assert t["distill/on_policy"] == 1.0 and 1 <= t["completions/mean_length"] <= 12
        assert 0 <= t["distill/agreement"] <= 1 and t["loss/distill"] > 0
    # resume from step 2: the same samples (RNG restored) and the same losses
    for name in ("final", "step_000004"):
        path = out / name
        path.unlink() if path.is_symlink() else shutil.rmtree(path)
    (out / "latest").write_text("step_000002\n")
    r = run_script("train_distill.py", *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and losses(records(out, "train")) == losses(full)


@pytest.mark.slow
def test_teacher_generations_are_checked_written_and_trained_on(trained_checkpoints, tmp_path):
    problems = get_task("arithmetic:level=1").make_problems(24, training_seed(0))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.question, "answer": p.answer, "task": p.task, "id": p.id,
                                           "meta": p.meta}) + "\n" for p in problems))
    out = tmp_path / "reasoning"
    r = run_script("train_distill.py", *common(trained_checkpoints, out, "--init_from",
                                               trained_checkpoints["pretrain"], "--from_teacher_generations",
                                               "--data_path", str(prompts), "--num_teacher_samples", "4",
                                               "--temperature", "0.8",
                                               "--max_new_tokens", "32", "--alpha", "1", "--max_steps", "3",
                                               "--batch_size", "2", "--eval_interval", "0",
                                               prepared=str(tmp_path / "prepared")))
    assert r.returncode == 0, r.stderr
    body = (out / "generations.jsonl").read_bytes()
    manifest = json.loads((out / "generations_manifest.json").read_text())
    rows = [json.loads(line) for line in body.decode().splitlines()]
    counts = manifest["counts"]
    assert manifest["sha256"] == hashlib.sha256(body).hexdigest()
    assert manifest["teacher"] == os.path.realpath(trained_checkpoints["sft"])
    assert manifest["samples_per_prompt"] == 4 and manifest["sampling"]["temperature"] == 0.8
    assert counts["prompts"] == 23 and counts["generated"] == 92      # the mixture held one prompt out
    assert counts["kept"] == len(rows) >= 3
    assert counts["kept"] + counts["incorrect"] + counts["unfinished"] + counts["duplicates"] == 92
    assert manifest["per_task"]["arithmetic:level=1"]["kept"] == len(rows)
    by_id = {p.id: p for p in problems}
    for row in rows:
        assert set(row) >= {"messages"} and row["messages"][-1]["role"] == "assistant"
        problem = by_id[row["id"]]
        assert row["messages"][:-1] == [{"role": "user", "content": problem.question}]
        assert score_row({**problem.to_dict(), "task": row["task"]}, row["messages"][-1]["content"]) == 1.0
    assert len(records(out, "train")) == 3


# ---- bad input: one line on stderr, exit status 2 -----------------------------------------------------------------

@pytest.fixture(scope="module")
def random_teachers(tmp_path_factory) -> dict[str, str]:
    """Untrained tiny checkpoints: one like the student, one with a wider vocabulary, one with another tokenizer."""
    root = tmp_path_factory.mktemp("teachers")
    tokenizer = load_tokenizer(str(REPO / "dataset" / "tokenizer"))
    torch.manual_seed(0)
    paths = {name: str(root / name) for name in ("same", "wide_vocab", "other_tokenizer")}
    save_checkpoint(CausalLM(load_model_config("tiny")), tokenizer, paths["same"])
    save_checkpoint(CausalLM(load_model_config("tiny", {"vocab_size": 6464})), tokenizer, paths["wide_vocab"])
    save_checkpoint(CausalLM(load_model_config("tiny")), tokenizer, paths["other_tokenizer"])
    with open(os.path.join(paths["other_tokenizer"], "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]    # two ordinary tokens trade ids: same size, another vocabulary
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(os.path.join(paths["other_tokenizer"], "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    return paths


def test_bad_input_is_a_one_line_error(random_teachers, capsys, tmp_path):
    flags = ["--out_dir", str(tmp_path / "x"), "--report_to", "none", "--eval_tasks", ""]
    assert "--teacher is required" in script_error(main, flags, capsys)
    err = script_error(main, [*flags, "--teacher", str(tmp_path / "missing")], capsys)
    assert "--teacher" in err and "model directory not found" in err
    student = ["--init_from", random_teachers["same"], *flags]
    err = script_error(main, [*student, "--teacher", random_teachers["other_tokenizer"]], capsys)
    assert "its tokenizer differs" in err
    err = script_error(main, [*student, "--teacher", random_teachers["wide_vocab"]], capsys)
    assert "vocab_size 6464 differs from the student's 6400" in err
    teacher = ["--teacher", random_teachers["same"], *flags]
    assert "--alpha must be in [0, 1]" in script_error(main, [*teacher, "--alpha", "1.5"], capsys)
    assert "--lmbda needs --data_phase sft" in script_error(main, [*teacher, "--lmbda", "0.5", "--data_phase",
                                                                 "pretrain"], capsys)
    assert "--distill_loss" in script_error(main, [*teacher, "--distill_loss", "kl"], capsys)
    assert "max_position_embeddings" in script_error(main, [*teacher, "--max_seq_len", "2048"], capsys)
