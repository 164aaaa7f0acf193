"""The evaluation statistics against values worked out by hand (see evaluation/stats.py)."""

from __future__ import annotations

import math

import pytest

from evaluation import stats


def test_standard_error_and_ci_by_hand():
    # p = 0.6, n = 100: sqrt(0.6 * 0.4 / 100) = sqrt(0.0024) = 0.0489898
    se = stats.standard_error(0.6, 100)
    assert se == pytest.approx(0.0489898, abs=1e-7)
    low, high = stats.ci95(0.6, se)
    assert low == pytest.approx(0.6 - 1.959964 * 0.0489898, abs=1e-6)  # 0.503981
    assert high == pytest.approx(0.696019, abs=1e-6)
    # the thesis's abs vs pref: 66 % of 100 -> SE 0.04737
    assert stats.standard_error(0.66, 100) == pytest.approx(0.047370, abs=1e-6)
    assert math.isnan(stats.standard_error(0.5, 0))
    # clipped at the ends
    assert stats.ci95(1.0, stats.standard_error(1.0, 10)) == (1.0, 1.0)
    assert stats.ci95(0.05, 0.1)[0] == 0.0


def test_hard_verdicts_with_draws():
    r = stats.win_rate([1, 1, 0, 0.5])
    assert (r.n_wins, r.n_wins_base, r.n_draws, r.n_total) == (2, 1, 1, 4)
    assert r.win_rate == pytest.approx(0.625) and r.soft_win_rate == pytest.approx(0.625)
    # sample SE: deviations 3/8, 3/8, -5/8, -1/8 -> sqrt(0.6875 / 3 / 4) = 0.239357
    assert r.standard_error == pytest.approx(0.239357, abs=1e-6)
    assert r.se_binomial == pytest.approx(math.sqrt(0.625 * 0.375 / 4))  # Eq. 7.1: 0.242061


def test_soft_preferences_differ_from_discrete():
    r = stats.win_rate([0.9, 0.2, 0.6, 0.5])
    # soft: (0.9 + 0.2 + 0.6 + 0.5) / 4 = 0.55; hard: win, loss, win, draw -> (2 + 0.5) / 4 = 0.625
    assert r.soft_win_rate == pytest.approx(0.55)
    assert r.win_rate == pytest.approx(0.625)
    assert (r.n_wins, r.n_wins_base, r.n_draws) == (2, 1, 1)


def test_invalid_verdicts_are_counted_not_drawn():
    r = stats.win_rate([1.0, 0.0], n_invalid=3)
    assert r.n_total == 2 and r.n_invalid == 3 and r.n_draws == 0
    assert r.win_rate == 0.5
    empty = stats.win_rate([], n_invalid=2)
    assert empty.n_total == 0 and empty.n_invalid == 2 and math.isnan(empty.win_rate)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.win_rate([1.5])


def test_orders_and_position_bias():
    assert stats.combine_orders(1.0, 0.0) == 0.5  # each order favoured its first slot: a wash
    assert stats.combine_orders(0.8, None) == 0.8
    assert stats.combine_orders(None, None) is None
    assert stats.position_bias([True, True, False, None]) == pytest.approx(2 / 3)
    assert math.isnan(stats.position_bias([None]))


def test_agreement_by_hand():
    a = stats.agreement([1, -1, 1, 0], [2, 1, 0, 5], [1, 3, 1, 0])
    assert (a.pairs, a.agreements) == (3, 2) and a.rate == pytest.approx(2 / 3)
    tie = stats.agreement([1], [1.0], [1.0])  # the RM cannot tell them apart: not an agreement
    assert (tie.pairs, tie.agreements) == (1, 0)
    with pytest.raises(ValueError):
        stats.agreement([1], [1, 2], [0])


def test_rm_preferences():
    assert stats.rm_preferences([1, 0, 2], [0, 1, 2]) == [1.0, 0.0, 0.5]
    r = stats.win_rate(stats.rm_preferences([3, 2, 1, 1], [0, 0, 5, 1]))
    assert (r.n_wins, r.n_wins_base, r.n_draws, r.win_rate) == (2, 1, 1, 0.625)


def test_correlations_by_hand():
    # x, y deviations: (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5): 4 / 5 = 0.8; ranks equal values
    c = stats.correlation([1, 2, 3, 4], [1, 3, 2, 4])
    assert (c.n, c.pearson, c.spearman) == (4, pytest.approx(0.8), pytest.approx(0.8))
    # monotone but not linear: Spearman 1, Pearson below 1
    c = stats.correlation([1, 2, 3], [1, 10, 100])
    assert c.spearman == pytest.approx(1.0) and 0.8 < c.pearson < 1.0
    assert math.isnan(stats.correlation([1, 1, 1], [1, 2, 3]).pearson)
    assert math.isnan(stats.correlation([1], [2]).spearman)


def test_discrete_verdicts_given_separately():
    # both orders: a prompt whose orders disagree is a draw even if its soft mean is 0.49
    r = stats.win_rate([0.49, 0.9], discrete=[0.5, 1.0])
    assert (r.n_wins, r.n_wins_base, r.n_draws) == (1, 0, 1)
    assert r.soft_win_rate == pytest.approx(0.695) and r.win_rate == pytest.approx(0.75)
    with pytest.raises(ValueError, match="one verdict per preference"):
        stats.win_rate([0.5], discrete=[])
