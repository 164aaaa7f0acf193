"""The thesis's remedies for uneven absolute labels, as pure functions over targets.

Ranges (MISSION.md, thesis Tables 6-7): low t < 0.4, mid 0.4 <= t < 0.9, high t >= 0.9.
Names follow the thesis: ``over_s`` (duplicate low rows, up to 2x), ``under_s_N`` (mid range
in 5 equal-width bins, N/5 rows each), ``wgt_s_X`` (low rows' loss x X * total / n_low), and
``augment`` (paraphrases, trainer/rm/augment.py). They combine in that order: augment, over_s,
under_s, then weights computed on the final set (the thesis's 42956 / 8208 = 5.23 example
counts the duplicates).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

LOW_MAX, HIGH_MIN = 0.4, 0.9
MID_BINS = 5


def label_range(t: float) -> str:
    return "low" if t < LOW_MAX else "high" if t >= HIGH_MIN else "mid"


def mid_bin(t: float, bins: int = MID_BINS) -> int:
    """Equal-width bin of a mid-range target over [0.4, 0.9)."""
    return min(int((t - LOW_MAX) / ((HIGH_MIN - LOW_MAX) / bins) + 1e-9), bins - 1)


@dataclass(frozen=True)
class Remedies:
    augment: bool = False
    over_s: float | None = None  # duplication factor for low rows, in (1, 2]
    under_s: int | None = None  # N: mid rows kept (N / 5 per bin)
    wgt_s: float | None = None  # X

    def names(self) -> list[str]:
        out = ["augment"] if self.augment else []
        out += [f"over_s_{self.over_s:g}"] if self.over_s else []
        out += [f"under_s_{self.under_s}"] if self.under_s else []
        out += [f"wgt_s_{self.wgt_s:g}"] if self.wgt_s else []
        return out


def _number(text: str) -> float:
    """'8k' -> 8000, '075' -> 0.75 (the thesis writes wgt_s_075), '0.5' -> 0.5, '16000' -> 16000."""
    if text.lower().endswith("k"):
        return float(text[:-1]) * 1000
    if "." not in text and len(text) > 1 and text.startswith("0"):
        return float("0." + text[1:])
    return float(text)


def parse_remedies(names: Sequence[str]) -> Remedies:
    """['augment', 'under_s_8k', 'wgt_s_075', 'over_s'] -> Remedies; unknown names are errors."""
    fields: dict = {}
    for name in names:
        m = re.fullmatch(r"(over_s|under_s|wgt_s)(?:_([0-9.]+k?))?|augment", name.strip())
        if not m:
            raise ValueError(f"unknown remedy {name!r}; use augment, over_s[_F], under_s_N (e.g. 8k), wgt_s_X (e.g. 075)")
        kind, arg = m.group(1) or "augment", m.group(2)
        if kind == "augment":
            fields["augment"] = True
        elif kind == "over_s":
            f = _number(arg) if arg else 2.0
            if not 1.0 < f <= 2.0:
                raise ValueError(f"{name}: over_s duplicates low rows up to 2x; factor must be in (1, 2]")
            fields["over_s"] = f
        elif arg is None:
            raise ValueError(f"{name}: {kind} needs a number, e.g. under_s_8k or wgt_s_075")
        elif kind == "under_s":
            fields["under_s"] = int(_number(arg))
        else:
            fields["wgt_s"] = _number(arg)
    return Remedies(**fields)


def range_counts(targets: Sequence[float]) -> dict[str, int]:
    counts = {"low": 0, "mid": 0, "high": 0}
    for t in targets:
        counts[label_range(t)] += 1
    return counts


def over_sample(targets: Sequence[float], factor: float = 2.0, seed: int = 0) -> list[int]:
    """Indices: every row once, plus round((factor-1) * n_low) low rows a second time."""
    low = [i for i, t in enumerate(targets) if label_range(t) == "low"]
    extra = random.Random(seed).sample(low, round((factor - 1.0) * len(low)))
    return list(range(len(targets))) + sorted(extra)


def under_sample_mid(targets: Sequence[float], n: int, seed: int = 0, bins: int = MID_BINS) -> list[int]:
    """Indices: all low and high rows; from each mid bin at most n // bins rows (seeded)."""
    rng = random.Random(seed)
    keep = [i for i, t in enumerate(targets) if label_range(t) != "mid"]
    per_bin: list[list[int]] = [[] for _ in range(bins)]
    for i, t in enumerate(targets):
        if label_range(t) == "mid":
            per_bin[mid_bin(t, bins)].append(i)
    for members in per_bin:
        keep += rng.sample(members, min(len(members), n // bins))
    return sorted(keep)


def low_weights(targets: Sequence[float], x: float) -> list[float]:
    """X * total / n_low for low rows, 1 for the rest (thesis: 0.75 * 42956 / 8208 = 3.93)."""
    n_low = sum(label_range(t) == "low" for t in targets)
    w_low = x * len(targets) / n_low if n_low else 1.0
    return [w_low if label_range(t) == "low" else 1.0 for t in targets]
