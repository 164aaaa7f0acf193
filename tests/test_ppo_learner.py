"""The learner without services: padding-invariant logprobs, a step moves the LoRA weights,
the reference (adapter disabled) stays put, and a checkpoint restores the exact state."""

from __future__ import annotations

import pytest
import torch

from trainer.ppo.config import PPOConfig
from trainer.ppo.experience import RolloutSample


def _cfg(tiny_models, tmp_path, **run):
    return PPOConfig.model_validate({
        "model": {"policy_path": str(tiny_models["policy"])},
        "optim": {"lr": 1e-2},
        "ppo": {"batch_size": 4, "num_minibatches": 2, "ppo_epochs": 2},
        "run": {"output_dir": str(tmp_path), **run},
    })


def _samples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(10, 250, (3 + 2 * i,), generator=g).tolist()
        r = torch.randint(10, 250, (5 - i % 3,), generator=g).tolist()
        out.append(RolloutSample(i, p, r, [0.0] * len(r), "x", "length", r_pref=float(i), r_abs=float(-i) / 2))
    return out


@pytest.fixture(scope="module")
def learner_cls():
    from trainer.ppo.learner import Learner

    return Learner


def test_logprobs_do_not_depend_on_padding(tiny_models, tmp_path, learner_cls):
    from trainer.ppo import core

    learner = learner_cls(_cfg(tiny_models, tmp_path))
    samples = _samples()
    exp, _ = learner.make_experience(samples)
    for i, s in enumerate(samples):  # each row alone, unpadded, must give the same logprobs
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = learner.model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1]
        lp = core.logprobs_from_logits(logits.unsqueeze(0), torch.tensor([s.response_ids]))[0]
        torch.testing.assert_close(exp.logprobs[i, : len(s.response_ids)], lp, atol=1e-5, rtol=1e-5)
    # Before any update the LoRA B matrices are zero: policy == reference.
    torch.testing.assert_close(exp.logprobs, exp.ref_logprobs)


def test_step_changes_lora_and_checkpoint_round_trips(tiny_models, tmp_path, learner_cls):
    cfg = _cfg(tiny_models, tmp_path)
    learner = learner_cls(cfg)
    before = {k: v.clone() for k, v in learner.model.named_parameters() if v.requires_grad}
    stats = learner.train_step(_samples())
    changed = [k for k, v in learner.model.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert changed and all("lora_" in k for k in changed)
    for key in ("loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl", "policy/entropy",
                "kl/objective", "kl/coef", "reward/crs", "reward/pref", "reward/abs"):
        assert torch.isfinite(torch.tensor(stats[key])), key
    assert stats["reward/crs"] == pytest.approx(0.25 * 1.5 + 0.75 * -0.75)

    ckpt = learner.save_checkpoint(tmp_path / "checkpoints" / "step-000001", {"step": 1, "data_position": 4})
    exp_a, _ = learner.make_experience(_samples(seed=1))
    other = learner_cls(cfg)
    state = other.load_checkpoint(ckpt)
    assert state["step"] == 1 and state["data_position"] == 4
    exp_b, _ = other.make_experience(_samples(seed=1))
    torch.testing.assert_close(exp_a.logprobs, exp_b.logprobs)
    torch.testing.assert_close(exp_a.values, exp_b.values)
    assert other.kl_ctl.value == learner.kl_ctl.value
    # The same update from the same state gives the same weights (optimizer + shuffle RNG restored).
    learner.update(exp_a)
    other.update(exp_b)
    for (k, a), (_, b) in zip(learner.model.named_parameters(), other.model.named_parameters()):
        torch.testing.assert_close(a, b, msg=k)
    path = learner.save_adapter(tmp_path / "adapters" / "step-000001")
    assert (tmp_path / "adapters" / "step-000001" / "adapter_model.safetensors").is_file(), path
