"""The benchmark's paired t-test and Holm correction, checked against their definitions.

References: Student's t two-sided tail for df = 1 (the Cauchy distribution, P(|T| > t) =
1 - 2 atan(t) / pi) and df = 2 (P(|T| > t) = 1 - t / sqrt(2 + t^2)), both closed forms of the
density's integral; scipy.stats.t where installed; Holm (1979) worked by hand.
"""

from __future__ import annotations

import math

import pytest

from soar_lite.bench.stats import holm, paired_test, t_two_sided_p


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.0])
def test_t_tail_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-12)
    assert t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)


def test_t_tail_matches_scipy_across_degrees_of_freedom():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        for t in (0.1, 0.9, 2.0, 2.571, 4.303, 9.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), abs=1e-10), (df, t)


def test_critical_values_give_five_percent():
    """Tabulated two-sided 95% points of Student's t (any statistics table)."""
    for df, critical in {2: 4.303, 4: 2.776, 5: 2.571, 9: 2.262, 30: 2.042}.items():
        assert t_two_sided_p(critical, df) == pytest.approx(0.05, abs=5e-4)


def test_paired_test_on_known_differences():
    diffs = [0.1, 0.2, 0.3, 0.2]  # mean 0.2, sample sd sqrt(0.02 / 3), s.e. sd / 2
    result = paired_test(diffs)
    se = math.sqrt(0.02 / 3) / 2
    assert result["mean"] == pytest.approx(0.2) and result["se"] == pytest.approx(se)
    assert result["t"] == pytest.approx(0.2 / se) and result["df"] == 3
    assert result["p"] == pytest.approx(t_two_sided_p(0.2 / se, 3))
    assert paired_test([0.0, 0.0, 0.0])["p"] == 1.0
    assert paired_test([0.5, 0.5])["p"] == 0.0  # no spread, a nonzero mean
    assert math.isnan(paired_test([0.4])["p"])


def test_holm_by_hand():
    # sorted: 0.01 * 4 = 0.04; 0.03 * 3 = 0.09; 0.04 * 2 = 0.08 -> kept at 0.09 (monotone); 0.5 * 1
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.2, 0.9]) == pytest.approx([0.4, 0.9])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.01, float("nan"), 0.02])  # NaN is not a test: m = 2
    assert (
        adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    )
