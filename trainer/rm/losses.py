"""Reward-model losses as small pure functions (docs/method.md).

Preference: for a prompt with K ranked replies (best first) every one of the C(K, 2) pairs
(w, l) with w ranked above l contributes ``-log sigmoid(r_w - r_l)``, optionally plus the
Open Assistant L2 term ``l2 * 0.5 * (r_w^2 + r_l^2)`` that keeps scores near zero. Averaging
"prompt" (OA) takes the mean per set, then over sets, so a 4-reply set (6 pairs) weighs as
much as a 2-reply set; "pair" (TRL's RewardTrainer) averages over all pairs.

Absolute: z is the raw logit, t the soft target in [0, 1], w an optional per-sample weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F


def pair_indices(k: int) -> tuple[list[int], list[int]]:
    """All (winner, loser) index pairs of a best-first list of k replies: C(k, 2) of them."""
    wins, loses = [], []
    for i in range(k):
        for j in range(i + 1, k):
            wins.append(i)
            loses.append(j)
    return wins, loses


def ranked_set_loss(
    scores: torch.Tensor, set_sizes: Sequence[int], l2: float = 0.0, average: Literal["prompt", "pair"] = "prompt"
) -> torch.Tensor:
    """scores: (N,) concatenated best-first scores of each set; set_sizes: K per set (sum = N)."""
    per_set, all_pairs = [], []
    start = 0
    for k in set_sizes:
        s = scores[start : start + k]  # (K,)
        w, l = pair_indices(k)
        rw, rl = s[w], s[l]  # (P,) with P = C(K, 2)
        loss = -F.logsigmoid(rw - rl) + l2 * 0.5 * (rw**2 + rl**2)  # (P,)
        per_set.append(loss.mean())
        all_pairs.append(loss)
        start += k
    if average == "prompt":
        return torch.stack(per_set).mean()
    return torch.cat(all_pairs).mean()


def pairwise_stats(scores: Sequence[float], set_sizes: Sequence[int]) -> tuple[int, int, float]:
    """(correct pairs, total pairs, summed margin r_w - r_l) for accuracy and mean margin."""
    correct = total = 0
    margin = 0.0
    start = 0
    for k in set_sizes:
        s = scores[start : start + k]
        for i, j in zip(*pair_indices(k)):
            correct += s[i] > s[j]
            margin += s[i] - s[j]
            total += 1
        start += k
    return correct, total, margin


AbsoluteLoss = Literal["logistic", "sigmoid_mse", "mse_penalty"]


PenaltyForm = Literal["linear", "squared"]
THESIS_PENALTY = 0.02  # the thesis code's mse_penalty: 2 % of the linear excess


def absolute_loss_terms(
    z: torch.Tensor, t: torch.Tensor, kind: AbsoluteLoss, penalty: float = THESIS_PENALTY,
    penalty_form: PenaltyForm = "linear",
) -> torch.Tensor:
    """Per-sample loss, (B,) from logits z (B,) and targets t (B,).

    logistic:    BCE(sigmoid(z), t)              (the thesis's choice)
    sigmoid_mse: (sigmoid(z) - t)^2
    mse_penalty: (z - t)^2 + penalty * e, e = relu(-z) + relu(z - 1), the raw logit's distance
                 outside [0, 1]; "linear" (the thesis, penalty 0.02) or "squared" (penalty * e^2)
    """
    if kind == "logistic":
        return F.binary_cross_entropy_with_logits(z, t, reduction="none")
    if kind == "sigmoid_mse":
        return (torch.sigmoid(z) - t) ** 2
    if kind == "mse_penalty":
        outside = F.relu(-z) + F.relu(z - 1.0)  # distance outside [0, 1]
        if penalty_form not in ("linear", "squared"):
            raise ValueError(f"unknown mse_penalty form {penalty_form!r}; use linear or squared")
        return (z - t) ** 2 + penalty * (outside if penalty_form == "linear" else outside**2)
    raise ValueError(f"unknown absolute loss {kind!r}; use logistic, sigmoid_mse or mse_penalty")


def absolute_loss(
    z: torch.Tensor, t: torch.Tensor, kind: AbsoluteLoss, weights: torch.Tensor | None = None,
    penalty: float = THESIS_PENALTY, penalty_form: PenaltyForm = "linear",
) -> torch.Tensor:
    """Mean of w * loss: wgt_s_X multiplies an under-represented sample's loss by its weight."""
    terms = absolute_loss_terms(z, t, kind, penalty, penalty_form)  # (B,)
    return (terms if weights is None else terms * weights).mean()


def prediction(z: torch.Tensor, kind: AbsoluteLoss) -> torch.Tensor:
    """What the loss compares with the target: sigmoid(z), or z itself for mse_penalty."""
    return z if kind == "mse_penalty" else torch.sigmoid(z)
