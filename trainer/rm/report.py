"""Absolute-RM evaluation outputs: per-range errors, a markdown table, a histogram PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trainer.rm.sampling import label_range

RANGES = (("below_0.4", "low"), ("mid", "mid"), ("above_0.9", "high"))


def range_metrics(preds: Sequence[float], targets: Sequence[float]) -> dict[str, float | int | None]:
    """mse_/mae_ {below_0.4, mid, above_0.9} and n_ per range (None where a range is empty)."""
    out: dict[str, float | int | None] = {}
    for key, rng in RANGES:
        errs = [p - t for p, t in zip(preds, targets) if label_range(t) == rng]
        out[f"mse_{key}"] = sum(e * e for e in errs) / len(errs) if errs else None
        out[f"mae_{key}"] = sum(abs(e) for e in errs) / len(errs) if errs else None
        out[f"n_{key}"] = len(errs)
    return out


def write_table(path: Path, m: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    lines = ["| targets | n | MSE | MAE |", "| --- | --- | --- | --- |"]
    for key, label in (("below_0.4", "0 - 0.40"), ("mid", "0.41 - 0.89"), ("above_0.9", "0.90 - 1.0")):
        lines.append(f"| {label} | {m[f'n_{key}']} | {fmt(m[f'mse_{key}'])} | {fmt(m[f'mae_{key}'])} |")
    text = "\n".join(lines) + f"\n\neval_loss {m['eval_loss']:.4f} (before training {m['initial_eval_loss']:.4f})\n"
    path.write_text(text)
    return text


def write_histogram(path: Path, preds: Sequence[float], targets: Sequence[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    bins = [i / 20 for i in range(21)]
    ax1.hist(targets, bins=bins, alpha=0.6, label="true")
    ax1.hist([min(max(p, 0.0), 1.0) for p in preds], bins=bins, alpha=0.6, label="predicted")
    ax1.set_xlabel("rating")
    ax1.set_ylabel("replies")
    ax1.legend()
    ax2.scatter(targets, preds, s=10)
    ax2.plot([0, 1], [0, 1], color="grey", linewidth=1)
    ax2.set_xlabel("true")
    ax2.set_ylabel("predicted")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
