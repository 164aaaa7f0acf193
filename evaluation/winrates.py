"""Judgments -> win_rates.csv: one row per (model, baseline) pair and source, plus an `all` row.

Rows with a `category` other than `all` split a source by its prompts' category (Vicuna's,
OASST's language, ...: the thesis's Table 22). The CSV is in AlpacaEval's units and names: rates and their errors in PERCENT (`win_rate`
66.0, `standard_error` 4.76), `n_wins`, `n_wins_base`, `n_draws`, `n_total`, `avg_length`;
`sign_test_p` and `position_bias` stay in [0, 1]. `alpaca_annotations` writes the verdicts
as AlpacaEval annotations (`preference` in [1, 2]) so `alpaca_eval`'s own metric code
recomputes the same board.

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

COLUMNS = ["model", "baseline", "source", "category", "win_rate", "standard_error", "ci95_low", "ci95_high", "wilson_low",
           "wilson_high", "se_binomial", "sign_test_p", "soft_win_rate", "soft_standard_error", "n_wins",
           "n_wins_base", "n_draws", "n_total", "n_invalid", "avg_length", "position_bias", "judge"]
PERCENT = ("win_rate", "standard_error", "ci95_low", "ci95_high", "wilson_low", "wilson_high", "se_binomial",
           "soft_win_rate", "soft_standard_error")  # fractions in evaluation.stats, percent in the CSV


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


def _row(model: str, base: str, source: str, prompts: Sequence[dict], lengths: dict[str, int], judge: str,
         category: str = "all") -> dict:
    valid = [p for p in prompts if p["preference"] is not None]
    wr = stats.win_rate([p["preference"] for p in valid], n_invalid=len(prompts) - len(valid),
                        discrete=[p["discrete"] for p in valid])
    both = [w for p in prompts if p["n_orders"] > 1 for w in p["first_wins"]]
    lens = [lengths[p["id"]] for p in prompts if p["id"] in lengths]
    summary = {k: (100.0 * v if k in PERCENT else v) for k, v in asdict(wr).items()}
    return {"model": model, "baseline": base, "source": source, "category": category, **summary,
            "avg_length": sum(lens) / len(lens) if lens else math.nan,
            "position_bias": stats.position_bias(both) if both else None, "judge": judge}


def win_rate_rows(records: Iterable[dict], outputs: dict[str, list[dict]], judge: str) -> list[dict]:
    rows = []
    for (model, base), prompts in sorted(per_prompt(records).items()):
        lengths = {r["id"]: len(r["output"]) for r in outputs.get(model, [])}  # AlpacaEval: characters
        items = [{"id": pid, **p} for pid, p in prompts.items()]
        cats = {r["id"]: r["category"] for r in outputs.get(model, []) if r.get("category") is not None}
        for source in sorted({p["source"] for p in items}):
            here = [p for p in items if p["source"] == source]
            rows.append(_row(model, base, source, here, lengths, judge))
            for cat in sorted({cats[p["id"]] for p in here if p["id"] in cats}):  # thesis Table 22
                rows.append(_row(model, base, source, [p for p in here if cats.get(p["id"]) == cat], lengths, judge,
                                 category=cat))
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
    """The `all` rows as a console table: model vs baseline, win rate % ± SE, Wilson CI, n, sign test."""
    lines = [(f"{'model':>16s} {'baseline':>16s} {'win %':>7s} {'± SE':>6s}  {'Wilson 95% CI':>15s} {'n':>4s} "
              f"{'invalid':>7s} {'sign p':>7s}")]
    for r in rows:
        if r["source"] != source:
            continue
        ci = f"[{r['wilson_low']:.1f}, {r['wilson_high']:.1f}]"
        lines.append(f"{r['model']:>16s} {r['baseline']:>16s} {r['win_rate']:7.1f} {r['standard_error']:6.2f}  "
                     f"{ci:>15s} {r['n_total']:4d} {r['n_invalid']:7d} {r['sign_test_p']:7.3g}")
    return "\n".join(lines)


def alpaca_annotations(records: Iterable[dict], outputs: dict[str, list[dict]]) -> dict[tuple[str, str], list[dict]]:
    """{(model, baseline): AlpacaEval annotation rows}, one per prompt with a valid verdict.

    AlpacaEval's convention: `output_1`/`generator_1` is the baseline, `output_2` the model, and
    `preference` = 1 + P(output_2 better) in [1, 2] (1.5 a draw). `preference` carries the
    per-prompt HARD verdict (1, 1.5, 2), so alpaca_eval's `get_winrate` gives our `win_rate`
    and `standard_error`; `preference_soft` = 1 + the soft preference (our `soft_win_rate`).
    Our own judgments store P(model better) in [0, 1]: read as-is by alpaca_eval they would be
    wrong (0.602 means a 60.2 % win rate, AlpacaEval would see preference 0.602, no preference)."""
    by_id = {name: {r["id"]: r for r in rows} for name, rows in outputs.items()}
    out = {}
    for (model, base), prompts in sorted(per_prompt(records).items()):
        rows = []
        for pid, p in prompts.items():
            if p["preference"] is None or pid not in by_id.get(model, {}) or pid not in by_id.get(base, {}):
                continue
            m, b = by_id[model][pid], by_id[base][pid]
            hard = (stats.hard_verdict(p["discrete"]) + 1) / 2
            rows.append({"instruction": m["instruction"], "output_1": b["output"], "generator_1": base,
                         "output_2": m["output"], "generator_2": model, "dataset": m.get("dataset") or p["source"],
                         "id": pid, "preference": 1.0 + hard, "preference_soft": 1.0 + p["preference"]})
        out[(model, base)] = rows
    return out


def write_alpaca_annotations(run_dir: Path, records: Iterable[dict], outputs: dict[str, list[dict]]) -> list[Path]:
    """run_dir/alpaca_eval/<model>_vs_<baseline>/annotations.json for each judged pair."""
    import json

    written = []
    for (model, base), rows in alpaca_annotations(records, outputs).items():
        folder = Path(run_dir) / "alpaca_eval" / f"{model}_vs_{base}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "annotations.json"
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        written.append(path)
    return written
