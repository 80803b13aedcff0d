# Run: pytest tests/test_eval_stats.py
# eval/stats.py: the regularized incomplete beta function and the Jeffreys interval against scipy's Beta
# distribution (computed independently); pass@k against the binomial closed form and hand-worked cases; score
# summaries, the weighted aggregate, Pareto dominance and the frontier on hand-made numbers.
import math
from fractions import Fraction

import pytest
from scipy.stats import beta as scipy_beta

from minitrain.eval.stats import (beta_cdf, beta_ppf, dominance_pairs, dominates, interval_key, jeffreys_interval,
                                   pareto_frontier, pass_at_k, pass_at_k_values, summarize, weighted_aggregate,
                                   paired_changes, sign_test)


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (0.5, 20.5), (20.5, 0.5), (3.5, 7.5), (1.0, 1.0), (150.5, 350.5),
                                 (0.8, 2.2), (5000.5, 3.5)])
def test_beta_cdf_matches_scipy_on_both_sides_of_the_symmetry_switch(a, b):
    for x in (1e-9, 1e-4, 0.01, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999999):
        assert beta_cdf(x, a, b) == pytest.approx(scipy_beta.cdf(x, a, b), rel=1e-10, abs=1e-14), (x, a, b)
    assert beta_cdf(0.0, a, b) == 0.0 and beta_cdf(1.0, a, b) == 1.0


@pytest.mark.parametrize("successes,failures", [(0, 0), (0, 1), (1, 0), (0, 10), (10, 0), (3, 7), (7, 3), (50, 50),
                                                (0, 2000), (2000, 0), (1, 999), (12345, 54321), (2.5, 1.5)])
@pytest.mark.parametrize("level", [0.8, 0.95, 0.5])
def test_jeffreys_interval_matches_scipy_beta_quantiles(successes, failures, level):
    lo, hi = jeffreys_interval(successes, failures, level)
    a, b = 0.5 + successes, 0.5 + failures
    assert lo == pytest.approx(scipy_beta.ppf((1 - level) / 2, a, b), rel=1e-9, abs=1e-15)
    assert hi == pytest.approx(scipy_beta.ppf((1 + level) / 2, a, b), rel=1e-9, abs=1e-15)
    assert 0.0 < lo < hi < 1.0


def test_jeffreys_interval_hand_checked_case_and_properties():
    # Beta(0.5, 0.5) is the arcsine law, CDF (2/pi) asin(sqrt(x)): its 10% quantile is sin(0.05 pi)^2.
    lo, hi = jeffreys_interval(0, 0, 0.8)
    assert lo == pytest.approx(math.sin(0.05 * math.pi) ** 2, rel=1e-12)
    assert hi == pytest.approx(math.sin(0.45 * math.pi) ** 2, rel=1e-12)
    # symmetric in swapping successes and failures, narrower with more data, wider at a higher level
    lo, hi = jeffreys_interval(3, 17)
    flo, fhi = jeffreys_interval(17, 3)
    assert lo == pytest.approx(1 - fhi, abs=1e-13) and hi == pytest.approx(1 - flo, abs=1e-13)
    assert (hi - lo) > (lambda i: i[1] - i[0])(jeffreys_interval(30, 170))
    assert (hi - lo) < (lambda i: i[1] - i[0])(jeffreys_interval(3, 17, 0.95))
    assert beta_ppf(0.3, 2.0, 5.0) == pytest.approx(scipy_beta.ppf(0.3, 2.0, 5.0), rel=1e-12)
    with pytest.raises(ValueError):
        jeffreys_interval(1, 1, level=1.0)
    with pytest.raises(ValueError):
        jeffreys_interval(-1, 3)
    assert interval_key(0.8) == "ci80" and interval_key(0.95) == "ci95" and interval_key(0.975) == "ci97.5"


def binomial_pass_at_k(n, c, k) -> Fraction:
    """1 - C(n-c, k) / C(n, k), exactly (math.comb(m, k) = 0 when k > m)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_hand_worked_cases():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)              # pass@1 = c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)               # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252, abs=1e-15)     # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 0, 3) == 0.0                                         # nothing correct
    assert pass_at_k(5, 5, 1) == 1.0 and pass_at_k(5, 3, 3) == 1.0           # n - c < k: always a correct one
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10, abs=1e-15)        # C(3,3)/C(5,3) = 1/10
    for n, c, k in [(0, 0, 1), (5, 6, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_pass_at_k_matches_the_binomial_closed_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(binomial_pass_at_k(n, c, k)), abs=1e-13), (n, c, k)
    # big n, where C(n, k) has ~60 digits: the product form stays exact to float precision
    for n, c, k in [(200, 3, 100), (200, 1, 1), (1000, 7, 10), (500, 250, 200)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(binomial_pass_at_k(n, c, k)), rel=1e-12, abs=1e-15)
    assert pass_at_k_values(1) == [1] and pass_at_k_values(8) == [1, 2, 4, 8]
    assert pass_at_k_values(10) == [1, 2, 4, 8, 10]


def test_summarize_one_sample_per_problem_with_partial_credit():
    s = summarize([[1.0], [0.0], [0.5], [1.0]])
    assert s["accuracy"] == 0.5                              # two of four fully right
    assert s["mean"] == pytest.approx(0.625)
    # population std of 1, 0, 0.5, 1: squared deviations .140625 + .390625 + .015625 + .140625 = .6875, / 4
    assert s["std"] == pytest.approx(math.sqrt(0.6875 / 4))
    assert s["median"] == pytest.approx(0.75)               # (0.5 + 1) / 2
    assert s["success_rate"] == 0.75                         # score > 0
    assert s["num_samples"] == 4 and s["num_correct"] == 2 and s["num_completions"] == 4
    lo, hi = s["ci80"]
    assert lo == pytest.approx(scipy_beta.ppf(0.1, 2.5, 2.5), rel=1e-9)
    assert hi == pytest.approx(scipy_beta.ppf(0.9, 2.5, 2.5), rel=1e-9)
    assert not any(key.startswith("pass@") for key in s)
    assert summarize([[0.0], [1.0], [1.0]])["median"] == 1.0
    assert "ci95" in summarize([[1.0]], level=0.95)


def test_summarize_several_samples_per_problem_counts_problems_as_the_draws():
    s = summarize([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    assert s["accuracy"] == 0.5 and s["num_samples"] == 3 and s["samples_per_problem"] == 2
    assert s["num_completions"] == 6 and s["num_correct"] == 3
    assert s["pass@1"] == pytest.approx(0.5)                 # mean of 1, 1/2, 0
    assert s["pass@2"] == pytest.approx(2 / 3)               # mean of 1, 1, 0
    # 1.5 successes (1 + 1/2 + 0) and 1.5 failures over 3 problems, not 3 and 3 over 6 samples
    assert s["ci80"][0] == pytest.approx(scipy_beta.ppf(0.1, 2.0, 2.0), rel=1e-9)
    assert s["ci80"][1] == pytest.approx(scipy_beta.ppf(0.9, 2.0, 2.0), rel=1e-9)
    plain = summarize([[1.0], [1.0], [1.0], [0.0], [0.0], [0.0]])    # the same scores as six problems
    assert plain["ci80"][1] - plain["ci80"][0] < s["ci80"][1] - s["ci80"][0]
    k4 = summarize([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert [key for key in k4 if key.startswith("pass@")] == ["pass@1", "pass@2", "pass@4"]
    assert k4["pass@2"] == pytest.approx((0.5 + (1 - 1 / 6)) / 2)     # 1 - C(3,2)/C(4,2); 1 - C(2,2)/C(4,2)


@pytest.mark.parametrize("bad", [[], [[]], [[1.0], [1.0, 0.0]], [[1.5]], [[-0.1]], [[math.nan]], [["1"]]])
def test_summarize_rejects_bad_scores(bad):
    with pytest.raises(ValueError):
        summarize(bad)


def test_weighted_aggregate():
    summaries = {"a": {"accuracy": 0.8, "mean": 0.9, "success_rate": 1.0},
                 "b": {"accuracy": 0.2, "mean": 0.3, "success_rate": 0.4}}
    equal = weighted_aggregate(summaries)
    assert equal["accuracy"] == pytest.approx(0.5) and equal["mean"] == pytest.approx(0.6)
    assert equal["weights"] == {"a": 0.5, "b": 0.5}
    weighted = weighted_aggregate(summaries, {"a": 1, "b": 3})
    assert weighted["accuracy"] == pytest.approx((0.8 + 3 * 0.2) / 4)
    assert weighted["success_rate"] == pytest.approx((1.0 + 3 * 0.4) / 4)
    assert weighted["weights"] == {"a": 0.25, "b": 0.75}
    assert weighted_aggregate(summaries, {"a": 0, "b": 2})["accuracy"] == pytest.approx(0.2)
    for bad in ({"a": 1}, {"a": 1, "b": 1, "c": 1}, {"a": -1, "b": 1}, {"a": 0, "b": 0}, {"a": math.inf, "b": 1}):
        with pytest.raises(ValueError, match="task weights"):
            weighted_aggregate(summaries, bad)


def test_pareto_dominance_and_frontier_on_hand_made_results():
    results = {
        "A": {"x": 0.5, "y": 0.5},
        "B": {"x": 0.4, "y": 0.5},     # A is better on x, equal on y: A dominates B
        "C": {"x": 0.6, "y": 0.1},     # a trade-off against A: neither dominates
        "D": {"x": 0.5, "y": 0.5},     # A's twin: equal is not better, neither dominates
        "E": {"x": 0.3, "y": 0.1},     # dominated by every other
    }
    assert dominates(results["A"], results["B"]) and not dominates(results["B"], results["A"])
    assert not dominates(results["A"], results["C"]) and not dominates(results["C"], results["A"])
    assert not dominates(results["A"], results["D"]) and not dominates(results["D"], results["A"])
    assert dominates(results["C"], results["E"]) and not dominates(results["C"], results["B"])
    assert pareto_frontier(results) == ["A", "C", "D"]
    assert dominance_pairs(results) == [("A", "B"), ("A", "E"), ("B", "E"), ("C", "E"), ("D", "B"), ("D", "E")]
    assert pareto_frontier({"only": {"x": 0.0}}) == ["only"]
    # three tasks: better on one, worse on another is no dominance
    assert not dominates({"x": 0.9, "y": 0.9, "z": 0.1}, {"x": 0.1, "y": 0.1, "z": 0.2})
    assert dominates({"x": 0.9, "y": 0.9, "z": 0.2}, {"x": 0.1, "y": 0.1, "z": 0.2})
    with pytest.raises(ValueError, match="different tasks"):
        dominates({"x": 1.0}, {"y": 1.0})


def test_sign_test_hand_computed():
    # n = 10 changed problems, 2 gained: P[X <= 2] = (1 + 10 + 45) / 1024, two-sided doubles it
    assert sign_test(2, 8) == pytest.approx(112 / 1024) and sign_test(8, 2) == sign_test(2, 8)
    assert sign_test(5, 0) == pytest.approx(2 / 32)          # 5 of 5 one way: 2 * (1/2)^5
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0  # nothing changed, or an even split
    assert sign_test(113, 80) == pytest.approx(0.02099, abs=5e-5)   # the GRPO level-2 change in the README
    with pytest.raises(ValueError):
        sign_test(-1, 2)


def test_paired_changes_count_only_shared_problems():
    before = {"q1": 0.0, "q2": 1.0, "q3": 1.0, "q4": 0.0, "only_before": 1.0}
    after = {"q1": 1.0, "q2": 1.0, "q3": 0.0, "q4": 0.5, "only_after": 0.0}
    changes = paired_changes(before, after)
    assert changes == {"problems": 4, "gained": 2, "lost": 1, "p": sign_test(2, 1)}
    assert sign_test(2, 1) == 1.0
