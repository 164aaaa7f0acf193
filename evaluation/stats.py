"""The evaluation chapter's statistics, as pure functions on plain numbers.

    win rate         p = mean(preference), preference in [0, 1] per prompt (1: the model's
                     output is better, 0: the baseline's, 0.5: a draw); with hard verdicts
                     this is (wins + ½·draws) / n
    standard error   SE = sqrt(p (1 − p) / n)        (the thesis's Eq. 7.1, binomial)
    95 % CI          p ± 1.96 · SE, clipped to [0, 1]
    agreement        share of pairs where a reward model prefers (scores higher) the output
                     the judge preferred
    length bias      Pearson and Spearman correlation of score and response length

Invalid verdicts are never passed in here: the caller drops them and counts them, so they
can never silently become draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # the two-sided 95 % quantile of the normal distribution


def standard_error(p: float, n: int) -> float:
    """sqrt(p(1−p)/n); nan for n = 0. Example: p = 0.6, n = 100 -> sqrt(0.24/100) = 0.04899."""
    if n <= 0:
        return math.nan
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def ci95(p: float, se: float) -> tuple[float, float]:
    """p ± 1.96·SE clipped to [0, 1]. Example: p = 0.6, SE = 0.049 -> (0.504, 0.696)."""
    if math.isnan(p) or math.isnan(se):
        return math.nan, math.nan
    return max(0.0, p - Z95 * se), min(1.0, p + Z95 * se)


def hard_verdict(preference: float) -> int:
    """+1 the model wins, −1 the baseline wins, 0 a draw (exactly 0.5)."""
    return 1 if preference > 0.5 else -1 if preference < 0.5 else 0


@dataclass(frozen=True)
class WinRate:
    """One row of win_rates.csv (AlpacaEval's names; rates are fractions in [0, 1])."""

    win_rate: float  # mean soft preference
    standard_error: float
    ci95_low: float
    ci95_high: float
    n_wins: int
    n_wins_base: int
    n_draws: int
    n_total: int  # valid verdicts only: n_wins + n_wins_base + n_draws
    n_invalid: int
    discrete_win_rate: float  # (wins + ½·draws) / n_total from the hard verdicts


def win_rate(preferences: Sequence[float], n_invalid: int = 0, discrete: Sequence[float] | None = None) -> WinRate:
    """Summarise valid preferences (each in [0, 1]).

    `discrete` (optional, one per preference) gives the hard verdicts to count when they are
    not simply the soft ones rounded: with both orders, a prompt whose two verdicts disagree
    is a draw (FastChat's rule) even if its mean soft preference is 0.49.
    Example: [1, 1, 0, 0.5] -> wins 2, losses 1, draws 1, p = 2.5/4 = 0.625,
    SE = sqrt(0.625·0.375/4) = 0.2421; soft [0.9, 0.2] -> p = 0.55, discrete 0.5.
    """
    prefs = [float(x) for x in preferences]
    if any(not 0.0 <= x <= 1.0 for x in prefs):
        raise ValueError("preferences must lie in [0, 1] (1: the model's output is better)")
    n = len(prefs)
    if discrete is not None and len(discrete) != n:
        raise ValueError("discrete needs one verdict per preference")
    verdicts = [hard_verdict(x) for x in (prefs if discrete is None else discrete)]
    wins, losses = verdicts.count(1), verdicts.count(-1)
    draws = n - wins - losses
    p = sum(prefs) / n if n else math.nan
    se = standard_error(p, n)
    low, high = ci95(p, se)
    discrete = (wins + 0.5 * draws) / n if n else math.nan
    return WinRate(p, se, low, high, wins, losses, draws, n, n_invalid, discrete)


def combine_orders(first: float | None, second: float | None) -> float | None:
    """One preference per prompt from the two presentation orders (each already expressed as
    P(model better)); the mean cancels position bias, a missing order falls back to the other."""
    got = [x for x in (first, second) if x is not None]
    return sum(got) / len(got) if got else None


def position_bias(first_slot_wins: Sequence[bool | None]) -> float:
    """Share of decided judgments won by the output shown first (None: a draw, left out).
    Example: [True, True, False, None] -> 2/3. An unbiased judge gives about 0.5."""
    decided = [x for x in first_slot_wins if x is not None]
    return sum(decided) / len(decided) if decided else math.nan


@dataclass(frozen=True)
class Agreement:
    pairs: int  # pairs with a decided judge verdict
    agreements: int  # of them, the RM scored the judge's winner higher
    rate: float


def agreement(judge_verdicts: Sequence[int], score_model: Sequence[float], score_base: Sequence[float]) -> Agreement:
    """RM–judge agreement over pairs. judge_verdicts: +1 / −1 / 0 (draws are left out, the
    judge expressed no preference to agree with); an RM tie counts as disagreement.
    Example: verdicts [1, -1, 1, 0], model [2, 1, 0, 5], base [1, 3, 1, 0] -> 2 of 3 agree."""
    if not len(judge_verdicts) == len(score_model) == len(score_base):
        raise ValueError("judge_verdicts, score_model and score_base need one entry per pair")
    pairs = agree = 0
    for v, a, b in zip(judge_verdicts, score_model, score_base):
        if v == 0:
            continue
        pairs += 1
        agree += int((a > b and v > 0) or (a < b and v < 0))
    return Agreement(pairs, agree, agree / pairs if pairs else math.nan)


def rm_preferences(score_model: Sequence[float], score_base: Sequence[float]) -> list[float]:
    """A reward model as a judge: 1 if it scores the model's output higher, 0 lower, 0.5 tie."""
    return [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(score_model, score_base)]


@dataclass(frozen=True)
class Correlation:
    n: int
    pearson: float
    spearman: float


def correlation(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Pearson and Spearman (scipy); nan when n < 2 or either side is constant.
    Example: x [1, 2, 3, 4], y [1, 3, 2, 4] -> Pearson 0.8, Spearman 0.8."""
    if len(x) != len(y):
        raise ValueError("x and y need the same length")
    n = len(x)
    if n < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return Correlation(n, math.nan, math.nan)
    from scipy import stats

    return Correlation(n, float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0]))
