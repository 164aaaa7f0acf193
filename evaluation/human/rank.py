"""`crs-rlhf eval rank`: merge human rankings per prompt (Tideman), score them (normalised Borda).

    crs-rlhf eval rank --annotations DIR/annotations.jsonl [--out DIR] [--tie-break A,B,C]

Writes OUT/rankings.json, OUT/report.md (a table) and OUT/human_borda.png (a bar chart with
± sd over groups). OUT defaults to the annotations file's folder. See ranking.py for the
exact rules (what counts as a tie, how equal margins are broken, points of tied places).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation.human.ranking import HumanEvalResult, aggregate
from evaluation.human.store import read_rows

PROG = "crs-rlhf eval rank"


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def report_markdown(result: HumanEvalResult, source: str) -> str:
    models = sorted(result.borda, key=lambda m: -result.borda[m]["mean"])
    n_items, n_rankings = len(result.tideman), sum(result.annotators.values())
    lines = [
        "# Human evaluation",
        "",
        (
            f"{n_rankings} rankings of {n_items} prompt×group items from `{source}` (the latest answer per prompt, "
            f"group and annotator), merged per item with Tideman's ranked pairs and scored with normalised "
            f"Borda points (rank r of K → (K − r + 1)/K; tied places share the average). Mean over prompts per "
            f"group, then mean ± sd over {len(result.groups)} group(s) (population sd, divisor n, as the thesis; "
            f"the sample sd (n − 1) is `sd_sample` in rankings.json)."
        ),
        "",
        "| model | Borda mean | sd over groups | " + " | ".join(f"group {g}" for g in result.groups) + " | prompts |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in result.groups) + " | ---: |",
    ]
    for m in models:
        b = result.borda[m]
        per = " | ".join(_fmt(b["per_group"].get(g)) for g in result.groups)
        lines.append(f"| {m} | {_fmt(b['mean'])} | {_fmt(b['sd'])} | {per} | {b['prompts']} |")
    firsts = {m: sum(1 for tiers in result.tiers.values() if m in tiers[0]) for m in models}
    lines += [
        "",
        "Merged first place (ties count for each tied model): "
        + ", ".join(f"{m} {firsts[m]}/{n_items}" for m in models),
        "",
        "![Borda points](human_borda.png)",
        "",
    ]
    return "\n".join(lines)


def plot_borda(result: HumanEvalResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted(result.borda, key=lambda m: -result.borda[m]["mean"])
    means = [result.borda[m]["mean"] for m in models]
    sds = [result.borda[m]["sd"] or 0.0 for m in models]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(models), 3.6))
    bars = ax.bar(models, means, yerr=sds, capsize=6, color="#0a66c2")
    for bar, mean, sd in zip(bars, means, sds, strict=True):  # above the error bar, not on it
        ax.text(bar.get_x() + bar.get_width() / 2, mean + sd + 0.02, f"{mean:.2f}", ha="center", va="bottom")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("normalised Borda points")
    ax.set_title(f"Human ranking ({len(result.groups)} group(s), ± sd over groups)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--annotations", required=True, help="annotations.jsonl (or a CSV from 'eval annotate export')")
    ap.add_argument("--out", help="output folder (default: the annotations file's folder)")
    ap.add_argument("--tie-break", help="model order that breaks equal Tideman margins (default: names sorted)")
    ap.add_argument("--tie-rule", choices=["thesis", "tied"], default="thesis",
                    help="zero-margin pairs: 'thesis' (Open Assistant's code: decided by the tie-break order, "
                         "always a strict order) or 'tied' (left tied, points shared)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    src = Path(args.annotations)
    out = Path(args.out) if args.out else src.parent
    tie_break = [m.strip() for m in args.tie_break.split(",")] if args.tie_break else None
    try:
        result = aggregate([r.model_dump() for r in read_rows(src)], tie_break=tie_break, rule=args.tie_rule)
    except (OSError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "rankings.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(result, src.name))
    plot_borda(result, out / "human_borda.png")
    for m in sorted(result.borda, key=lambda m: -result.borda[m]["mean"]):
        print(f"{m:>12}  {_fmt(result.borda[m]['mean'])} ± {_fmt(result.borda[m]['sd'])}")
    print(f"wrote {out / 'rankings.json'}, {out / 'report.md'}, {out / 'human_borda.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
