"""Judgments -> win_rates.csv: one row per (model, baseline) pair and source, plus an `all` row.

Per prompt, the valid judgments of a pair (one, or two with --both-orders) become one
preference P(model better) (`stats.combine_orders`); a prompt with no valid judgment is
counted in n_invalid and left out of n_total. The same summary serves reward models as
judges (`rm_win_rates`): an RM "prefers" the output it scores higher.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

from evaluation import stats
from evaluation.io import write_csv

COLUMNS = ["model", "baseline", "source", "win_rate", "standard_error", "ci95_low", "ci95_high", "n_wins",
           "n_wins_base", "n_draws", "n_total", "n_invalid", "discrete_win_rate", "avg_length", "position_bias",
           "judge"]


def per_prompt(records: Iterable[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """{(model, baseline): {prompt id: {"source", "preference", "discrete", "first_wins", ...}}}.

    preference: mean soft P(model better) over the valid orders (None: none valid);
    discrete: mean of the orders' hard verdicts (1 / 0.5 / 0), so disagreeing orders draw."""
    out: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for r in records:
        slot = out[(r["model"], r["baseline"])].setdefault(
            r["id"], {"source": r["source"], "prefs": [], "hard": [], "first_wins": [], "n_orders": 0})
        slot["n_orders"] += 1
        if r.get("valid"):
            slot["prefs"].append(float(r["preference"]))
            slot["hard"].append((stats.hard_verdict(float(r["preference"])) + 1) / 2)  # 1 / 0.5 / 0
            verdict = stats.hard_verdict(float(r["p_first"]))
            slot["first_wins"].append(None if verdict == 0 else verdict > 0)
    for prompts in out.values():
        for p in prompts.values():
            prefs, hard = p["prefs"][:2], p["hard"][:2]
            p["preference"] = stats.combine_orders(*(prefs + [None] * (2 - len(prefs))))
            p["discrete"] = stats.combine_orders(*(hard + [None] * (2 - len(hard))))
    return out


def _row(model: str, base: str, source: str, prompts: Sequence[dict], lengths: dict[str, int], judge: str) -> dict:
    valid = [p for p in prompts if p["preference"] is not None]
    wr = stats.win_rate([p["preference"] for p in valid], n_invalid=len(prompts) - len(valid),
                        discrete=[p["discrete"] for p in valid])
    both = [w for p in prompts if p["n_orders"] > 1 for w in p["first_wins"]]
    lens = [lengths[p["id"]] for p in prompts if p["id"] in lengths]
    return {"model": model, "baseline": base, "source": source, **asdict(wr),
            "avg_length": sum(lens) / len(lens) if lens else math.nan,
            "position_bias": stats.position_bias(both) if both else None, "judge": judge}


def win_rate_rows(records: Iterable[dict], outputs: dict[str, list[dict]], judge: str) -> list[dict]:
    rows = []
    for (model, base), prompts in sorted(per_prompt(records).items()):
        lengths = {r["id"]: len(r["output"]) for r in outputs.get(model, [])}  # AlpacaEval: characters
        items = [{"id": pid, **p} for pid, p in prompts.items()]
        for source in sorted({p["source"] for p in items}):
            rows.append(_row(model, base, source, [p for p in items if p["source"] == source], lengths, judge))
        rows.append(_row(model, base, "all", items, lengths, judge))
    return rows


def rm_win_rate_rows(scores: dict[tuple[str, str], float], outputs: dict[str, list[dict]],
                     pairs: Sequence[tuple[str, str]], rm: str) -> list[dict]:
    """Win rates with a reward model as the judge; scores[(policy, prompt id)] -> score."""
    records = []
    for model, base in pairs:
        for r in outputs[model]:
            a, b = scores.get((model, r["id"])), scores.get((base, r["id"]))
            if a is None or b is None:
                continue
            p = stats.rm_preferences([a], [b])[0]
            records.append({"model": model, "baseline": base, "id": r["id"], "source": r.get("dataset") or "default",
                            "valid": True, "preference": p, "p_first": p})
    return win_rate_rows(records, outputs, judge=f"rm:{rm}")


def write_win_rates(path: Path, rows: Sequence[dict]) -> Path:
    return write_csv(path, rows, COLUMNS)


def format_table(rows: Sequence[dict], source: str = "all") -> str:
    """The `all` rows as a console table: model vs baseline, win rate ± SE, CI, n."""
    lines = [f"{'model':>16s} {'baseline':>16s} {'win_rate':>9s} {'± SE':>7s}  {'95% CI':>15s} {'n':>4s} {'invalid':>7s}"]
    for r in rows:
        if r["source"] != source:
            continue
        ci = f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]"
        lines.append(f"{r['model']:>16s} {r['baseline']:>16s} {r['win_rate']:9.3f} {r['standard_error']:7.3f}  "
                     f"{ci:>15s} {r['n_total']:4d} {r['n_invalid']:7d}")
    return "\n".join(lines)
