"""Paired tests over training seeds, and Holm's correction for testing several arms at once.

Why here and not scipy: scipy is not a dependency (it only happens to come with some installs), and
the benchmark needs two small formulas. tests/test_bench_stats.py checks them against scipy where
it is installed and against values worked by hand from the definitions.

* The two-sided p-value of Student's t with integer ``df`` degrees of freedom uses the finite series
  of Abramowitz & Stegun 26.7.3 / 26.7.4 for ``A(t | df) = P(|T| <= t)``, with
  ``theta = atan(t / sqrt(df))``:
  odd df: ``A = (2 / pi) (theta + sin(theta) (cos(theta) + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...))``,
  the bracket's last term ``cos^(df-2)``; df = 1 is ``2 theta / pi``.
  even df: ``A = sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)``, last term ``cos^(df-2)``.
* Holm (1979), step-down: sort the m p-values ascending, ``p_(1) <= ... <= p_(m)``; the adjusted
  value of the i-th is ``max_{j <= i} min(1, (m - j + 1) p_(j))``. Rejecting where the adjusted value
  is below alpha keeps the chance of any false "better" among the m comparisons at most alpha.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (a positive integer) degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        series, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):  # c, c^3 * 2/3, c^5 * 2*4/(3*5), ... up to c^(df-2)
            series += term
            term *= c * c * (2 * k) / (2 * k + 1)
        inside = (2.0 / math.pi) * (theta + s * series)
    else:
        series, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):  # 1, c^2 / 2, c^4 * 1*3/(2*4), ... up to c^(df-2)
            series += term
            term *= c * c * (2 * k - 1) / (2 * k)
        inside = s * series
    return min(1.0, max(0.0, 1.0 - inside))


def paired_test(diffs: Sequence[float]) -> dict[str, float]:
    """Paired t-test of ``mean(diffs) == 0`` (one difference per seed): mean, s.e., t and p."""
    n = len(diffs)
    mean = math.fsum(diffs) / n if n else float("nan")
    if n < 2 or any(math.isnan(d) for d in diffs):
        return {"mean": mean, "se": float("nan"), "t": float("nan"), "p": float("nan"), "df": max(n - 1, 0)}
    var = math.fsum((d - mean) ** 2 for d in diffs) / (n - 1)
    se = math.sqrt(var / n)
    # identical differences in every seed leave no spread to test against: t is 0 or infinite
    t = mean / se if se > 0.0 else (0.0 if mean == 0.0 else math.copysign(math.inf, mean))
    return {"mean": mean, "se": se, "t": t, "p": t_two_sided_p(t, n - 1), "df": n - 1}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values in the input's order; NaN stays NaN and is not counted in m."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    adjusted = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
