"""Sampling math of the hf backend, matching vLLM's sampler so logprobs mean the same thing.

vLLM with `--logprobs-mode processed_logprobs` returns `log_softmax` of the logits *after*
temperature scaling and top-k/top-p masking (masked tokens get -inf); greedy rows
(temperature 0) get `log_softmax` of the raw logits (vllm/v1/sample/sampler.py). PPO needs
these to equal what the learner recomputes at temperature 1 / top_p 1, hence one place.
"""

from __future__ import annotations

import torch

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below it mean greedy


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus top-p.

    logits: (B, V) fp32; top_k: (B,) int, <= 0 means off; top_p: (B,) float, 1.0 means off.
    Returns (B, V). Top-p keeps the smallest set whose probability reaches p, always >= 1 token.
    """
    B, V = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # (B, V) ascending
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))  # (B,)
    kth = sorted_logits.gather(1, (V - k).unsqueeze(1))  # (B, 1) smallest kept value
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V) mass at or below each token
    drop = cum <= (1.0 - top_p).unsqueeze(1)  # (B, V)
    drop[:, -1] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)  # (B, V) back in vocab order


def processed_logprobs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """vLLM's processed logprobs. logits: (B, V); temperature/top_p: (B,) float; top_k: (B,) int -> (B, V) fp32."""
    logits = logits.float()
    greedy = temperature < GREEDY_EPS  # (B,)
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)  # (B, V)
    masked = apply_top_k_top_p(scaled, top_k, top_p)
    processed = torch.where(greedy.unsqueeze(1), logits, masked)  # greedy rows: raw logits
    return processed.log_softmax(dim=-1)


def sample_tokens(logprobs: torch.Tensor, greedy: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row. logprobs: (B, V); greedy: (B,) bool; one generator per row -> (B,) long.

    Each row draws only from its own generator, so a seeded request samples the same tokens
    whatever else shares its batch.
    """
    probs = logprobs.exp()  # (B, V)
    out = logprobs.argmax(dim=-1)  # (B,)
    for i, gen in enumerate(generators):
        if not bool(greedy[i]):
            out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
    return out


def request_generator(
    seed: int | None, prompt_index: int, sample_index: int, fallback: int, device: str = "cpu"
) -> torch.Generator:
    """Generator of one sequence: seeded requests derive a distinct, fixed stream per (prompt, sample)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.manual_seed(fallback)
    else:
        gen.manual_seed((seed * 1_000_003 + prompt_index * 10_007 + sample_index) % (2**63 - 1))
    return gen
