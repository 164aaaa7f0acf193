"""The thesis's remedies for uneven absolute labels, as pure functions over targets.

Ranges as the thesis writes them (docs/method.md): low 0-0.40 (a label of exactly 0.4 is
low, as the thesis code's ``labels <= threshold``), mid 0.41-0.89, high 0.90-1.0. Names follow
the thesis: ``over_s`` (duplicate low rows, up to 2x; ``over_s_8k`` = up to 8000 low rows),
``under_s_N`` (mid range in 5 equal-width bins closed on the right, (0.4, 0.5] ... (0.8, 0.9),
N/5 rows each), ``wgt_s_X`` (low rows' loss x X * total / n_low), ``wgt_A_B`` (a fixed weight
A.B on low rows: ``wgt_1_4`` = 1.4), and ``augment`` (paraphrases, trainer/rm/augment.py).
They combine in that order: augment, over_s, under_s, then weights computed on the final set
(the thesis's 42956 / 8208 = 5.23 example counts the duplicates).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.data.labels import HIGH_MIN, LOW_MAX, MID_BINS, label_range, mid_bin  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Remedies:
    augment: bool = False
    over_s: float | None = None  # duplication factor for low rows, in (1, 2]
    over_s_to: int | None = None  # or: duplicate low rows until there are this many (each at most once)
    under_s: int | None = None  # N: mid rows kept (N / 5 per bin)
    wgt_s: float | None = None  # X, scaled by total / n_low
    wgt_fixed: float | None = None  # a fixed loss weight on low rows

    def names(self) -> list[str]:
        out = ["augment"] if self.augment else []
        out += [f"over_s_{self.over_s:g}"] if self.over_s else []
        out += [f"over_s_{self.over_s_to}"] if self.over_s_to else []
        out += [f"under_s_{self.under_s}"] if self.under_s else []
        out += [f"wgt_s_{self.wgt_s:g}"] if self.wgt_s else []
        out += [f"wgt_{self.wgt_fixed:g}".replace(".", "_")] if self.wgt_fixed else []
        return out


def _number(text: str) -> float:
    """'8k' -> 8000, '075' -> 0.75 (the thesis writes wgt_s_075), '0.5' -> 0.5, '16000' -> 16000."""
    if text.lower().endswith("k"):
        return float(text[:-1]) * 1000
    if "." not in text and len(text) > 1 and text.startswith("0"):
        return float("0." + text[1:])
    return float(text)


def parse_remedies(names: Sequence[str]) -> Remedies:
    """['augment', 'under_s_8k', 'wgt_s_075', 'over_s_8k', 'wgt_1_4'] -> Remedies; unknown names are errors."""
    fields: dict = {}
    for name in names:
        name = name.strip()
        fixed = re.fullmatch(r"wgt_(\d+)_(\d+)", name)  # Table 6's wgt_1_4: a fixed weight 1.4
        if fixed:
            fields["wgt_fixed"] = float(f"{fixed.group(1)}.{fixed.group(2)}")
            continue
        m = re.fullmatch(r"(over_s|under_s|wgt_s)(?:_([0-9.]+k?))?|augment", name)
        if not m:
            raise ValueError(f"unknown remedy {name!r}; use augment, over_s[_F or _N, e.g. over_s_8k], under_s_N "
                             "(e.g. under_s_8k), wgt_s_X (e.g. wgt_s_075) or wgt_A_B (a fixed weight, e.g. wgt_1_4)")
        kind, arg = m.group(1) or "augment", m.group(2)
        if kind == "augment":
            fields["augment"] = True
        elif kind == "over_s":
            f = _number(arg) if arg else 2.0
            if f >= 100 and f == int(f):  # a row count, as in over_s_8k
                fields["over_s_to"] = int(f)
            elif not 1.0 < f <= 2.0:
                raise ValueError(f"{name}: over_s duplicates low rows up to 2x: give a factor in (1, 2] or a "
                                 "target count of low rows (e.g. over_s_8k)")
            else:
                fields["over_s"] = f
        elif arg is None:
            raise ValueError(f"{name}: {kind} needs a number, e.g. under_s_8k or wgt_s_075")
        elif kind == "under_s":
            fields["under_s"] = int(_number(arg))
        else:
            x = _number(arg)
            if not 0.0 < x <= 1.0:  # Table 6 prints "wgt_s_75" for wgt_s_075: never a silent weight of 75
                raise ValueError(f"{name}: wgt_s_X takes a fraction X in (0, 1], written 05 / 075 / 0.5 / 0.75 "
                                 f"(e.g. wgt_s_075 = 0.75); got {x:g}. Table 6's 'wgt_s_75' means wgt_s_075")
            fields["wgt_s"] = x
    if fields.get("wgt_s") and fields.get("wgt_fixed"):
        raise ValueError("choose one of wgt_s_X (scaled weight) and wgt_A_B (fixed weight)")
    if fields.get("over_s") and fields.get("over_s_to"):
        raise ValueError("choose one of over_s_F (a factor) and over_s_N (a count of low rows)")
    return Remedies(**fields)


def range_counts(targets: Sequence[float]) -> dict[str, int]:
    counts = {"low": 0, "mid": 0, "high": 0}
    for t in targets:
        counts[label_range(t)] += 1
    return counts


def over_sample(targets: Sequence[float], factor: float = 2.0, seed: int = 0, to: int | None = None) -> list[int]:
    """Indices: every row once, plus round((factor-1) * n_low) low rows a second time; with `to`,
    enough low rows a second time to reach `to` low rows (never more than 2x: 4104 -> 8000 for 8k)."""
    low = [i for i, t in enumerate(targets) if label_range(t) == "low"]
    n_extra = min(max(to - len(low), 0), len(low)) if to is not None else round((factor - 1.0) * len(low))
    extra = random.Random(seed).sample(low, n_extra)
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


def low_weights(targets: Sequence[float], x: float, fixed: bool = False) -> list[float]:
    """X * total / n_low for low rows, 1 for the rest (thesis: 0.75 * 42956 / 8208 = 3.93);
    `fixed`: X itself on low rows (wgt_1_4 -> 1.4)."""
    n_low = sum(label_range(t) == "low" for t in targets)
    w_low = x if fixed else x * len(targets) / n_low if n_low else 1.0
    return [w_low if label_range(t) == "low" else 1.0 for t in targets]
