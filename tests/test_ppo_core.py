"""PPO math against naive Python loops on small random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.ppo import core


def _batch(seed=0, B=3, A=5):
    g = torch.Generator().manual_seed(seed)
    lengths = [A, 2, 4][:B]
    mask = torch.zeros(B, A)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    rnd = lambda: torch.randn(B, A, generator=g, dtype=torch.float64)  # noqa: E731
    return mask.double(), rnd, g


def _naive_masked_stats(x, mask):
    vals = [x[i][t].item() for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i][t] > 0]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, var


def test_masked_mean_var_whiten():
    mask, rnd, _ = _batch()
    x = rnd() * 3 + 1
    mean, var = _naive_masked_stats(x, mask)
    assert core.masked_mean(x, mask).item() == pytest.approx(mean)
    assert core.masked_var(x, mask).item() == pytest.approx(var)
    w = core.masked_whiten(x, mask)
    for i in range(3):
        for t in range(5):
            want = (x[i, t].item() - mean) / math.sqrt(var + 1e-8) if mask[i, t] else 0.0
            assert w[i, t].item() == pytest.approx(want, abs=1e-9)
    wm, wv = _naive_masked_stats(w, mask)
    assert wm == pytest.approx(0, abs=1e-9) and wv == pytest.approx(1, abs=1e-6)
    row = core.masked_mean(x, mask, dim=1)
    assert row[1].item() == pytest.approx((x[1, 0] + x[1, 1]).item() / 2)


def test_kl_penalty_rewards_put_score_on_last_real_token():
    mask, rnd, _ = _batch()
    lp, ref = rnd(), rnd()
    scores = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    beta = 0.1
    out = core.kl_penalty_rewards(lp, ref, scores, mask, beta)
    for i in range(3):
        n = int(mask[i].sum())
        for t in range(5):
            want = 0.0
            if t < n:
                want = -beta * (lp[i, t] - ref[i, t]).item() + (scores[i].item() if t == n - 1 else 0.0)
            assert out.rewards[i, t].item() == pytest.approx(want)
    assert core.objective_kl(lp, ref, mask)[1].item() == pytest.approx((lp[1, :2] - ref[1, :2]).sum().item())
    assert core.last_token_index(mask).tolist() == [4, 1, 3]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_naive_loop(gamma, lam):
    mask, rnd, _ = _batch(seed=1)
    rewards, values = rnd(), rnd()
    out = core.gae(rewards, values, mask, gamma, lam)
    for i in range(3):
        n = int(mask[i].sum())
        adv = [0.0] * n
        last = 0.0
        for t in reversed(range(n)):  # textbook GAE on the unpadded episode
            nv = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * nv - values[i, t].item()
            last = delta + gamma * lam * last
            adv[t] = last
        for t in range(5):
            want_a = adv[t] if t < n else 0.0
            want_r = adv[t] + values[i, t].item() if t < n else 0.0
            assert out.advantages[i, t].item() == pytest.approx(want_a)
            assert out.returns[i, t].item() == pytest.approx(want_r)


def test_policy_loss_matches_naive_loop():
    mask, rnd, _ = _batch(seed=2)
    lp, old, adv = rnd() * 0.5, rnd() * 0.5, rnd()
    eps = 0.2
    out = core.policy_loss(lp, old, adv, mask, eps)
    losses, clipped, kls = [], [], []
    for i in range(3):
        for t in range(5):
            if not mask[i, t]:
                continue
            ratio = math.exp(lp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            l1, l2 = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            losses.append(max(l1, l2))
            clipped.append(1.0 if l2 > l1 else 0.0)
            kls.append((ratio - 1) - math.log(ratio))
    assert out.loss.item() == pytest.approx(sum(losses) / len(losses))
    assert out.clipfrac.item() == pytest.approx(sum(clipped) / len(clipped))
    assert out.approx_kl.item() == pytest.approx(sum(kls) / len(kls))
    assert 0 < out.clipfrac.item() < 1  # the random case exercises both branches


def test_value_loss_matches_naive_loop():
    mask, rnd, _ = _batch(seed=3)
    v, old, ret = rnd(), rnd(), rnd()
    eps = 0.4
    out = core.value_loss(v, old, ret, mask, eps)
    losses, clipped = [], []
    for i in range(3):
        for t in range(5):
            if not mask[i, t]:
                continue
            vc = old[i, t].item() + min(max(v[i, t].item() - old[i, t].item(), -eps), eps)
            l1, l2 = (v[i, t].item() - ret[i, t].item()) ** 2, (vc - ret[i, t].item()) ** 2
            losses.append(max(l1, l2))
            clipped.append(1.0 if l2 > l1 else 0.0)
    assert out.loss.item() == pytest.approx(0.5 * sum(losses) / len(losses))
    assert out.clipfrac.item() == pytest.approx(sum(clipped) / len(clipped))


def test_entropy_and_logprobs_from_logits():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    ent, lp = core.entropy_from_logits(logits), core.logprobs_from_logits(logits, labels)
    for b in range(2):
        for t in range(3):
            z = logits[b, t].tolist()
            m = max(z)
            s = sum(math.exp(v - m) for v in z)
            p = [math.exp(v - m) / s for v in z]
            assert ent[b, t].item() == pytest.approx(-sum(pi * math.log(pi) for pi in p), rel=1e-5)
            assert lp[b, t].item() == pytest.approx(math.log(p[labels[b, t]]), rel=1e-5)


def test_explained_variance():
    mask, rnd, _ = _batch(seed=5)
    ret = rnd()
    assert core.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    v = rnd()
    _, var_r = _naive_masked_stats(ret, mask)
    _, var_d = _naive_masked_stats(ret - v, mask)
    assert core.explained_variance(v, ret, mask).item() == pytest.approx(1 - var_d / var_r)


def test_kl_controllers():
    fixed = core.FixedKLController(0.2)
    fixed.update(100.0, 16)
    assert fixed.value == 0.2
    ctl = core.AdaptiveKLController(0.002, target=6.0, horizon=10000)
    ctl.update(12.0, 16)  # KL far above target: error clipped to +0.2
    assert ctl.value == pytest.approx(0.002 * (1 + 0.2 * 16 / 10000))
    ctl2 = core.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl2.update(5.4, 10)  # error -0.1
    assert ctl2.value == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    restored = core.AdaptiveKLController(1.0, 6.0, 100)
    restored.load_state_dict(ctl2.state_dict())
    assert restored.value == ctl2.value
