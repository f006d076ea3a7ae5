import itertools
from math import sqrt

import pytest

from alignment.metrics import (bootstrap_interval, fmt_ci, mcnemar_exact, metric_columns, metrics_table,
                               paired_bootstrap, pass_at_k, wilson_interval, win_rate, wins)

Z = 1.959963984540054  # the normal quantile of 0.975


@pytest.mark.parametrize("n,c,k,expected", [
    (4, 0, 1, 0.0),
    (4, 4, 3, 1.0),
    (4, 1, 1, 0.25),        # one right of four, one draw
    (4, 1, 2, 0.5),         # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 2, 0.7),         # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),  # C(7,5) = 21, C(10,5) = 252
    (3, 2, 2, 1.0),         # n - c < k: every draw of two holds a right one
])
def test_pass_at_k_closed_form(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_enumerating_every_draw():
    samples = [1, 0, 0, 1, 0, 0]  # n = 6, c = 2
    draws = list(itertools.combinations(samples, 3))
    assert pass_at_k(6, 2, 3) == pytest.approx(sum(any(d) for d in draws) / len(draws))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 1.0]) == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_wins_per_prompt():
    assert wins([2.0, 1.0, 0.0], [1.0, 1.0, 1.0]) == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("k,n,expected", [
    (0, 10, (0.0, Z**2 / (10 + Z**2))),        # no successes: [0, z^2 / (n + z^2)] = [0, 0.2775]
    (10, 10, (10 / (10 + Z**2), 1.0)),          # all successes: the mirror image, [0.7225, 1]
    (5, 10, (0.5 - Z * sqrt(10 / 4 + Z**2 / 4) / (10 + Z**2), 0.5 + Z * sqrt(10 / 4 + Z**2 / 4) / (10 + Z**2))),
])
def test_wilson_interval_by_hand(k, n, expected):
    # Wilson: (k + z^2/2 -+ z sqrt(k (n - k) / n + z^2 / 4)) / (n + z^2)
    assert wilson_interval(k, n) == pytest.approx(list(expected), abs=1e-9)


def test_wilson_interval_of_the_issue_is_about_four_and_a_half_points():
    # 240 right of 300: centre (240 + z^2/2) / (300 + z^2) = 0.79622, half-width z sqrt(48 + z^2/4) / (300 + z^2)
    # = 0.04512: [0.7511, 0.8413]
    lo, hi = wilson_interval(240, 300)
    assert (lo, hi) == pytest.approx((0.75107, 0.84134), abs=1e-5)
    assert wilson_interval(0, 0) is None


def test_bootstrap_interval_is_seeded_and_near_the_normal_interval():
    values = [1.0] * 240 + [0.0] * 60
    lo, hi = bootstrap_interval(values)
    # normal approximation: 0.8 -+ 1.96 sqrt(0.8 * 0.2 / 300) = 0.8 -+ 0.0453; the bootstrap's own noise is smaller
    # than 1/300 per bound at 10,000 resamples
    assert lo == pytest.approx(0.8 - 0.0453, abs=0.005) and hi == pytest.approx(0.8 + 0.0453, abs=0.005)
    assert bootstrap_interval(values) == [lo, hi]  # the same seed every time
    assert bootstrap_interval([0.7] * 5) == pytest.approx([0.7, 0.7])  # no spread, no width
    assert bootstrap_interval([0.7]) is None


def test_paired_bootstrap_p_value_counts_resamples_beyond_zero():
    assert paired_bootstrap([0.0] * 10) == ([0.0, 0.0], 1.0)  # every resample is 0: both sides, p = 1
    ci, p = paired_bootstrap([1.0, 2.0, 3.0])  # every resampled mean is positive
    assert p == 0.0 and 1.0 <= ci[0] < ci[1] <= 3.0


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)  # 2 P(X <= 1), X ~ Bin(10, 1/2)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * (1 + 10) / 2**10)  # two-sided: symmetric
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_intervals_sit_in_their_metrics_cell_not_in_a_column_of_their_own():
    m = {"accuracy": 0.433, "accuracy_ci": [0.378, 0.49], "mean_reward": 0.5, "pass@2": 0.6, "pass@2_ci": [0.5, 0.7]}
    cols = metric_columns([{"input": m}])
    assert "pass@2" in cols and not any(c.endswith("_ci") for c in cols)
    assert fmt_ci(0.433, [0.378, 0.49]) == "0.433 [0.38, 0.49]" and fmt_ci(0.5, None) == "0.500"
    assert metrics_table([("input", m)], ["accuracy", "mean_reward"])[2] == "| input | 0.433 [0.38, 0.49] | 0.500 |"
