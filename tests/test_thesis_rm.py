"""Thesis fidelity of the reward-model recipe: Table 6 names, fixed weights, augmentation relabelling."""

from __future__ import annotations

import pytest

from trainer.data.builders import AbsoluteRow
from trainer.rm.augment import AugmentSection, adjust_label, relabel_paraphrases
from trainer.rm.config import AbsoluteLossSection
from trainer.rm.sampling import Remedies, low_weights, over_sample, parse_remedies, range_counts


def test_table6_names_parse():
    assert parse_remedies(["over_s_8k"]) == Remedies(over_s_to=8000)
    assert parse_remedies(["wgt_1_4"]) == Remedies(wgt_fixed=1.4)
    assert parse_remedies(["over_s_8k", "wgt_1_4"]).names() == ["over_s_8000", "wgt_1_4"]
    assert parse_remedies(["augment", "under_s_8k", "wgt_s_075"]).names() == ["augment", "under_s_8000", "wgt_s_0.75"]
    for bad in (["wgt_s_075", "wgt_1_4"], ["over_s", "over_s_8k"], ["wgt_1_"]):
        with pytest.raises(ValueError):
            parse_remedies(bad)


def test_over_s_to_a_count_never_more_than_doubles():
    # The thesis's split: 4104 low rows; over_s_8k brings them to 8000, plain over_s to 8208.
    targets = [0.1] * 4104 + [0.6] * 100
    assert range_counts([targets[i] for i in over_sample(targets, to=8000)])["low"] == 8000
    assert range_counts([targets[i] for i in over_sample(targets, 2.0)])["low"] == 8208
    assert range_counts([targets[i] for i in over_sample(targets, to=20000)])["low"] == 8208  # capped at 2x
    assert range_counts([targets[i] for i in over_sample(targets, to=100)])["low"] == 4104  # never removes


def test_fixed_low_weight():
    targets = [0.1, 0.4, 0.5, 0.95]  # 0.4 is low
    assert low_weights(targets, 1.4, fixed=True) == pytest.approx([1.4, 1.4, 1.0, 1.0])
    assert low_weights(targets, 0.75) == pytest.approx([0.75 * 4 / 2] * 2 + [1.0, 1.0])


def test_mse_penalty_defaults_are_the_thesis_form():
    loss = AbsoluteLossSection()
    assert (loss.penalty, loss.penalty_form) == (0.02, "linear")


def test_augment_defaults():
    cfg = AugmentSection()
    assert (cfg.mismatch_similarity, cfg.max_new_tokens, cfg.encoder) == (0.2, 512, None)


def test_language_mismatch_gets_similarity_0_2_with_the_real_encoder(caplog):
    row = AbsoluteRow([{"role": "user", "content": "¿Por qué el cielo es azul?"}],
                      "El cielo es azul porque la luz de la tarde se dispersa en el aire.", {"quality": 0.3}, "t", 0.3)
    english = "The sky is blue because the light is scattered in the air."
    res = relabel_paraphrases([row], [english], AugmentSection())
    assert res.language_changes == 1 and res.similarities == [0.2]
    assert res.rows[0].target == pytest.approx(adjust_label(0.3, 0.2)) == pytest.approx(0.1)  # 0.3 - (1 - 0.6) * 0.5
    assert "English-only" in caplog.text  # the default MiniLM on Spanish replies is flagged
    strict = relabel_paraphrases([row], [english], AugmentSection(mismatch_similarity=-1.0))
    assert strict.rows[0].target == 0.0
    same = relabel_paraphrases([row], ["El cielo es azul porque la luz se dispersa en el aire de la tarde."],
                               AugmentSection())
    assert same.language_changes == 0 and same.rows[0].target > 0.1


def test_encoder_is_configurable_by_path():
    from trainer.rm.augment import default_encoder_path

    row = AbsoluteRow([], "Paris is the capital of France.", {}, "t", 0.3)
    res = relabel_paraphrases([row], ["The capital city of France is Paris."],
                              AugmentSection(encoder=default_encoder_path()))
    assert res.similarities[0] > 0.8 and res.rows[0].target > 0.25
