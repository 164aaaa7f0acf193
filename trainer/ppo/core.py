"""PPO math as small pure functions (Schulman et al. 2017; Ziegler et al. 2019 for RLHF).

Shapes: B = samples in the batch, A = response tokens (right-padded); `mask` (B, A) is 1 on
real response tokens. Every function is tested against a naive Python loop in
tests/test_ppo_core.py. Names follow the papers (and CleanRL): delta, advantages, returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- masked stats


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1; over everything (scalar) or along `dim`."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of x (scalar), Bessel-corrected by default."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries; padding stays 0. x, mask: (B, A)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# --------------------------------------------------------------------------- log-probs


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label]. logits: (B, A, V), labels: (B, A) -> (B, A)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, A, V)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, A)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: logsumexp(z) − Σ p·z. (B, A, V) -> (B, A)."""
    logits = logits.float()
    p = F.softmax(logits, dim=-1)  # (B, A, V)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


# --------------------------------------------------------------------------- rewards


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of mask (B, A) -> (B,); 0 for an all-zero row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, A)
    return (positions * mask.long()).argmax(dim=1)


@dataclass(frozen=True)
class TokenRewards:
    rewards: torch.Tensor  # (B, A) −β·kl on every token, + score on the last real token
    kl: torch.Tensor  # (B, A) logπ − logπ_ref (masked), the per-token KL estimate


def kl_penalty_rewards(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> TokenRewards:
    """Per-token RLHF reward (Ziegler et al.): r_t = −β(logπ_t − logπ_ref,t), plus the scalar
    (already clipped) score at the last real response token.

    logprobs, ref_logprobs, mask: (B, A); scores: (B,).
    """
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask  # (B, A)
    rewards = -kl_coef * kl  # (B, A)
    last = last_token_index(mask)  # (B,)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))  # (B, A)
    return TokenRewards(rewards=rewards * mask, kl=kl)


def objective_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence KL estimate Σ_t (logπ − logπ_ref) per sample, (B, A) -> (B,); its mean is kl/objective."""
    return ((logprobs - ref_logprobs) * mask.to(logprobs.dtype)).sum(dim=1)


# --------------------------------------------------------------------------- GAE


@dataclass(frozen=True)
class Advantages:
    advantages: torch.Tensor  # (B, A) GAE(γ, λ), 0 on padding
    returns: torch.Tensor  # (B, A) advantages + values: the value targets


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95) -> Advantages:
    """Generalised advantage estimation over the response, masked (Schulman et al. 2016).

    rewards, values, mask: (B, A). A padded position contributes neither a reward nor a
    bootstrap value, so a short response ends (terminal) at its last real token.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask  # (B, A)
    B, A = rewards.shape
    lastgaelam = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,)
    advantages_reversed = []
    for t in reversed(range(A)):
        nextvalues = values[:, t + 1] if t + 1 < A else torch.zeros_like(lastgaelam)  # (B,)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = (delta + gamma * lam * lastgaelam) * mask[:, t]
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, A)
    return Advantages(advantages=advantages, returns=(advantages + values) * mask)


# --------------------------------------------------------------------------- losses


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor  # () clipped surrogate, to minimise
    clipfrac: torch.Tensor  # () fraction of tokens where the clip was active
    approx_kl: torch.Tensor  # () k3 estimate of KL(π_old ‖ π_θ): E[(r − 1) − log r]


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> PolicyLoss:
    """PPO clipped surrogate: max(−A·ratio, −A·clip(ratio, 1±ε)), masked mean. All (B, A)."""
    logratio = logprobs - old_logprobs  # (B, A)
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses).to(logprobs.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - logratio, mask)  # Schulman's k3: unbiased, >= 0
    return PolicyLoss(loss=loss, clipfrac=clipfrac, approx_kl=approx_kl)


@dataclass(frozen=True)
class ValueLoss:
    loss: torch.Tensor  # () ½ · masked mean of max(unclipped, clipped) squared error
    clipfrac: torch.Tensor  # () fraction of tokens where the clipped error was larger


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> ValueLoss:
    """Clipped value loss (PPO2 / TRL): the new value may move at most ε from the old. All (B, A)."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)  # (B, A)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses2 > vf_losses1).to(values.dtype), mask)
    return ValueLoss(loss=loss, clipfrac=clipfrac)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[returns − values] / Var[returns] over masked tokens: 1 = perfect critic, ≤ 0 = useless."""
    var_y = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_y.clamp(min=1e-12)


# --------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """β stays at its initial value (the thesis's 'fixed by flag')."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, §2.2: β ← β·(1 + K_β·e), e = clip(KL/target − 1, ±0.2), K_β = n/horizon.

    Proportional control keeps the objective KL near `target` nats; the ±0.2 clip bounds
    how fast β can move in one step.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
