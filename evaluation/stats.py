"""The evaluation chapter's statistics, as pure functions on plain numbers.

Per prompt the judge gives a soft preference P(model better) in [0, 1] and a hard verdict
(win 1, draw ½, loss 0). Where two conventions exist, both are computed (docs/evaluation.md):

    win rate         (wins + ½·draws) / n from the HARD verdicts: the thesis's (its judge gave
                     hard verdicts) and AlpacaEval's `discrete_win_rate`
    soft win rate    mean soft preference (AlpacaEval's weighted `win_rate`); 66 wins at 0.7 and
                     34 losses at 0.3 give 0.564 soft vs 0.66 hard
    standard error   AlpacaEval's: the SAMPLE standard error (n − 1) of the per-prompt hard
                     preferences; the thesis's Table 23 prints these (66 of 100 -> 4.76 %)
    SE, Eq. 7.1      sqrt(p (1 − p) / n), the binomial formula the thesis writes (66 of 100 ->
                     4.74 %): the `se_binomial` column
    95 % CI          p ± 1.96 · SE (the thesis's, with AlpacaEval's SE: 66 % ± 9.33), clipped;
                     beside it the Wilson score interval, which stays honest at small n (8 wins
                     of 8 -> [0.676, 1], where p ± 1.96·SE collapses to [1, 1])
    sign test        exact two-sided binomial test of wins vs losses (draws left out)
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
    """Eq. 7.1's binomial sqrt(p(1−p)/n); nan for n = 0. Example: p = 0.6, n = 100 -> 0.04899."""
    if n <= 0:
        return math.nan
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def ci95(p: float, se: float) -> tuple[float, float]:
    """p ± 1.96·SE clipped to [0, 1]. Example: p = 0.6, SE = 0.049 -> (0.504, 0.696)."""
    if math.isnan(p) or math.isnan(se):
        return math.nan, math.nan
    return max(0.0, p - Z95 * se), min(1.0, p + Z95 * se)


def sample_standard_error(values: Sequence[float]) -> float:
    """AlpacaEval's standard error: sample sd (n − 1) / sqrt(n); nan for n < 2.
    Example: 66 ones and 34 zeros -> sqrt(0.66·0.34·100/99) / 10 = 0.04761 (Table 23's 4.76 %)."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1) / n)


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion p over n trials (draws count ½ in p); nan for n = 0.
    Example: 8 wins of 8 -> (0.6756, 1.0); 66 of 100 -> (0.5627, 0.7457)."""
    if n <= 0 or math.isnan(p):
        return math.nan, math.nan
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial (sign) test of wins vs losses under p = ½, draws left out.
    Example: 8 wins, 0 losses -> 2 · 0.5^8 = 0.0078; 6 vs 2 -> 0.289; 0 vs 0 -> 1."""
    m = wins + losses
    if m == 0:
        return 1.0
    k = max(wins, losses)
    tail = sum(math.comb(m, i) for i in range(k, m + 1)) / 2**m
    return min(1.0, 2 * tail)


def hard_verdict(preference: float) -> int:
    """+1 the model wins, −1 the baseline wins, 0 a draw (exactly 0.5)."""
    return 1 if preference > 0.5 else -1 if preference < 0.5 else 0


@dataclass(frozen=True)
class WinRate:
    """One row of win_rates.csv (AlpacaEval's names; fractions here, percent in the CSV)."""

    win_rate: float  # (wins + ½·draws) / n_total from the hard verdicts
    standard_error: float  # AlpacaEval's: sample SE (n − 1) of the per-prompt hard preferences
    ci95_low: float  # win_rate ± 1.96·standard_error, clipped to [0, 1] (the thesis's CI)
    ci95_high: float
    wilson_low: float  # Wilson score interval of win_rate
    wilson_high: float
    se_binomial: float  # Eq. 7.1: sqrt(p(1−p)/n) of win_rate
    sign_test_p: float  # exact two-sided sign test, wins vs losses
    soft_win_rate: float  # mean soft preference P(model better)
    soft_standard_error: float  # sample SE of the soft preferences
    n_wins: int
    n_wins_base: int
    n_draws: int
    n_total: int  # valid verdicts only: n_wins + n_wins_base + n_draws
    n_invalid: int


def win_rate(preferences: Sequence[float], n_invalid: int = 0, discrete: Sequence[float] | None = None) -> WinRate:
    """Summarise valid preferences (each in [0, 1]).

    `discrete` (optional, one per preference) gives the hard verdicts to count when they are
    not simply the soft ones rounded: with both orders, a prompt whose two verdicts disagree
    is a draw (FastChat's rule) even if its mean soft preference is 0.49.
    Example: [1, 1, 0, 0.5] -> wins 2, losses 1, draws 1, win rate 2.5/4 = 0.625, sample SE
    sqrt(((3/8)²·2 + (5/8)² + (1/8)²)/3/4) = 0.2394; soft [0.9, 0.2] -> soft 0.55, hard 0.5.
    """
    prefs = [float(x) for x in preferences]
    if any(not 0.0 <= x <= 1.0 for x in prefs):
        raise ValueError("preferences must lie in [0, 1] (1: the model's output is better)")
    n = len(prefs)
    if discrete is not None and len(discrete) != n:
        raise ValueError("discrete needs one verdict per preference")
    verdicts = [hard_verdict(x) for x in (prefs if discrete is None else discrete)]
    hard = [(v + 1) / 2 for v in verdicts]  # 1 / ½ / 0 per prompt
    wins, losses = verdicts.count(1), verdicts.count(-1)
    draws = n - wins - losses
    p = sum(hard) / n if n else math.nan
    se = sample_standard_error(hard)
    low, high = ci95(p, se)
    w_low, w_high = wilson_interval(p, n)
    return WinRate(p, se, low, high, w_low, w_high, standard_error(p, n), sign_test(wins, losses),
                   sum(prefs) / n if n else math.nan, sample_standard_error(prefs), wins, losses, draws, n, n_invalid)


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
