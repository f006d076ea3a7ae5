import itertools

import pytest

from alignment.metrics import pass_at_k, win_rate


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
