"""The Combined Reward Signal: mixing, w = 0 / 1 with a service absent, normalisation, state."""

from __future__ import annotations

import pytest
import torch

from trainer.crs import CombinedReward, RunningMoments, batch_normalise, mix, select_abs

PREF = torch.tensor([2.0, 3.0, 1.5, 2.5])
ABS = torch.tensor([0.8067, -0.2990, -0.6208, -0.6642])  # the thesis's example logits


def test_mix_is_the_weighted_sum():
    crs = CombinedReward(weight=0.25, clip=None)
    out = crs(PREF, ABS)
    torch.testing.assert_close(out.reward, 0.25 * PREF + 0.75 * ABS)
    torch.testing.assert_close(out.pref, PREF)
    torch.testing.assert_close(out.abs, ABS)


def test_weight_one_and_zero_work_without_the_other_service():
    only_pref = CombinedReward(weight=1.0, clip=None)(PREF, None)
    torch.testing.assert_close(only_pref.reward, PREF)
    assert only_pref.abs is None
    only_abs = CombinedReward(weight=0.0, clip=None)(None, ABS)
    torch.testing.assert_close(only_abs.reward, ABS)
    assert only_abs.pref is None
    with pytest.raises(ValueError, match="needs absolute scores"):
        CombinedReward(weight=0.5)(PREF, None)
    with pytest.raises(ValueError, match="needs preference scores"):
        CombinedReward(weight=0.5)(None, ABS)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        mix(PREF, ABS, 1.5)


def test_probability_output_uses_sigmoid_of_the_logit():
    out = CombinedReward(weight=0.0, abs_output="probability", clip=None)(None, ABS)
    torch.testing.assert_close(out.reward, torch.sigmoid(ABS))
    # The thesis's table: logits 0.8067 / -0.2990 ... are probabilities 0.6914 / 0.4258 ...
    assert select_abs(ABS, "probability")[:2].tolist() == pytest.approx([0.6914, 0.4258], abs=1e-3)


def test_score_clip():
    out = CombinedReward(weight=1.0, clip=4.0)(torch.tensor([-10.0, 0.5, 7.0]), None)
    assert out.reward.tolist() == [-4.0, 0.5, 4.0]


def test_batch_normalisation_puts_signals_on_one_scale():
    out = CombinedReward(weight=0.5, normalise="batch", clip=None)(PREF * 10 + 100, ABS)
    for x in (out.pref, out.abs):
        assert x.mean().item() == pytest.approx(0, abs=1e-6)
        assert x.std().item() == pytest.approx(1, abs=1e-5)
    assert batch_normalise(torch.tensor([3.0])).tolist() == [0.0]


def test_running_moments_merge_equals_whole_data():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(37, generator=g) * 3 + 5
    m = RunningMoments()
    for chunk in (data[:1], data[1:10], data[10:11], data[11:]):
        m.update(chunk)
    assert m.count == 37
    assert m.mean == pytest.approx(data.mean().item(), rel=1e-6)
    assert m.var == pytest.approx(data.var().item(), rel=1e-5)


def test_running_normalisation_state_round_trip():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, generator=g) * 2 + 2.26, torch.randn(4, generator=g) * 0.3 + 0.86) for _ in range(4)]
    a = CombinedReward(weight=0.25, normalise="running", clip=None)
    for p, s in batches[:2]:
        a(p, s)
    b = CombinedReward(weight=0.25, normalise="running", clip=None)
    b.load_state_dict(a.state_dict())  # as a resumed run would
    for p, s in batches[2:]:
        torch.testing.assert_close(a(p, s).reward, b(p, s).reward)
    seen_pref = torch.cat([p for p, _ in batches])
    assert a.moments["pref"].mean == pytest.approx(seen_pref.mean().item(), rel=1e-6)
    # After mixing many batches the running-normalised signal is roughly standardised.
    last = a(seen_pref, torch.cat([s for _, s in batches]))
    assert abs(last.pref.mean().item()) < 0.5
