"""The Combined Reward Signal: ``r = w · r_pref + (1 − w) · r_abs`` (docs/method.md, section 6).

One pure module so every knob the thesis (and we) vary is tested in one place:

- which absolute output feeds the mix: the **logit** (default — the thesis found the bounded
  probability shrank responses during training) or ``sigmoid(logit)``;
- per-signal normalisation *before* mixing: ``none`` (the thesis mixed raw values, mean pref
  2.26 vs abs 0.86), ``running`` mean/std (Welford with the parallel merge of Chan et al.,
  its state saved in checkpoints), or ``batch``;
- clipping of the mixed score to ``[-clip, clip]`` (the thesis's score clip 4);
- ``w = 1`` needs no absolute service and ``w = 0`` no preference service (pass ``None``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

AbsOutput = Literal["logit", "probability"]
Normalise = Literal["none", "running", "batch"]


@dataclass
class RunningMoments:
    """Running mean / variance over every score seen, mergeable batch by batch.

    Chan et al.'s parallel update merges a whole batch's (count, mean, M2) at once, which is
    exact (not an approximation of one-at-a-time Welford) and numerically stable.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    def update(self, x: torch.Tensor) -> None:
        """Merge the values of `x` (any shape) into the running moments."""
        x = x.detach().double().flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    @property
    def var(self) -> float:
        """Unbiased variance; 0 until two values are seen."""
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass(frozen=True)
class CRSResult:
    """Per-sample rewards, all (B,). `pref`/`abs` are the values that entered the mix."""

    reward: torch.Tensor  # (B,) clipped w·pref + (1-w)·abs — the scalar PPO reward
    pref: torch.Tensor | None  # (B,) preference score after normalisation (None when w == 0)
    abs: torch.Tensor | None  # (B,) absolute score (logit or prob) after normalisation (None when w == 1)


def select_abs(abs_logit: torch.Tensor, output: AbsOutput) -> torch.Tensor:
    """The absolute RM's logit, or its probability sigmoid(logit) — what the service reports."""
    if output == "logit":
        return abs_logit
    if output == "probability":
        return torch.sigmoid(abs_logit)
    raise ValueError(f"abs output must be 'logit' or 'probability', got {output!r}")


def batch_normalise(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std within the batch; a batch of one is only centred. x: (B,)."""
    if x.numel() < 2:
        return x - x.mean()
    return (x - x.mean()) / (x.std() + eps)


def mix(pref: torch.Tensor | None, abs_: torch.Tensor | None, weight: float) -> torch.Tensor:
    """w·pref + (1−w)·abs, with the unused signal allowed to be None at w ∈ {0, 1}. (B,)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"CRS weight must be in [0, 1], got {weight}")
    if weight > 0 and pref is None:
        raise ValueError(f"CRS weight {weight} > 0 needs preference scores (set weight 0 to train on abs only)")
    if weight < 1 and abs_ is None:
        raise ValueError(f"CRS weight {weight} < 1 needs absolute scores (set weight 1 to train on pref only)")
    if weight == 1.0:
        return pref.clone()
    if weight == 0.0:
        return abs_.clone()
    return weight * pref + (1.0 - weight) * abs_


@dataclass
class CombinedReward:
    """Stateful CRS: holds the running normalisers; everything else is the pure functions above."""

    weight: float = 0.25
    abs_output: AbsOutput = "logit"
    normalise: Normalise = "none"
    clip: float | None = 4.0
    eps: float = 1e-8
    moments: dict[str, RunningMoments] = field(default_factory=lambda: {"pref": RunningMoments(), "abs": RunningMoments()})

    def _normalise(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.normalise == "none":
            return x
        if self.normalise == "batch":
            return batch_normalise(x, self.eps)
        if self.normalise == "running":
            # Update first, then normalise: the first batch is then scaled by its own stats
            # instead of dividing by an undefined std of zero samples.
            m = self.moments[name]
            m.update(x)
            std = m.std if m.count > 1 else 1.0
            return (x - m.mean) / (std + self.eps)
        raise ValueError(f"normalise must be none | running | batch, got {self.normalise!r}")

    def __call__(self, r_pref: torch.Tensor | None, r_abs_logit: torch.Tensor | None) -> CRSResult:
        """r_pref: (B,) preference logits or None; r_abs_logit: (B,) absolute logits or None."""
        pref = self._normalise("pref", r_pref.float()) if (r_pref is not None and self.weight > 0) else None
        abs_ = None
        if r_abs_logit is not None and self.weight < 1:
            abs_ = self._normalise("abs", select_abs(r_abs_logit.float(), self.abs_output))
        reward = mix(pref, abs_, self.weight)  # (B,)
        if self.clip is not None:
            reward = reward.clamp(-self.clip, self.clip)
        return CRSResult(reward=reward, pref=pref, abs=abs_)

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in self.moments.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, s in state.items():
            self.moments.setdefault(name, RunningMoments()).load_state_dict(s)
