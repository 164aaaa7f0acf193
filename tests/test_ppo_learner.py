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


def _sched_cfg(tiny_models, tmp_path, **ppo):
    return PPOConfig.model_validate({
        "model": {"policy_path": str(tiny_models["policy"])},
        "optim": {"lr": 1e-2, "max_grad_norm": None},
        "ppo": ppo,
        "run": {"output_dir": str(tmp_path)},
    })


def _even_samples(n, seed=0, resp_len=4):
    """Equal response lengths: a masked mean over 4 rows is then the mean of two 2-row means."""
    g = torch.Generator().manual_seed(seed)
    return [RolloutSample(i, torch.randint(10, 250, (3 + i % 3,), generator=g).tolist(),
                          torch.randint(10, 250, (resp_len,), generator=g).tolist(), [0.0] * resp_len, "x", "length",
                          r_pref=float(i % 4), r_abs=-float(i % 3)) for i in range(n)]


def _record_steps(learner) -> list[list[torch.Tensor]]:
    """The gradients the optimizer sees at each of its steps (a real hook, no stand-in)."""
    seen: list[list[torch.Tensor]] = []
    learner.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]))
    return seen


@pytest.mark.parametrize("ppo,expected", [
    ({"batch_size": 16, "ppo_epochs": 4, "mini_batch_size": 2, "grad_accum": 8}, 4),  # thesis (TRL 0.7): 1 per epoch
    ({"batch_size": 16, "ppo_epochs": 4, "num_minibatches": 4}, 16),  # the default: 1 per minibatch
    ({"batch_size": 16, "ppo_epochs": 2, "mini_batch_size": 4, "grad_accum": 2}, 4),
])
def test_update_takes_the_scheduled_number_of_optimizer_steps(tiny_models, tmp_path, learner_cls, ppo, expected):
    cfg = _sched_cfg(tiny_models, tmp_path, **ppo)
    assert cfg.optimizer_steps_per_batch == expected
    learner = learner_cls(cfg)
    seen = _record_steps(learner)
    stats = learner.update(learner.make_experience(_even_samples(16))[0])
    assert len(seen) == expected == stats["ppo/optimizer_steps"]
    adam_steps = {int(s["step"]) for s in learner.optimizer.state.values()}
    assert adam_steps == {expected}


def test_grad_accum_averages_minibatch_gradients(tiny_models, tmp_path, learner_cls):
    # 2 minibatches of 2 accumulated == 1 minibatch of 4: the step sees the mean gradient, not the sum.
    grads = {}
    for name, ppo in (("accum", {"mini_batch_size": 2, "grad_accum": 2}), ("whole", {"mini_batch_size": 4, "grad_accum": 1})):
        learner = learner_cls(_sched_cfg(tiny_models, tmp_path, batch_size=4, ppo_epochs=1, **ppo))
        seen = _record_steps(learner)
        learner.update(learner.make_experience(_even_samples(4))[0])
        assert len(seen) == 1
        grads[name] = seen[0]
    assert len(grads["accum"]) == len(grads["whole"]) > 0
    for a, b in zip(grads["accum"], grads["whole"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_micro_batches_hand_worked():
    from trainer.ppo.learner import micro_batches, resolve_precision

    assert micro_batches(5, 10, 20) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert micro_batches(5, 10, None) == [slice(0, 5)]
    assert micro_batches(3, 10, 7) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # a row over budget still runs alone
    assert micro_batches(4, 10, 40) == [slice(0, 4)]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (resolve_precision("auto", cpu), resolve_precision("auto", cuda)) == (None, torch.bfloat16)
    assert (resolve_precision("fp32", cuda), resolve_precision("bf16", cpu)) == (None, torch.bfloat16)


def _params(learner) -> dict[str, torch.Tensor]:
    out = {k: v.detach().clone() for k, v in learner.model.named_parameters() if v.requires_grad}
    out.update({f"value_head.{k}": v.detach().clone() for k, v in learner.value_head.state_dict().items()})
    return out


@pytest.mark.parametrize("learner_over", [
    {"micro_batch_tokens": 14},  # padded length 14 (prompts 3..9 + responses 3..5): one row per micro-batch
    {"gradient_checkpointing": True},
    {"micro_batch_tokens": 30, "gradient_checkpointing": True},  # two rows, then one
])
def test_micro_batches_and_checkpointing_give_the_unsplit_step(tiny_models, tmp_path, learner_cls, learner_over):
    # Unequal response lengths: only token-weighted micro-batch losses sum to the minibatch's gradient.
    # lr 1e-4 with clipping, as in test_learner_group: Adam turns a near-eps gradient element's
    # summation-order noise into a step of ~2 % of lr; the step still moves weights far beyond 1e-5.
    def cfg(**learner):
        return PPOConfig.model_validate({
            "model": {"policy_path": str(tiny_models["policy"])},
            "optim": {"lr": 1e-4, "max_grad_norm": 0.5},
            "ppo": {"batch_size": 4, "num_minibatches": 2, "ppo_epochs": 2},
            "kl": {"init_coef": 0.05},
            "learner": learner,
            "run": {"output_dir": str(tmp_path), "seed": 5},
        })

    whole, split = learner_cls(cfg()), learner_cls(cfg(**learner_over))
    assert max(len(s.prompt_ids) for s in _samples()) + max(len(s.response_ids) for s in _samples()) == 14
    before = _params(whole)
    stats_whole, stats_split = whole.train_step(_samples()), split.train_step(_samples())
    want, got = _params(whole), _params(split)
    assert max((want[k] - before[k]).abs().max().item() for k in want) > 30 * 1e-5
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
    for k in ("loss/policy", "loss/value", "policy/approx_kl", "policy/clipfrac", "policy/entropy", "kl/objective"):
        assert stats_split[k] == pytest.approx(stats_whole[k], abs=1e-5), k
    assert stats_split["ppo/optimizer_steps"] == stats_whole["ppo/optimizer_steps"] == 4


def test_bf16_autocast_keeps_logprob_math_in_fp32(tiny_models, tmp_path, learner_cls):
    cfg = _cfg(tiny_models, tmp_path).model_copy(update={"learner": PPOConfig().learner.model_copy(update={"precision": "bf16"})})
    learner = learner_cls(cfg)
    assert learner.autocast_dtype is torch.bfloat16
    exp, _ = learner.make_experience(_samples())
    assert exp.logprobs.dtype == exp.values.dtype == exp.advantages.dtype == torch.float32
    ref = learner_cls(_cfg(tiny_models, tmp_path)).make_experience(_samples())[0]
    gap = ((exp.logprobs - ref.logprobs).abs() * exp.response_mask).max().item()
    assert 0 < gap < 0.5, gap  # bf16 forwards: close to fp32, not identical (autocast really ran)
    stats = learner.update(exp)
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())  # fp32 master weights
    assert torch.isfinite(torch.tensor(stats["loss/policy"]))
