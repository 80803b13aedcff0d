# Run: pytest tests/test_kernels_sampling.py
# kernels.sample on the PyTorch path (the CPU default): draws follow exactly the filtered distribution of
# kernels.reference.filtered_probs_reference (chi-square tests at fixed seeds), top_k=1 is argmax, per-row settings,
# top-p / min-p edge cases, ties at the top-k boundary, NaN and all -inf rows, reproducibility from a seed, and the
# compacted paths (top-k candidates, top-p nucleus candidates) drawing the same tokens as the whole-vocabulary path.
import pytest
import torch
from scipy.stats import chisquare

from minitrain.kernels import sample, sampling
from minitrain.kernels.reference import filtered_probs_reference


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")


def draw_counts(row, draws, seed=0, **settings):
    """Token counts [V] of `draws` samples of one logits row (the row repeated draws times, one call)."""
    logits = row[None, :].expand(draws, -1).contiguous()
    tokens = sample(logits, generator=torch.Generator().manual_seed(seed), **settings)
    return torch.bincount(tokens, minlength=row.numel()).double()


def assert_follows(counts, probs, min_pvalue=1e-3):
    """No draw outside the support, and a chi-square goodness-of-fit test over the support (tokens expected fewer
    than 5 times pooled into one bin, as the test's approximation requires)."""
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token the filters remove"
    observed, expected = counts[support], probs[support] * counts.sum()
    rare = expected < 5
    if rare.any():
        observed = torch.cat([observed[~rare], observed[rare].sum()[None]])
        expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    if observed.numel() > 1:
        assert chisquare(observed.numpy(), expected.numpy()).pvalue > min_pvalue


ROW = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 2.0      # [V=40]


@pytest.mark.parametrize("settings", [
    dict(temperature=0.7),
    dict(temperature=1.5, top_k=6),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05),
])
def test_draws_follow_the_exact_filtered_distribution(settings):
    counts = draw_counts(ROW, 20000, **settings)
    probs = filtered_probs_reference(ROW[None], **settings)[0]
    assert_follows(counts, probs)


def test_chi_square_rejects_the_unfiltered_distribution():
    # the test above has power: draws with top-p 0.6 do not fit the distribution without top-p
    counts = draw_counts(ROW, 20000, top_p=0.6)
    wrong = filtered_probs_reference(ROW[None], top_p=0.999)[0]
    support = wrong > 0
    assert chisquare(counts[support].numpy(), (wrong[support] * counts.sum()).numpy()).pvalue < 1e-6


def test_top_k_one_is_argmax_and_temperature_zero_is_greedy():
    logits = torch.randn(16, 301, generator=torch.Generator().manual_seed(2)) * 3
    for temperature in (0.3, 1.0, 2.0):
        assert torch.equal(sample(logits, temperature, top_k=1), logits.argmax(-1))
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, top_p=0.0), logits.argmax(-1))       # top_p 0 keeps the max only
    assert torch.equal(sample(logits, 1.0, min_p=1.0), logits.argmax(-1))       # min_p 1 keeps the max only


def test_per_row_settings_are_honoured():
    draws = 6000
    settings = dict(temperature=[0.0, 1.0, 1.0, 1.0, 0.5, 2.0], top_k=[0, 3, 0, 0, 0, 4],
                    top_p=[1.0, 1.0, 0.5, 1.0, 1.0, 0.9], min_p=[0.0, 0.0, 0.0, 0.3, 0.0, 0.05])
    rows = torch.randn(6, 30, generator=torch.Generator().manual_seed(3)) * 2
    logits = rows.repeat_interleave(draws, dim=0)                             # [6 * draws, V]
    per_row = {name: torch.tensor(values).repeat_interleave(draws) for name, values in settings.items()}
    tokens = sample(logits, generator=torch.Generator().manual_seed(4), **per_row).view(6, draws)
    probs = filtered_probs_reference(rows, **{name: values for name, values in settings.items()})
    assert (tokens[0] == rows[0].argmax()).all()                              # temperature 0: greedy
    for i in range(1, 6):
        assert_follows(torch.bincount(tokens[i], minlength=30).double(), probs[i])
    assert tokens[1].unique().numel() == 3 and tokens[5].unique().numel() <= 4


def test_top_p_and_min_p_edge_cases():
    row = torch.randn(50, generator=torch.Generator().manual_seed(5))
    logits = row[None].expand(500, -1).contiguous()
    same_seed = lambda **s: sample(logits, generator=torch.Generator().manual_seed(6), **s)
    assert torch.equal(same_seed(top_p=1.0, min_p=0.0), same_seed())           # p = 1 and min_p = 0 are off
    assert torch.equal(same_seed(top_k=50), same_seed())                       # k = V keeps everything
    peaked = row.clone()
    peaked[17] = 200.0                                                         # one token holds all the mass
    peaked_logits = peaked[None].expand(200, -1).contiguous()
    for settings in (dict(), dict(top_p=0.01), dict(top_p=0.999), dict(min_p=0.9), dict(top_k=3, top_p=0.5)):
        assert (sample(peaked_logits, **settings) == 17).all()
    # top-p just above the top token's mass keeps exactly the top two tokens
    probs = torch.softmax(row.double(), 0)
    top2 = probs.topk(2).indices
    tokens = same_seed(top_p=float(probs.max()) + 1e-4)
    assert set(tokens.unique().tolist()) == set(top2.tolist())


def test_ties_at_the_top_k_and_top_p_boundaries_stay_together():
    row = torch.tensor([3.0, 2.0, 0.5, 2.0, 2.0, 1.0, -1.0, 0.5])
    counts = draw_counts(row, 20000, top_k=2)             # the 2nd largest value is tied three times: keep all
    probs = filtered_probs_reference(row[None], top_k=2)[0]
    assert (probs > 0).sum() == 4
    assert_follows(counts, probs)
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    counts = draw_counts(flat, 8000, top_p=0.3)             # the 4 tied top tokens stay or go together
    probs = filtered_probs_reference(flat[None], top_p=0.3)[0]
    assert torch.equal(probs > 0, torch.tensor([True] * 4 + [False] * 2))
    assert_follows(counts, probs)


def test_nan_and_all_neg_inf_rows_give_minus_one():
    logits = torch.randn(5, 20, generator=torch.Generator().manual_seed(7))
    logits[1, 3] = float("nan")
    logits[2] = float("-inf")
    logits[3, 5] = float("inf")
    logits[4, :18] = float("-inf")                             # two finite logits: a valid row
    for settings in (dict(), dict(top_k=3, top_p=0.9, min_p=0.1), dict(temperature=0.0)):
        tokens = sample(logits, generator=torch.Generator().manual_seed(8), **settings)
        assert tokens[1:4].tolist() == [-1, -1, -1]
        assert 0 <= tokens[0] < 20 and tokens[4] in (18, 19)
    counts = draw_counts(logits[4], 4000)
    assert counts[:18].sum() == 0 and counts[18:].min() > 0


def test_unfiltered_path_draws_the_tokens_of_the_filtered_path_and_leaves_the_logits_alone():
    # no filter on any row takes a short path (no keep mask, no filter passes); a min-p small enough to keep every
    # token goes through the filtered path: the same u must pick the same token, greedy and invalid rows included
    logits = torch.randn(256, 301, generator=torch.Generator().manual_seed(10)) * 3
    logits[3, 7] = float("nan")
    logits[4] = float("-inf")
    before = logits.clone()
    temperature = torch.full((256,), 0.8)
    temperature[5:9] = 0.0
    for t in (1.0, temperature):
        short = sample(logits, t, generator=torch.Generator().manual_seed(11))
        filtered = sample(logits, t, min_p=1e-30, generator=torch.Generator().manual_seed(11))
        assert torch.equal(short, filtered)
        assert short[3:5].tolist() == [-1, -1]
        if t is temperature:
            assert torch.equal(short[5:9], logits[5:9].argmax(-1))
        assert len(set(short.tolist())) > 100                 # real draws, not a constant
    assert torch.equal(logits.nan_to_num(), before.nan_to_num())


def test_same_seed_same_tokens_and_bad_arguments():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(9))
    draw = lambda seed: sample(logits, 0.8, 20, 0.9, 0.02, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    for bad in (dict(temperature=-1.0), dict(top_p=1.5), dict(min_p=-0.1), dict(top_k=-2)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sample(logits, **bad)
    with pytest.raises(ValueError, match="shape"):
        sample(logits, temperature=torch.ones(3))


@pytest.fixture
def compactions(monkeypatch):
    """Counts how often sample_torch compacts the rows to candidates."""
    calls = []
    original = sampling._in_vocab_order

    def spy(indices, *tensors):
        calls.append(indices.shape[1])
        return original(indices, *tensors)
    monkeypatch.setattr(sampling, "_in_vocab_order", spy)
    return calls


def test_top_k_candidates_draw_the_tokens_of_the_whole_vocabulary_path(compactions):
    # every row uses top-k: the work runs on [B, k] candidates; an extra row without top-k forces the [B, V] path
    B, V = 64, 500
    logits = torch.randn(B + 1, V, generator=torch.Generator().manual_seed(10)) * 2
    u = torch.rand(B + 1, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    settings = dict(temperature=torch.linspace(0.5, 1.5, B + 1), top_k=torch.randint(1, 40, (B + 1,)),
                    top_p=torch.linspace(0.3, 1.0, B + 1), min_p=torch.linspace(0.0, 0.2, B + 1))
    compact = sampling.sample_torch(logits[:B], *(v[:B] for v in settings.values()), u[:B])
    assert len(compactions) == 1
    settings["top_k"][B] = 0
    full = sampling.sample_torch(logits, *settings.values(), u)
    assert len(compactions) == 1                                             # no compaction this time
    assert torch.equal(compact, full[:B])


def test_top_p_nucleus_candidates_draw_the_tokens_of_the_whole_vocabulary_path(compactions, monkeypatch):
    B, V = 48, 1000
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(12)) * 4    # a nucleus of tens of tokens
    logits[5, :] = 0.0                                                       # all tied: top-p keeps them all
    logits[5, 7] = 30.0                                                      # ... or here only the one on top
    u = torch.rand(B, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    ones = torch.ones(B)
    tries = sampling._NUCLEUS_CANDIDATES
    for top_p in (0.9, 0.5, 0.0):
        args = (logits, ones * 0.9, torch.zeros(B, dtype=torch.long), ones * top_p, ones * 0.01, u)
        compactions.clear()
        compact = sampling.sample_torch(*args)
        assert compactions == [256]
        monkeypatch.setattr(sampling, "_NUCLEUS_CANDIDATES", ())      # force the bisection over V
        full = sampling.sample_torch(*args)
        monkeypatch.setattr(sampling, "_NUCLEUS_CANDIDATES", tries)
        assert torch.equal(compact, full)
    assert compact[5] == 7
    # a flat row's nucleus does not fit in 256 candidates: the whole batch takes the bisection over V
    flat = torch.randn(2, V, generator=torch.Generator().manual_seed(14)) * 0.1
    compactions.clear()
    sample(flat, top_p=0.9)
    assert compactions == []


def test_nucleus_candidate_draws_follow_the_exact_filtered_distribution(compactions):
    row = torch.randn(600, generator=torch.Generator().manual_seed(15)) * 3
    counts = draw_counts(row, 20000, temperature=0.8, top_p=0.7, min_p=0.02)
    assert compactions == [256]
    assert_follows(counts, filtered_probs_reference(row[None], temperature=0.8, top_p=0.7, min_p=0.02)[0])


def test_ties_at_the_top_p_boundary_among_top_k_candidates(compactions):
    # top-k compacts (no tie at the k-th value); top-p must then keep the three tied 2.0 tokens together
    row = torch.tensor([3.0, 2.0, 1.0, 2.0, 0.0, 2.0, 1.0, -1.0, -2.0, 0.5])
    counts = draw_counts(row, 8000, top_k=6, top_p=0.5)
    assert compactions == [6]
    probs = filtered_probs_reference(row[None], top_k=6, top_p=0.5)[0]
    assert (probs > 0).nonzero().squeeze(1).tolist() == [0, 1, 3, 5]
    assert_follows(counts, probs)
