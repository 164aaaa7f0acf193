"""The data-parallel learner group: N = 2 workers (gloo, real Ray actors) land on the weights
one plain learner reaches for the same seed and global batch; a dead worker fails the step
loudly, naming the rank and node; rank 0 alone writes, every rank restores."""

from __future__ import annotations

import pytest
import torch

from trainer.ppo.config import PPOConfig
from trainer.ppo.experience import RolloutSample
from trainer.train_device import shard_slice, shard_weight

pytestmark = pytest.mark.slow


def _cfg(tiny_models, tmp_path, **ppo):
    return PPOConfig.model_validate({
        "model": {"policy_path": str(tiny_models["policy"])},
        # Clipping on: it must act on the averaged gradient. Adam divides by sqrt(v) + eps, so an
        # element whose gradient is near eps turns summation-order noise (two shards vs one batch)
        # into a step of up to lr: at eps 1e-8 one lora_A element of 2048 differed by 1.06e-5.
        # eps 1e-6 keeps such elements' steps small (worst difference 1.7e-8 measured) while the
        # step still moves weights 400x the tolerance.
        "optim": {"lr": 1e-4, "max_grad_norm": 0.5, "eps": 1e-6},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "grad_accum": 1, "ppo_epochs": 2, **ppo},
        "kl": {"init_coef": 0.05},
        "run": {"output_dir": str(tmp_path), "seed": 3},
    })


def _samples(n=8, seed=0):
    # Response lengths differ (2..6 tokens), so a row split gives shards of unequal token counts:
    # only a token-weighted loss matches the single learner.
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(10, 250, (3 + i % 4,), generator=g).tolist()
        r = torch.randint(10, 250, (2 + (i * 3) % 5,), generator=g).tolist()
        out.append(RolloutSample(i, p, r, [-1.0] * len(r), "x", "length", r_pref=float(i % 3), r_abs=float(-i) / 4))
    return out


def test_shard_rows_and_weights_hand_worked():
    assert [shard_slice(5, r, 2) for r in range(2)] == [slice(0, 3), slice(3, 5)]
    assert [shard_slice(4, r, 2) for r in range(2)] == [slice(0, 2), slice(2, 4)]
    assert shard_slice(4, 0, 1) == slice(0, 4)
    # Shards holding 3 and 1 of 4 tokens: scaled means averaged over ranks give the global mean.
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    w0, w1 = shard_weight(3, 4, 2), shard_weight(1, 4, 2)
    assert (w0, w1) == (1.5, 0.5)
    assert (w0 * x[:3].mean() + w1 * x[3:].mean()) / 2 == pytest.approx(x.mean().item())


def _lora_state(learner) -> dict:
    out = {n: q.detach().clone() for n, q in learner.model.named_parameters() if q.requires_grad}
    out.update({f"value_head.{k}": v.detach().clone() for k, v in learner.value_head.state_dict().items()})
    return out


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_workers_match_one_learner(tiny_models, tmp_path, ray_cluster, grad_accum):
    from trainer.ppo.learner import Learner
    from trainer.ppo.learner_group import LearnerGroup

    cfg = _cfg(tiny_models, tmp_path, mini_batch_size=4 // grad_accum, grad_accum=grad_accum)
    single = Learner(cfg)
    before = _lora_state(single)
    stats_1 = single.train_step(_samples())
    want = _lora_state(single)

    group = LearnerGroup(cfg, num_workers=2, collective_timeout_s=60)
    try:
        assert group.backends == ["gloo:cpu", "gloo:cpu"]
        stats_2 = group.train_step(_samples())
        ranks = group.trainable_states()
    finally:
        group.shutdown()
    assert stats_2["learner/num_workers"] == 2
    assert stats_2["ppo/optimizer_steps"] == stats_1["ppo/optimizer_steps"] == 2 * 8 // (cfg.mini_batch_size * grad_accum)
    moved = max((want[k] - before[k]).abs().max().item() for k in want)
    assert moved > 100 * 1e-6, "the step must move the weights far beyond the tolerance, or the comparison proves nothing"
    assert set(ranks[0]) == set(want)
    for k in want:
        torch.testing.assert_close(ranks[0][k], want[k], atol=1e-6, rtol=0, msg=k)
        torch.testing.assert_close(ranks[1][k], ranks[0][k], atol=0, rtol=0, msg=k)  # ranks never drift apart
    for k in ("loss/policy", "loss/value", "policy/approx_kl", "kl/objective", "reward/crs"):
        assert stats_2[k] == pytest.approx(stats_1[k], abs=1e-4), k


def test_rank0_writes_every_rank_restores(tiny_models, tmp_path, ray_cluster):
    from trainer.ppo.learner_group import LearnerGroup

    cfg = _cfg(tiny_models, tmp_path)
    group = LearnerGroup(cfg, num_workers=2, collective_timeout_s=60)
    try:
        group.train_step(_samples())
        ckpt = group.save_checkpoint(str(tmp_path / "checkpoints" / "step-000001"), {"step": 1, "data_position": 8})
        adapter = group.save_adapter(str(tmp_path / "adapters" / "step-000001"))
        trained = group.trainable_states()[0]
    finally:
        group.shutdown()
    assert (tmp_path / "adapters" / "step-000001" / "adapter_model.safetensors").is_file() and adapter
    fresh = LearnerGroup(cfg, num_workers=2, collective_timeout_s=60)
    try:
        assert fresh.load_checkpoint(ckpt)["step"] == 1
        for state in fresh.trainable_states():
            for k, v in trained.items():
                torch.testing.assert_close(state[k], v, atol=0, rtol=0, msg=k)
        # Restored optimizer and shuffle state on both ranks: a further step keeps them identical.
        fresh.train_step(_samples(seed=1))
        a, b = fresh.trainable_states()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    finally:
        fresh.shutdown()


def test_dead_worker_fails_the_step_naming_its_node(tiny_models, tmp_path, ray_cluster):
    import ray

    from trainer.ppo.learner_group import LearnerGroup, LearnerFailed

    group = LearnerGroup(_cfg(tiny_models, tmp_path), num_workers=2, collective_timeout_s=30)
    try:
        ray.kill(group.workers[1])
        with pytest.raises(LearnerFailed, match=r"rank 1 \(node [0-9.]+ .*died during train_step.*--resume"):
            group.train_step(_samples())
    finally:
        group.shutdown()


def test_minibatch_must_split_evenly(tiny_models, tmp_path, ray_cluster):
    from trainer.ppo.learner_group import LearnerGroup

    with pytest.raises(ValueError, match="must divide the minibatch size 4"):
        LearnerGroup(_cfg(tiny_models, tmp_path), num_workers=3)
