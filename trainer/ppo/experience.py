"""What flows through a PPO step: rollouts from the workers, `Experience` in the learner.

Shapes: B = samples, P = longest prompt (prompts LEFT-padded), A = longest response
(responses RIGHT-padded). Left-padding prompts puts every response at the same columns
P..P+A-1, so the logits that predict response token t sit at column P-1+t for every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RolloutSample:
    """One completion with both scores, as a rollout worker returns it (plain Python, Ray-friendly)."""

    prompt_index: int  # position of the prompt in the run's prompt order (for resume checks)
    prompt_ids: list[int]  # templated prompt tokens as policy_gen saw them
    response_ids: list[int]  # sampled tokens (EOS included when the model stopped)
    gen_logprobs: list[float]  # log π(token) reported by policy_gen, one per response token
    response_text: str
    finish_reason: str | None
    r_pref: float | None  # preference RM logit (None when the CRS weight is 0)
    r_abs: float | None  # absolute RM logit (None when the CRS weight is 1)


@dataclass
class RolloutBatch:
    samples: list[RolloutSample]
    time_generate: float = 0.0  # wall time from the first request until the last completion arrived
    time_score: float = 0.0  # wall time spent waiting on scores (only the part not hidden by generation)
    time_total: float = 0.0
    retries: dict[str, int] = field(default_factory=dict)  # transient failures per service


@dataclass
class Experience:
    """Tensors of one PPO batch, OpenRLHF-style. All float tensors fp32 on the learner's device."""

    sequences: torch.Tensor  # (B, P+A) long: left-padded prompt ++ right-padded response
    attention_mask: torch.Tensor  # (B, P+A) long: 1 on real tokens
    response_ids: torch.Tensor  # (B, A) long: the actions a_t
    response_mask: torch.Tensor  # (B, A) float: 1 on real response tokens
    prompt_len: int  # P: response token t is predicted by the logits at column P-1+t
    logprobs: torch.Tensor  # (B, A) log π_θold(a_t|s_t), recomputed by the learner
    ref_logprobs: torch.Tensor  # (B, A) log π_ref(a_t|s_t): same model, adapter disabled
    gen_logprobs: torch.Tensor  # (B, A) log π(a_t|s_t) as policy_gen reported it (for the gap check)
    values: torch.Tensor  # (B, A) V(s_t) from the value head
    scores: torch.Tensor  # (B,) CRS reward (mixed, normalised, clipped)
    rewards: torch.Tensor  # (B, A) −β·KL_t, + score on the last real token
    advantages: torch.Tensor  # (B, A) GAE, whitened over the batch
    returns: torch.Tensor  # (B, A) value targets

    @property
    def size(self) -> int:
        return self.sequences.shape[0]


@dataclass(frozen=True)
class PaddedBatch:
    sequences: torch.Tensor  # (B, P+A)
    attention_mask: torch.Tensor  # (B, P+A)
    response_ids: torch.Tensor  # (B, A)
    response_mask: torch.Tensor  # (B, A)
    gen_logprobs: torch.Tensor  # (B, A)
    prompt_len: int


def pad_samples(samples: list[RolloutSample], pad_id: int) -> PaddedBatch:
    """Left-pad prompts, right-pad responses (see the module docstring for why)."""
    P = max(len(s.prompt_ids) for s in samples)
    A = max(max(len(s.response_ids) for s in samples), 1)
    B = len(samples)
    seq = torch.full((B, P + A), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + A, dtype=torch.long)
    resp = torch.full((B, A), pad_id, dtype=torch.long)
    rmask = torch.zeros(B, A)
    glp = torch.zeros(B, A)
    for i, s in enumerate(samples):
        n_p, n_a = len(s.prompt_ids), len(s.response_ids)
        seq[i, P - n_p : P] = torch.tensor(s.prompt_ids)
        attn[i, P - n_p : P + n_a] = 1
        if n_a:
            seq[i, P : P + n_a] = torch.tensor(s.response_ids)
            resp[i, :n_a] = torch.tensor(s.response_ids)
            rmask[i, :n_a] = 1
            glp[i, :n_a] = torch.tensor(s.gen_logprobs[:n_a], dtype=torch.float32)
    return PaddedBatch(seq, attn, resp, rmask, glp, P)
