"""`crs-rlhf data-report --data PATH --out DIR`: the thesis's data counts and label figures.

Counts use the same filters and splits as the thesis presets (configs/thesis/), so each number
is what that training run would see: SFT threads (top-20 languages, every best-ranked thread),
ranked sets and absolute rows (en/es/fr/de; rows = the ranked sets' replies with all six
labels, target `quality`) per range and per `under_s` bin, and RL prompts per language with
the held-out trees apart. Figures: label correlations (thesis Fig. 17), label distributions
(Fig. 18), the distribution of the weighted average score under w2 and w3 (Fig. 19:
`weighted_scores.png`, few rows above 0.8, most near the middle: why the thesis moved to
the quality label alone), and the quality-target histogram with the ranges and under_s
bins marked (`absolute_labels.png`, the ranges the remedies act on).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from trainer.data.builders import (
    build_absolute_rows,
    build_preference_sets,
    build_sft_threads,
    skip_close_to_best,
    with_targets,
)
from trainer.data.filters import filter_trees, split_by_tree, top_languages
from trainer.data.labels import SIX_LABELS, label_range, mid_bin
from trainer.data.oasst import OasstFormatError, load_oasst
from trainer.data.rl import RM_LANGS, THESIS_HELD_OUT, RLPromptOptions, build_rl_prompt_split, held_out_tree_ids

# Thesis numbers on the real export, for the side-by-side column (docs/method.md).
THESIS = {"ranked_sets": (14080, 1488), "absolute_rows": (38852, 2041), "low": 4104, "mid": 26961, "high": 7787,
          "rl_prompts": 24000}
BINS = ("0.41-0.50", "0.51-0.60", "0.61-0.70", "0.71-0.80", "0.81-0.89")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="crs-rlhf data-report", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="OASST trees/messages file, datasets folder or name; 'fixture' = the shipped sample")
    p.add_argument("--out", required=True, help="folder for counts.md, counts.json and the PNG figures")
    p.add_argument("--sft-eval-fraction", type=float, default=0.05)
    p.add_argument("--pref-eval-fraction", type=float, default=0.1, help="thesis: 1,488 of 15,568 sets")
    p.add_argument("--abs-eval-fraction", type=float, default=0.05, help="thesis: 2,041 of 40,893 rows")
    p.add_argument("--split-seed", type=int, default=0, help="seed of each stage's validation split")
    p.add_argument("--held-out-fraction", type=float, default=THESIS_HELD_OUT, help="share of trees every stage holds out for evaluation (seed 0)")
    p.add_argument("--incomplete-trees", action="store_true", help="RL: also prefixes of unfinished trees")
    return p.parse_args(argv)


def compute_counts(trees, a: argparse.Namespace) -> tuple[dict, dict]:
    """(counts, figure data) for loaded trees; pure apart from the builders it calls."""
    held = held_out_tree_ids(trees, a.held_out_fraction)  # every stage leaves these trees out
    rl = build_rl_prompt_split(trees, RLPromptOptions(held_out_fraction=a.held_out_fraction,
                                                      incomplete_trees=a.incomplete_trees))
    n_read = len(trees)
    trees = [t for t in trees if t.tree_id not in held]
    kept = filter_trees(trees)
    langs20 = top_languages(kept.trees, 20)
    sft = split_by_tree(filter_trees(trees, langs=langs20).trees, a.sft_eval_fraction, a.split_seed)
    rm_trees = filter_trees(trees, langs=RM_LANGS).trees
    pref = split_by_tree(rm_trees, a.pref_eval_fraction, a.split_seed)
    ab = split_by_tree(rm_trees, a.abs_eval_fraction, a.split_seed)
    abs_train = with_targets(build_absolute_rows(ab.train)).rows
    abs_eval = with_targets(build_absolute_rows(ab.eval)).rows
    ranges = {k: sum(label_range(r.target) == k for r in abs_train) for k in ("low", "mid", "high")}
    bins = [0] * 5
    for r in abs_train:
        if label_range(r.target) == "mid":
            bins[mid_bin(r.target)] += 1
    labelled = build_absolute_rows(rm_trees)  # every split: the label figures describe the data
    counts = {
        "trees_read": n_read, "held_out_trees": len(held), "trees_kept": len(kept.trees), "filters": kept.report.describe(),
        "messages_kept": sum(t.size() for t in kept.trees),
        "sft_languages": langs20,
        "sft_threads": [len(build_sft_threads(sft.train)), len(build_sft_threads(sft.eval))],
        "ranked_sets": [len(build_preference_sets(pref.train)), len(build_preference_sets(pref.eval))],
        "absolute_rows": [len(abs_train), len(abs_eval)], "absolute_ranges_train": ranges,
        "absolute_rows_skip_close_high": [len(skip_close_to_best(abs_train)), len(skip_close_to_best(abs_eval))],
        "under_s_bins_train": dict(zip(BINS, bins)),
        "absolute_eval_ranges": {k: sum(label_range(r.target) == k for r in abs_eval) for k in ("low", "mid", "high")},
        "rl_prompts_train": len(rl.train), "rl_prompts_held_out": len(rl.held_out),
        "rl_held_out_trees": len(rl.held_out_tree_ids), "rl_prompts_per_language": dict(sorted(rl.per_language.items())),
    }
    figures = {"labels": {k: [r.labels[k] for r in labelled] for k in SIX_LABELS},
               "targets": [r.target for r in abs_train],
               "weighted": {w: [r.target for r in with_targets(abs_train, w).rows] for w in ("w2", "w3")}}
    return counts, figures


def counts_table(c: dict) -> str:
    t = THESIS
    rows = [
        ("trees held out for evaluation (every stage)", f"{c['held_out_trees']} of {c['trees_read']}", ""),
        ("training trees kept (ready_for_export, filters)", c["trees_kept"], ""),
        ("messages kept", c["messages_kept"], ""),
        ("SFT threads train / eval (top-20 languages)", "{} / {}".format(*c["sft_threads"]), ""),
        ("ranked sets train / eval (en, es, fr, de)", "{} / {}".format(*c["ranked_sets"]), "{:,} / {:,}".format(*t["ranked_sets"])),
        ("absolute rows train / eval", "{} / {}".format(*c["absolute_rows"]), "{:,} / {:,}".format(*t["absolute_rows"])),
        ("  after the thesis code's near-duplicate skip", "{} / {}".format(*c["absolute_rows_skip_close_high"]), ""),
        ("  low 0-0.40 (train)", c["absolute_ranges_train"]["low"], f"{t['low']:,}"),
        ("  mid 0.41-0.89 (train)", c["absolute_ranges_train"]["mid"], f"{t['mid']:,}"),
        ("  high 0.90-1.0 (train)", c["absolute_ranges_train"]["high"], f"{t['high']:,}"),
    ]
    rows += [(f"    under_s bin {k}", v, "") for k, v in c["under_s_bins_train"].items()]
    held = f"{c['rl_prompts_train']} / {c['rl_prompts_held_out']} ({c['rl_held_out_trees']} trees)"
    rows += [("RL prompts train / held out", held, f"{t['rl_prompts']:,} (train)")]
    rows += [(f"  RL prompts {lang}", n, "") for lang, n in c["rl_prompts_per_language"].items()]
    lines = ["| count | this data | thesis |", "| --- | --- | --- |"] + [f"| {a} | {b} | {d} |" for a, b, d in rows]
    return "\n".join(lines) + f"\n\nFilters: {c['filters']}.\n"


def _pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 1e-12 and syy > 1e-12 else float("nan")  # 1e-12: float noise of a constant


def correlation_matrix(labels: dict[str, list[float]]) -> list[list[float]]:
    """Pearson correlation of every label pair over the rows (NaN where a label is constant)."""
    names = list(labels)
    return [[_pearson(labels[a], labels[b]) for b in names] for a in names]


def write_figures(out: Path, fig: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    names, paths = list(fig["labels"]), []
    corr = correlation_matrix(fig["labels"])
    f, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow([[0.0 if math.isnan(v) else v for v in row] for row in corr], cmap="coolwarm", vmin=-1, vmax=1)
    for i, row in enumerate(corr):
        for j, v in enumerate(row):
            ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    f.colorbar(im, ax=ax)
    ax.set_title("label correlation (Pearson)")
    paths.append(_save(f, out / "label_correlation.png", plt))

    f, axes = plt.subplots(2, 3, figsize=(11, 6))
    for ax, name in zip(axes.flat, names):
        ax.hist(fig["labels"][name], bins=[i / 20 for i in range(21)], color="tab:blue")
        ax.set_title(name)
        ax.set_xlim(0, 1)
    f.suptitle(f"label distributions ({len(fig['labels'][names[0]]) if names else 0} replies)")
    paths.append(_save(f, out / "label_distributions.png", plt))

    f, ax = plt.subplots(figsize=(8, 4))
    targets = fig["targets"]
    for lo, hi, color, name in ((0.0, 0.4, "tab:red", "low 0-0.40"), (0.4, 0.9, "tab:grey", "mid 0.41-0.89"),
                                (0.9, 1.0, "tab:green", "high 0.90-1.0")):
        n = sum(label_range(t) == name.split()[0] for t in targets)
        ax.axvspan(lo, hi, color=color, alpha=0.12, label=f"{name}: {n}")
    # Right-closed bins (edges nudged up), so a label of exactly 0.4 is drawn on the low side.
    ax.hist(targets, bins=[-1e-9] + [i / 50 + 1e-9 for i in range(1, 51)], color="tab:blue")
    for edge in (0.5, 0.6, 0.7, 0.8):
        ax.axvline(edge, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("absolute label (quality)")
    ax.set_ylabel("train rows")
    ax.legend()
    ax.set_title("absolute labels with the thesis's ranges (dotted: under_s bins)")
    paths.append(_save(f, out / "absolute_labels.png", plt))

    weighted = fig.get("weighted") or {}
    if weighted:  # Fig. 19: the weighted average score the w2 / w3 absolute RMs were trained on
        f, ax = plt.subplots(figsize=(8, 4))
        for name, vals in weighted.items():
            ax.hist(vals, bins=[i / 40 for i in range(41)], alpha=0.6, label=f"{name} ({len(vals)} rows)")
        ax.set_xlabel("weighted average score")
        ax.set_ylabel("train rows")
        ax.set_xlim(0, 1)
        ax.legend()
        ax.set_title("distribution of the weighted average score (thesis Fig. 19)")
        paths.append(_save(f, out / "weighted_scores.png", plt))
    return paths


def _save(f, path: Path, plt) -> Path:
    f.tight_layout()
    f.savefig(path, dpi=90)
    plt.close(f)
    return path


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    from trainer.data import fixture_path

    try:
        trees = load_oasst(fixture_path() if a.data == "fixture" else a.data)
    except (OasstFormatError, OSError) as e:
        print(f"crs-rlhf data-report: {e}", file=sys.stderr)
        return 2
    if not trees:
        print(f"crs-rlhf data-report: {a.data} holds no trees", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    counts, fig = compute_counts(trees, a)
    table = counts_table(counts)
    (out / "counts.md").write_text(f"# Data report: {a.data}\n\n{table}")
    (out / "counts.json").write_text(json.dumps(counts, indent=2))
    paths = write_figures(out, fig)
    print(table)
    print("wrote " + ", ".join(str(p) for p in [out / "counts.md", out / "counts.json", *paths]))
    return 0
