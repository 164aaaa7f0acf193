"""`crs-rlhf plot RUN`: the thesis's figures from a PPO run folder, as PNG (matplotlib Agg).

    RUN/plots/reward.png               reward/pref, reward/abs, reward/crs over steps
    RUN/plots/kl.png                   objective KL (and the KL coefficient) over steps
    RUN/plots/response_length.png      mean response length over steps
    RUN/plots/reward_distribution.png  per-signal histograms, first vs last quarter of the run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.ppo.metrics import read_jsonl

SIGNALS = (("reward/pref", "preference"), ("reward/abs", "absolute"), ("reward/crs", "CRS (mixed)"))


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    rows = read_jsonl(run / "metrics.jsonl")
    if not rows:
        raise FileNotFoundError(f"{run / 'metrics.jsonl'} is missing or empty: is {run} a PPO run folder?")
    out = run / "plots"
    out.mkdir(exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in SIGNALS:
        x, y = _series(rows, key)
        if x:
            ax.plot(x, y, label=label)
    ax.set(xlabel="step", ylabel="mean reward", title="Reward per step")
    ax.legend()
    save(fig, "reward.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(rows, "kl/objective"), label="objective KL", color="tab:red")
    ax.set(xlabel="step", ylabel="KL (nats)", title="Objective KL")
    ax2 = ax.twinx()
    ax2.plot(*_series(rows, "kl/coef"), label="KL coefficient β", color="tab:gray", linestyle="--")
    ax2.set_ylabel("β")
    fig.legend(loc="upper left")
    save(fig, "kl.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(rows, "response_length/mean"))
    ax.set(xlabel="step", ylabel="tokens", title="Mean response length")
    save(fig, "response_length.png")

    samples = read_jsonl(run / "rollouts.jsonl")
    if samples:
        q = max(1, len(samples) // 4)
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for ax, key, label in zip(axes, ("r_pref", "r_abs"), ("preference", "absolute")):
            drawn = False
            for part, name in ((samples[:q], "first quarter"), (samples[-q:], "last quarter")):
                vals = [v for s in part for v in s.get(key, []) if v is not None]
                if vals:
                    ax.hist(vals, bins=20, alpha=0.5, label=name)
                    drawn = True
            ax.set(xlabel=f"{label} score", ylabel="samples", title=f"{label} reward distribution")
            if drawn:
                ax.legend()
            else:  # CRS weight 0 or 1: that service was not used
                ax.text(0.5, 0.5, "signal not used in this run", ha="center", va="center", transform=ax.transAxes)
        save(fig, "reward_distribution.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crs-rlhf plot", description="Draw a PPO run's figures as PNG.")
    parser.add_argument("run_dir", help="the run folder (with metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir)
    except FileNotFoundError as e:
        print(f"crs-rlhf plot: {e}")
        return 2
    for p in paths:
        print(p)
    return 0
