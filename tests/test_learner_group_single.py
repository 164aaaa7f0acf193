"""One learner handle for every N: a `LearnerGroup` of one worker (a real Ray actor) is the
plain in-process `Learner`, to 1e-6, on the weights, the stats, and a checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from test_learner_group import _cfg, _lora_state, _samples

pytestmark = pytest.mark.slow


def test_group_of_one_is_the_plain_learner(tiny_models, tmp_path, ray_cluster):
    from trainer.ppo.learner import Learner
    from trainer.ppo.learner_group import LearnerGroup

    cfg = _cfg(tiny_models, tmp_path)
    plain = Learner(cfg)
    before = _lora_state(plain)
    want_stats = [plain.train_step(_samples(seed=s)) for s in (0, 1)]
    want = _lora_state(plain)

    group = LearnerGroup(cfg, num_workers=1)
    try:
        assert group.backends == ["single:cpu"]  # no process group for one worker
        got_stats = [group.train_step(_samples(seed=s)) for s in (0, 1)]
        (got,) = group.trainable_states()
        ckpt = group.save_checkpoint(str(tmp_path / "checkpoints" / "step-000002"), {"step": 2, "data_position": 16})
    finally:
        group.shutdown()
    moved = max((want[k] - before[k]).abs().max().item() for k in want)
    assert moved > 100 * 1e-6, "the steps must move the weights far beyond the tolerance, or the comparison proves nothing"
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
    for a, b in zip(got_stats, want_stats):
        assert a["learner/num_workers"] == b["learner/num_workers"] == 1
        for k in ("loss/policy", "loss/value", "policy/approx_kl", "kl/objective", "kl/coef", "reward/crs"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k

    restored = Learner(cfg)  # the group's checkpoint is the plain learner's format
    assert restored.load_checkpoint(ckpt)["step"] == 2
    for k, v in _lora_state(restored).items():
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=0, msg=k)
