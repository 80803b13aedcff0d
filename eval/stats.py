"""Statistics of task evaluation: score summaries, Jeffreys intervals, pass@k, weighted aggregates, Pareto fronts.

Pure Python (math only): scipy is not a run-time dependency, so the Beta quantiles are computed here from the
regularized incomplete beta function (continued fraction, Numerical Recipes 6.4) inverted by bisection.

    summarize([1.0, 0.0, 1.0, 1.0])        {"accuracy": 0.75, "ci80": [0.44..., 0.93...], "mean": 0.75, ...}
    jeffreys_interval(3, 1, level=0.8)     equal-tailed 80% interval of Beta(3.5, 1.5)
    pass_at_k(n=10, c=3, k=5)              0.9166...   (Chen et al. 2021)
    pareto_frontier({"a": {"x": .5, "y": .2}, "b": {"x": .4, "y": .1}})   ["a"]

Words used throughout:
    correct      a sample scoring 1.0 (fully right). accuracy = correct / samples.
    success      a sample scoring > 0 (success_rate); equal to correct when scores are 0/1, as for every task now.
    problem      one generated question; with samples_per_problem K > 1 each problem has K samples.
"""

import math
from collections.abc import Mapping, Sequence

DEFAULT_LEVEL = 0.8   # the interval evaluation reports (ci80)


# ---------------------------------------------------------------------------------------------------------------
# The Beta distribution: regularized incomplete beta function and its inverse
# ---------------------------------------------------------------------------------------------------------------

def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (Numerical Recipes 6.4 `betacf`), evaluated by the modified Lentz method.

    I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 1 / (1 + d1 / (1 + d2 / (1 + ...)))  with
    d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)),  d_{2m} = m(b-m) x / ((a+2m-1)(a+2m)).
    Converges fast for x < (a+1)/(a+b+2); the caller uses the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) otherwise.
    """
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    max_iterations = 10_000 + int(20 * math.sqrt(max(a, b)))   # needs O(sqrt(max(a, b))) terms
    for m in range(1, max_iterations + 1):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),          # even step d_{2m}
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # odd step d_{2m+1}
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: continued fraction did not converge for a={a}, b={b}, x={x}")


def beta_cdf(x: float, a: float, b: float) -> float:
    """P(X <= x) for X ~ Beta(a, b): the regularized incomplete beta function I_x(a, b). a, b > 0."""
    if not (a > 0 and b > 0):
        raise ValueError(f"beta_cdf: need a > 0 and b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # log of x^a (1-x)^b / B(a, b)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return min(1.0, front * _beta_continued_fraction(a, b, x) / a)
    return max(0.0, 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b)


def beta_ppf(q: float, a: float, b: float) -> float:
    """The q-quantile of Beta(a, b): the x with I_x(a, b) = q, found by bisection to full float precision.

    The CDF is monotone on [0, 1], so bisection cannot fail; it stops when the midpoint no longer moves, i.e. the
    bracket is one floating-point step wide (~60-1100 halvings, each one continued fraction).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"beta_ppf: q must be in [0, 1], got {q}")
    if q == 0.0:
        return 0.0
    if q == 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def jeffreys_interval(successes: float, failures: float, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Equal-tailed `level` interval of the Beta(0.5 + successes, 0.5 + failures) posterior (Jeffreys prior).

    The posterior quantiles (1 - level)/2 and (1 + level)/2, exactly as stated: no boundary adjustment at 0 or n
    successes. Counts may be fractional (problem-level counts with several samples per problem, see summarize).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    if successes < 0 or failures < 0:
        raise ValueError(f"jeffreys_interval: counts must be >= 0, got successes={successes}, failures={failures}")
    a, b = 0.5 + successes, 0.5 + failures
    tail = (1.0 - level) / 2.0
    return beta_ppf(tail, a, b), beta_ppf(1.0 - tail, a, b)


def interval_key(level: float = DEFAULT_LEVEL) -> str:
    """The result key of an interval: 0.8 -> "ci80", 0.95 -> "ci95"."""
    percent = level * 100
    return f"ci{round(percent)}" if abs(percent - round(percent)) < 1e-9 else f"ci{percent:g}"


# ---------------------------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large Language Models
    Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k), the chance that k of the n samples drawn without
    replacement include a correct one. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), free of huge binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:   # every choice of k samples holds a correct one
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def pass_at_k_values(k_max: int) -> list[int]:
    """The k reported for k_max samples per problem: powers of two below k_max, then k_max (1, 2, 4, ..., k_max)."""
    ks, k = [], 1
    while k < k_max:
        ks.append(k)
        k *= 2
    return ks + [k_max]


# ---------------------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------------------

def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def std(values: Sequence[float]) -> float:
    """Population standard deviation (divides by n): the spread of the observed scores themselves."""
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / len(values))


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def check_scores(scores: Sequence[float], what: str = "scores") -> None:
    if not scores:
        raise ValueError(f"{what}: no scores to summarise")
    for s in scores:
        if not (isinstance(s, (int, float)) and math.isfinite(s) and 0.0 <= s <= 1.0):
            raise ValueError(f"{what}: every score must be a number in [0, 1], got {s!r}")


def summarize(problem_scores: Sequence[Sequence[float]], level: float = DEFAULT_LEVEL) -> dict:
    """Summary of a task's scores, given per problem: problem_scores[i] = the scores of problem i's samples.

    Returns
        accuracy            fraction of samples scoring 1.0
        mean, std, median   of all sample scores (std divides by n)
        success_rate        fraction of samples scoring > 0
        ci80 [lo, hi]       Jeffreys interval of the accuracy (key from interval_key(level))
        num_samples         problems; samples_per_problem; num_completions = problems x samples
        num_correct         samples scoring 1.0
        pass@k              for k in pass_at_k_values(K), only when K > 1; averaged over problems

    The interval treats problems as the independent draws: successes = sum over problems of the problem's
    fraction of correct samples, failures = problems - successes. With one sample per problem these are the plain
    counts; with K > 1 it stays honest, because K samples of one problem are not K independent problems.
    """
    if not problem_scores:
        raise ValueError("summarize: no problems")
    k = len(problem_scores[0])
    if k == 0 or any(len(scores) != k for scores in problem_scores):
        raise ValueError("summarize: every problem needs the same number (>= 1) of samples")
    flat = [s for scores in problem_scores for s in scores]
    check_scores(flat)
    flat = [float(s) for s in flat]
    correct_per_problem = [sum(1 for s in scores if s >= 1.0) for scores in problem_scores]
    num_correct = sum(correct_per_problem)
    n_problems = len(problem_scores)
    successes = math.fsum(c / k for c in correct_per_problem)
    lo, hi = jeffreys_interval(successes, max(0.0, n_problems - successes), level)
    summary = {
        "accuracy": num_correct / len(flat),
        interval_key(level): [lo, hi],
        "mean": mean(flat),
        "std": std(flat),
        "median": median(flat),
        "success_rate": sum(1 for s in flat if s > 0) / len(flat),
        "num_samples": n_problems,
        "samples_per_problem": k,
        "num_completions": len(flat),
        "num_correct": num_correct,
    }
    if k > 1:
        for kk in pass_at_k_values(k):
            summary[f"pass@{kk}"] = mean([pass_at_k(k, c, kk) for c in correct_per_problem])
    return summary


def weighted_aggregate(summaries: Mapping[str, Mapping], weights: Mapping[str, float] | None = None,
                       fields: Sequence[str] = ("accuracy", "mean", "success_rate")) -> dict:
    """Weighted mean over tasks of each of `fields`: sum_t w_t x_t / sum_t w_t (equal weights when None).

    Returns {field: value, ..., "weights": {task: normalised weight}}. Every task needs a weight >= 0, the weights a
    positive sum, and every weight must name a summarised task. No interval: a weighted sum of independent Beta
    posteriors has no closed form, and an approximate one would be reported as if it were exact.
    """
    if not summaries:
        raise ValueError("weighted_aggregate: no tasks")
    weights = {name: 1.0 for name in summaries} if weights is None else dict(weights)
    unknown = sorted(set(weights) - set(summaries))
    missing = sorted(set(summaries) - set(weights))
    if unknown or missing:
        raise ValueError("task weights: " + "; ".join(
            part for part in (f"weights for tasks not evaluated: {', '.join(unknown)}" if unknown else "",
                              f"no weight for: {', '.join(missing)}" if missing else "") if part))
    for name, w in weights.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"task weights: weight of {name} must be a finite number >= 0, got {w!r}")
    total = math.fsum(weights.values())
    if total <= 0:
        raise ValueError("task weights: the weights must not all be 0")
    result = {field: math.fsum(weights[name] * summaries[name][field] for name in summaries) / total
              for field in fields}
    result["weights"] = {name: weights[name] / total for name in summaries}
    return result


# ---------------------------------------------------------------------------------------------------------------
# Pareto dominance over tasks
# ---------------------------------------------------------------------------------------------------------------

def dominates(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Whether result set a Pareto-dominates b: no worse on every task and strictly better on at least one.

    a, b: {task: score (higher is better)} over the same tasks.
    """
    if set(a) != set(b):
        raise ValueError(f"dominates: the result sets cover different tasks ({sorted(a)} vs {sorted(b)})")
    if not a:
        raise ValueError("dominates: no tasks to compare")
    return all(a[t] >= b[t] for t in a) and any(a[t] > b[t] for t in a)


def pareto_frontier(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The names whose result set no other one dominates, in the input's order (ties all stay on the frontier)."""
    return [name for name, scores in results.items()
            if not any(dominates(other, scores) for other_name, other in results.items() if other_name != name)]


def dominance_pairs(results: Mapping[str, Mapping[str, float]]) -> list[tuple[str, str]]:
    """Every (a, b) such that a dominates b, in the input's order."""
    return [(a, b) for a in results for b in results if a != b and dominates(results[a], results[b])]


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact sign test (McNemar's exact test when scores are 0/1): the p-value of `gained` problems
    scoring higher and `lost` lower under a second model when either is equally likely, ties dropped:
    p = min(1, 2 * P[X <= min(gained, lost)]), X ~ Binomial(gained + lost, 1/2)."""
    if gained < 0 or lost < 0:
        raise ValueError(f"sign_test: counts must be >= 0, got {gained}, {lost}")
    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_changes(before: Mapping[str, float], after: Mapping[str, float]) -> dict:
    """Two models' per-problem scores on the same problems ({question: score}, the problems both hold):
    {"problems", "gained" (scored higher after), "lost" (lower), "p" (sign_test)}."""
    shared = [q for q in before if q in after]
    gained = sum(after[q] > before[q] for q in shared)
    lost = sum(after[q] < before[q] for q in shared)
    return {"problems": len(shared), "gained": gained, "lost": lost, "p": sign_test(gained, lost)}

