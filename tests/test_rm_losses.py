"""Reward-model losses vs hand-computed values; remedies' bin counts; augmentation labels."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.rm.augment import adjust_label, cosine_similarities, detect_language, language_changed
from trainer.rm.losses import absolute_loss, absolute_loss_terms, pair_indices, pairwise_stats, ranked_set_loss
from trainer.rm.sampling import (
    Remedies,
    label_range,
    low_weights,
    mid_bin,
    over_sample,
    parse_remedies,
    range_counts,
    under_sample_mid,
)

L1 = -math.log(1 / (1 + math.exp(-1)))  # -log sigmoid(1) = 0.313262
L2 = -math.log(1 / (1 + math.exp(-2)))  # -log sigmoid(2) = 0.126928
LM1 = -math.log(1 / (1 + math.exp(1)))  # -log sigmoid(-1) = 1.313262


def test_pair_indices_are_all_ordered_pairs():
    assert pair_indices(3) == ([0, 0, 1], [1, 2, 2])
    assert len(pair_indices(4)[0]) == 6


def test_ranked_set_loss_hand_computed():
    scores = torch.tensor([2.0, 1.0, 0.0, 0.0, 1.0])  # set A best-first [2, 1, 0]; set B [0, 1] (mis-ordered)
    set_a = (L1 + L2 + L1) / 3  # margins 1, 2, 1
    assert float(ranked_set_loss(scores, [3, 2], average="prompt")) == pytest.approx((set_a + LM1) / 2, abs=1e-6)
    assert float(ranked_set_loss(scores, [3, 2], average="pair")) == pytest.approx((2 * L1 + L2 + LM1) / 4, abs=1e-6)
    l2 = float(ranked_set_loss(torch.tensor([1.0, 0.0]), [2], l2=0.001))
    assert l2 == pytest.approx(L1 + 0.001 * 0.5 * (1.0**2 + 0.0**2), abs=1e-7)


def test_ranked_set_loss_has_gradient_towards_correct_order():
    s = torch.tensor([0.0, 1.0], requires_grad=True)
    ranked_set_loss(s, [2]).backward()
    assert s.grad[0] < 0 < s.grad[1]  # descent raises the winner, lowers the loser


def test_pairwise_stats():
    correct, total, margin = pairwise_stats([2.0, 1.0, 0.0, 0.0, 1.0], [3, 2])
    assert (correct, total) == (3, 4)
    assert margin == pytest.approx(1 + 2 + 1 - 1)


def test_absolute_losses_hand_computed():
    z = torch.tensor([0.0, 2.0])
    t = torch.tensor([0.3, 1.0])
    logistic = absolute_loss_terms(z, t, "logistic")
    assert logistic.tolist() == pytest.approx([math.log(2), L2], abs=1e-6)  # BCE(0.5, 0.3) = log 2
    assert absolute_loss_terms(z, t, "sigmoid_mse").tolist() == pytest.approx(
        [(0.5 - 0.3) ** 2, (1 / (1 + math.exp(-2)) - 1) ** 2], abs=1e-6)
    zp, tp = torch.tensor([1.5, -0.5, 0.5]), torch.tensor([1.0, 0.0, 0.2])
    # Thesis form (default): 2 % of the linear excess: 0.25 + 0.02 * 0.5.
    assert absolute_loss_terms(zp, tp, "mse_penalty").tolist() == pytest.approx([0.26, 0.26, 0.09])
    sq = {"penalty_form": "squared"}
    assert absolute_loss_terms(zp, tp, "mse_penalty", 1.0, **sq).tolist() == pytest.approx([0.25 + 0.25, 0.25 + 0.25, 0.09])
    assert absolute_loss_terms(zp, tp, "mse_penalty", 2.0, **sq).tolist() == pytest.approx([0.75, 0.75, 0.09])
    with pytest.raises(ValueError, match="mse_penalty form"):
        absolute_loss_terms(zp, tp, "mse_penalty", penalty_form="cubic")
    w = torch.tensor([2.0, 1.0])
    assert float(absolute_loss(z, t, "logistic", w)) == pytest.approx((2 * math.log(2) + L2) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="unknown absolute loss"):
        absolute_loss_terms(z, t, "hinge")


def test_parse_remedies_thesis_names():
    assert parse_remedies(["augment", "under_s_8k", "wgt_s_075"]) == Remedies(augment=True, under_s=8000, wgt_s=0.75)
    assert parse_remedies(["over_s", "under_s_16000", "wgt_s_0.5"]) == Remedies(over_s=2.0, under_s=16000, wgt_s=0.5)
    assert parse_remedies(["over_s_1.5", "wgt_s_05"]) == Remedies(over_s=1.5, wgt_s=0.5)
    for bad in ("oversample", "under_s", "over_s_3", "wgt_s", "wgt_1"):
        with pytest.raises(ValueError):
            parse_remedies([bad])


def test_ranges_and_bins():
    # Thesis ranges: 0-0.40 low (0.4 itself is low), 0.41-0.89 mid, 0.90-1.0 high.
    assert [label_range(t) for t in (0.0, 0.39, 0.4, 0.41, 0.89, 0.9, 1.0)] == [
        "low", "low", "low", "mid", "mid", "high", "high"]
    assert label_range(0.1 + 0.3) == "low" and label_range(0.4000000000000001) == "low"  # vote means carry float noise
    # Mid bins closed on the right: (0.4, 0.5], (0.5, 0.6], ..., (0.8, 0.9).
    assert [mid_bin(t) for t in (0.41, 0.5, 0.51, 0.6, 0.61, 0.7, 0.8, 0.81, 0.89)] == [0, 0, 1, 1, 2, 2, 3, 4, 4]


def test_over_sample_duplicates_low_rows():
    targets = [0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.95, 1.0]  # 3 low, 4 mid, 2 high
    idx = over_sample(targets, 2.0, seed=0)
    assert range_counts([targets[i] for i in idx]) == {"low": 6, "mid": 4, "high": 2}
    idx = over_sample(targets, 1.5, seed=0)  # round(0.5 * 3) = 2 extra
    assert range_counts([targets[i] for i in idx]) == {"low": 5, "mid": 4, "high": 2}


def test_under_sample_mid_is_stratified():
    mids = [0.42 + 0.1 * b + 0.02 * k for b in range(5) for k in range(4)]  # 4 per bin: 0.42..0.48, ..., 0.82..0.88
    targets = [0.1, 0.2] + mids + [0.95]
    idx = under_sample_mid(targets, 10, seed=3)  # 10 / 5 = 2 per bin
    kept = [targets[i] for i in idx]
    assert range_counts(kept) == {"low": 2, "mid": 10, "high": 1}
    assert sorted(mid_bin(t) for t in kept if label_range(t) == "mid") == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert idx == under_sample_mid(targets, 10, seed=3) != under_sample_mid(targets, 10, seed=4)
    assert range_counts([targets[i] for i in under_sample_mid(targets, 100)])["mid"] == 20  # fewer than N/5: all


def test_low_weights():
    targets = [0.1, 0.2, 0.5, 0.6, 0.7, 0.95, 0.96, 0.97]
    w = low_weights(targets, 0.75)
    assert w == pytest.approx([0.75 * 8 / 2] * 2 + [1.0] * 6)
    # The thesis's example: full weight 42956 / 8208 = 5.23.
    thesis = low_weights([0.1] * 8208 + [0.5] * (42956 - 8208), 1.0)
    assert thesis[0] == pytest.approx(5.2334, abs=1e-4) and thesis[-1] == 1.0


def test_augmentation_label_adjustment():
    assert adjust_label(0.3, 1.0) == pytest.approx(0.3)  # same meaning: label kept
    assert adjust_label(0.3, 0.0) == pytest.approx(0.05)  # 0.3 - 0.5 * 0.5
    assert adjust_label(0.3, -1.0) == 0.0  # clipped at 0
    assert adjust_label(0.35, 0.6) == pytest.approx(0.35 - (1 - 0.8) * 0.5)


def test_language_detection():
    assert detect_language("The answer is that the sky is blue and it is clear.") == "en"
    assert detect_language("La respuesta es que el cielo es azul y que la luz se dispersa.") == "es"
    assert detect_language("Die Antwort ist, dass der Himmel blau ist und das Licht streut.") == "de"
    assert detect_language("Привет, как дела?") == "ru"
    assert language_changed("El cielo es azul porque la luz de la tarde se dispersa.", "The sky is blue because the light is scattered.")
    assert not language_changed("The sky is blue and it is clear.", "It is blue, and that is the sky.")
    assert not language_changed("ok", "vale")  # too short to tell: not a mismatch


def test_minilm_similarity_is_real():
    a = ["Paris is the capital of France.", "Paris is the capital of France."]
    b = ["The capital city of France is Paris.", "I like to eat green apples with cheese."]
    close, far = cosine_similarities(a, b)
    assert close > 0.8 and far < 0.3
