"""Label aggregation: one scalar target per reply from OASST's Likert labels in [0, 1].

Weightings from the thesis (docs/method.md): `w2`, `w3`, and `quality` alone (the final
choice: the weighted targets bunched around 0.5 and made the model over-conservative).
A label with weight 0 is not needed, so `w3` keeps replies that lack `violence` or `humor`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# Every label name that appears in the OASST export.
KNOWN_LABELS = frozenset(
    {
        "spam", "fails_task", "lang_mismatch", "pii", "not_appropriate", "hate_speech", "sexual_content",
        "moral_judgement", "political_content", "quality", "toxicity", "humor", "helpfulness", "creativity",
        "violence",
    }
)

# The six labels the thesis's weightings are built from; its absolute rows need all six.
SIX_LABELS = ("violence", "creativity", "helpfulness", "humor", "toxicity", "quality")

WEIGHTINGS: dict[str, dict[str, float]] = {
    "w2": {"violence": -0.05, "creativity": 0.15, "helpfulness": 0.25, "humor": 0.05, "toxicity": -0.1, "quality": 0.4},
    "w3": {"violence": 0.0, "creativity": 0.15, "helpfulness": 0.35, "humor": 0.0, "toxicity": -0.1, "quality": 0.4},
    "quality": {"quality": 1.0},
}


class UnknownLabelError(ValueError):
    pass


def resolve_weighting(weighting: str | Mapping[str, float]) -> dict[str, float]:
    """A weighting name (w2, w3, quality) or a user dict -> {label: weight}, names checked."""
    if isinstance(weighting, str):
        if weighting not in WEIGHTINGS:
            raise UnknownLabelError(f"unknown weighting {weighting!r}; use one of {sorted(WEIGHTINGS)} or a dict")
        return dict(WEIGHTINGS[weighting])
    unknown = sorted(set(weighting) - KNOWN_LABELS)
    if unknown:
        raise UnknownLabelError(f"unknown label name(s) {unknown}; OASST labels are {sorted(KNOWN_LABELS)}")
    if not weighting:
        raise UnknownLabelError("the label weighting is empty")
    return {k: float(v) for k, v in weighting.items()}


def needed_labels(weights: Mapping[str, float]) -> set[str]:
    return {k for k, w in weights.items() if w != 0.0}


def weighted_target(labels: Mapping[str, float], weights: Mapping[str, float]) -> float | None:
    """Sum of weight * value over the needed labels; None if any needed label is missing."""
    if any(k not in labels for k in needed_labels(weights)):
        return None
    return float(sum(w * labels[k] for k, w in weights.items() if w != 0.0))


# Label ranges as the thesis writes them: low 0-0.40, mid 0.41-0.89, high 0.90-1.0.
LOW_MAX, HIGH_MIN = 0.4, 0.9
MID_BINS = 5
_EPS = 1e-9  # OASST labels are means of votes: 0.4 may arrive as 0.39999999999999997 or 0.4000000000000001


def label_range(t: float) -> str:
    """low t <= 0.4, high t >= 0.9, mid in between (a label of exactly 0.4 is low)."""
    return "low" if t <= LOW_MAX + _EPS else "high" if t >= HIGH_MIN - _EPS else "mid"


def mid_bin(t: float, bins: int = MID_BINS) -> int:
    """Equal-width, right-closed bin of a mid target: (0.4, 0.5] -> 0, ..., (0.8, 0.9) -> 4."""
    width = (HIGH_MIN - LOW_MAX) / bins
    return min(max(math.ceil((t - LOW_MAX) / width - 1e-6) - 1, 0), bins - 1)
