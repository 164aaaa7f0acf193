"""Derived thesis tables and figures from the evaluation files, as pure functions.

    average_win_rates     Table 10: each model's mean win rate over every pair it was judged in
                          (the thesis picked crs 0.625 at 58.5 %, 0.25 at 54.0 % on tuning_eval)
    winner_loser_lengths  Fig. 25: lengths of the winning and the losing response of each
                          decided judge verdict (characters, AlpacaEval's length unit)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from evaluation import stats
from evaluation.winrates import per_prompt


def average_win_rates(rows: Sequence[dict]) -> dict[str, tuple[float, int]]:
    """{model: (mean win rate in percent, pairs)} from one judge's `all` rows of win_rates.csv:
    a row gives its model `win_rate` and its baseline 100 − `win_rate`.
    Example: a vs b 60, a vs c 70, b vs c 50 -> a 65.0, b (40 + 50) / 2 = 45.0, c (30 + 50) / 2 = 40.0."""
    got: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        p = float(r["win_rate"])
        got[r["model"]].append(p)
        got[r["baseline"]].append(100.0 - p)
    return {m: (sum(v) / len(v), len(v)) for m, v in sorted(got.items())}


def winner_loser_lengths(judgments: Sequence[dict], outputs: dict[str, list[dict]]) -> tuple[list[int], list[int]]:
    """(winning lengths, losing lengths), one each per prompt and pair with a decided verdict
    (a draw, or orders that disagree, gives neither)."""
    text = {(name, r["id"]): r["output"] for name, rows in outputs.items() for r in rows}
    wins, losses = [], []
    for (model, base), prompts in sorted(per_prompt(judgments).items()):
        for pid, p in sorted(prompts.items()):
            if p["preference"] is None or (model, pid) not in text or (base, pid) not in text:
                continue
            v = stats.hard_verdict(p["discrete"])
            if v == 0:
                continue
            winner, loser = (model, base) if v > 0 else (base, model)
            wins.append(len(text[(winner, pid)]))
            losses.append(len(text[(loser, pid)]))
    return wins, losses
