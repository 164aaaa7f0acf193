"""`crs-rlhf eval report DIR`: report.md and the figures people look at instead of the CSVs.

    winrate_matrix.png      row beats column: win rate and n per cell (judge; RMs if no judge)
    win_rates_ci.png        each pair's win rate with its Wilson 95 % interval, 50 % marked
    agreement.png           RM–judge agreement per source
    score_distribution.png  score per policy, one panel per RM
    score_vs_length.png     score vs response tokens, Pearson/Spearman in the title
    length_winners.png      lengths of winning vs losing responses (thesis Fig. 25)

report.md also has each judge's average win rate per model (thesis Table 10) and the RM–judge
agreement per policy pair (Tables 12, 13, 18, 19).

Whatever files exist are reported; a missing step is named with the command that makes it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from evaluation.io import EvalInputError, read_csv
from evaluation.tables import average_win_rates, winner_loser_lengths


def _f(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_matrix(rows: list[dict], path: Path, title: str) -> Path:
    plt = _plt()
    import numpy as np

    names = sorted({r["model"] for r in rows} | {r["baseline"] for r in rows})
    idx = {n: i for i, n in enumerate(names)}
    m = np.full((len(names), len(names)), np.nan)
    n = np.zeros_like(m)
    for r in rows:
        i, j, p = idx[r["model"]], idx[r["baseline"]], _f(r["win_rate"]) / 100  # the CSV is in percent
        m[i, j], m[j, i] = p, 1 - p
        n[i, j] = n[j, i] = int(r["n_total"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 1.2 + 1.0 * len(names)))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="RdYlGn")
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}\nn={int(n[i, j])}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("baseline (column)")
    ax.set_ylabel("model (row)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="win rate of row over column")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ci(rows: list[dict], path: Path, title: str) -> Path:
    plt = _plt()
    labels = [f"{r['model']} vs {r['baseline']}" + (f" [{r['judge']}]" if r.get("judge") else "") for r in rows]
    # Wilson, not p ± 1.96·SE: the latter has zero width at 8 wins of 8 (docs/evaluation.md)
    p = [_f(r["win_rate"]) for r in rows]
    lo = [max(0.0, x - _f(r["wilson_low"])) for x, r in zip(p, rows)]
    hi = [max(0.0, _f(r["wilson_high"]) - x) for x, r in zip(p, rows)]
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.45 * len(rows)))
    ax.errorbar(p, range(len(rows)), xerr=[lo, hi], fmt="o", capsize=4)
    ax.axvline(50, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlim(0, 100)
    ax.set_xlabel("win rate % (Wilson 95 % interval)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_agreement(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    rms = sorted({r["rm"] for r in rows})
    sources = sorted({r["source"] for r in rows}, key=lambda s: (s == "all", s))
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(sources), 3.5))
    width = 0.8 / max(1, len(rms))
    for k, rm in enumerate(rms):
        vals = {r["source"]: r for r in rows if r["rm"] == rm}
        xs = [i + k * width for i in range(len(sources))]
        ys = [_f(vals[s]["rate"]) if s in vals else math.nan for s in sources]
        bars = ax.bar(xs, ys, width, label=rm)
        for b, s in zip(bars, sources):
            if s in vals:
                ax.annotate(f"n={vals[s]['pairs']}", (b.get_x() + b.get_width() / 2, 0.02), ha="center", fontsize=7)
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sources))], sources)
    ax.set_ylim(0, 1)
    ax.set_ylabel("agreement with the judge")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scores(scores: list[dict], length_rows: list[dict], dist_path: Path, scatter_path: Path) -> list[Path]:
    plt = _plt()
    rms = sorted({r["rm"] for r in scores})
    models = sorted({r["model"] for r in scores})
    corr = {(r["model"], r["rm"]): r for r in length_rows}
    by = defaultdict(list)
    for r in scores:
        by[(r["rm"], r["model"])].append(r)
    fig, axes = plt.subplots(1, len(rms), figsize=(4.5 * len(rms), 3.6), squeeze=False)
    for ax, rm in zip(axes[0], rms):
        ax.boxplot([[r["score"] for r in by[(rm, m)]] for m in models], tick_labels=models)
        ax.set_title(f"{rm}: score per policy")
        ax.set_ylabel("score (raw logit)")
    fig.tight_layout()
    fig.savefig(dist_path, dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(rms), figsize=(4.5 * len(rms), 3.6), squeeze=False)
    for ax, rm in zip(axes[0], rms):
        for m in models:
            pts = by[(rm, m)]
            ax.scatter([r["n_tokens"] for r in pts], [r["score"] for r in pts], s=14, alpha=0.7, label=m)
        c = corr.get(("all", rm), {})
        ax.set_title(f"{rm}: Pearson {_f(c.get('pearson')):.2f}, Spearman {_f(c.get('spearman')):.2f}", fontsize=9)
        ax.set_xlabel("response length (tokens)")
        ax.set_ylabel("score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(scatter_path, dpi=110)
    plt.close(fig)
    return [dist_path, scatter_path]


def plot_lengths(wins: list[int], losses: list[int], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = 20 if len(wins) + len(losses) > 40 else 10
    ax.hist([wins, losses], bins=bins, label=[f"winning (mean {sum(wins) / len(wins):.0f})",
                                              f"losing (mean {sum(losses) / len(losses):.0f})"])
    ax.set_xlabel("response length (characters)")
    ax.set_ylabel("responses")
    ax.set_title(f"Winning vs losing response length, {len(wins)} decided verdicts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        x = _f(v)
        return f"{x:.3f}" if not math.isnan(x) and isinstance(v, str) and "." in v else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def make_report(run_dir: Path) -> Path:
    """Write run_dir/report.md and the PNGs from whatever results the folder holds."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalInputError(f"{run_dir}: no such folder")
    md = [f"# Evaluation report: {run_dir.name}", ""]
    have = {name: run_dir / name for name in ("win_rates.csv", "rm_win_rates.csv", "agreement.csv", "length.csv",
                                              "rm_scores.jsonl") if (run_dir / name).is_file()}
    if not have:
        raise EvalInputError(f"{run_dir}: no results yet; run `crs-rlhf eval judge` and/or `eval rm-score` first")
    cols = ["model", "baseline", "source", "category", "win_rate", "standard_error", "ci95_low", "ci95_high", "wilson_low",
            "wilson_high", "se_binomial", "sign_test_p", "soft_win_rate", "n_wins", "n_wins_base", "n_draws", "n_total",
            "n_invalid", "avg_length", "position_bias"]
    for key, title in (("win_rates.csv", "Win rates (LLM judge)"), ("rm_win_rates.csv", "Win rates (reward models as judges)")):
        if key not in have:
            md += [f"## {title}", "", f"_not computed: run `crs-rlhf eval {'judge' if key == 'win_rates.csv' else 'rm-score'}`_", ""]
            continue
        rows = read_csv(have[key])
        stem = key.removesuffix(".csv")
        md += [f"## {title}", "", _table(rows, cols + (["judge"] if key != "win_rates.csv" else [])), ""]
        for judge in sorted({r.get("judge", "") for r in rows}):
            tag = judge.replace(":", "_") or "judge"
            sub = [r for r in rows if r["source"] == "all" and r.get("judge", "") == judge]
            if sub:
                mx = plot_matrix(sub, run_dir / f"{stem}_{tag}_matrix.png" if key != "win_rates.csv"
                                 else run_dir / "winrate_matrix.png", f"win rate, {judge or 'judge'}")
                ci = plot_ci(sub, run_dir / (f"{stem}_{tag}_ci.png" if key != "win_rates.csv" else "win_rates_ci.png"),
                             f"win rate with Wilson 95 % interval, {judge or 'judge'}")
                md += [f"![{mx.stem}]({mx.name})", f"![{ci.stem}]({ci.name})", ""]
                avg = average_win_rates(sub)  # Table 10: each model over every pair it was in
                md += [f"Average win rate per model ({judge or 'judge'}):", "",
                       _table([{"model": m, "average_win_rate": f"{p:.2f}", "pairs": n} for m, (p, n) in
                               sorted(avg.items(), key=lambda kv: -kv[1][0])], ["model", "average_win_rate", "pairs"]),
                       ""]
    if "agreement.csv" in have:
        rows = read_csv(have["agreement.csv"])
        pooled = [r for r in rows if r.get("model", "all") == "all"]  # older files have no pair columns
        md += ["## RM–judge agreement", "", "Pooled over the judged pairs:", "",
               _table(pooled, ["rm", "source", "pairs", "agreements", "rate"]), ""]
        per_pair = [r for r in rows if r.get("model", "all") != "all"]
        if per_pair:  # the thesis's Tables 12, 13, 18, 19: one policy pair each
            md += ["Per policy pair:", "", _table(per_pair, ["rm", "model", "baseline", "source", "pairs", "agreements",
                                                          "rate"]), ""]
        md += [f"![agreement]({plot_agreement(pooled, run_dir / 'agreement.png').name})", ""]
    if "rm_scores.jsonl" in have and "length.csv" in have:
        scores = [json.loads(line) for line in have["rm_scores.jsonl"].read_text().splitlines() if line.strip()]
        lrows = read_csv(have["length.csv"])
        md += ["## Reward vs response length", "",
               _table(lrows, ["model", "rm", "n", "pearson", "spearman", "mean_score", "mean_tokens"]), ""]
        for p in plot_scores(scores, lrows, run_dir / "score_distribution.png", run_dir / "score_vs_length.png"):
            md += [f"![{p.stem}]({p.name})"]
        md.append("")
    if (run_dir / "judgments.jsonl").is_file() and (run_dir / "outputs").is_dir():
        from evaluation.generate import load_outputs
        from evaluation.judge import current_judgments

        try:
            outputs = load_outputs(run_dir)
            wins, losses = winner_loser_lengths(current_judgments(run_dir, outputs), outputs)
        except EvalInputError:  # several judges in one folder, or no outputs: no figure, said so
            wins, losses = [], []
        if wins:
            png = plot_lengths(wins, losses, run_dir / "length_winners.png")
            md += ["## Length of winning vs losing responses", "", f"![{png.stem}]({png.name})", ""]
    md += ["Win rates in percent from hard verdicts (draws ½); soft_win_rate = mean P(model better).",
           "standard_error = AlpacaEval's sample SE (n − 1); se_binomial = sqrt(p(1−p)/n) (the thesis's Eq. 7.1);",
           "ci95 = win_rate ± 1.96·standard_error; wilson = Wilson score interval; sign_test_p = exact two-sided",
           "sign test of wins vs losses. Invalid judge verdicts are counted in n_invalid and left out of n_total.", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(md), encoding="utf-8")
    return out
