"""The thesis's truncation policy (docs/method.md), as pure functions on token-id lists.

Thesis rule: at most `max_tokens`; the prompt keeps at least `min_prompt_tokens` and at most
`max_tokens - response_tokens`; a long prompt is cut from its BEGINNING (the latest turns and
the assistant header matter most to the reward); the response fills the rest and is cut at
its end only when it alone does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence


@dataclass(frozen=True)
class Truncated:
    """Token ids ready for the model and whether anything was cut."""

    ids: list[int]
    truncated: bool


class PairBudget(NamedTuple):
    prompt: int  # prompt tokens kept (its last ones)
    response: int  # response tokens kept (its first ones)


def pair_budget(prompt_len: int, response_len: int, max_tokens: int, min_prompt_tokens: int) -> PairBudget:
    """How many prompt and response tokens to keep.

    Invariants: prompt_keep + response_keep <= max_tokens; prompt_keep >= min(prompt_len,
    min_prompt_tokens) whenever that fits; nothing is cut when everything fits.
    """
    if prompt_len + response_len <= max_tokens:
        return PairBudget(prompt_len, response_len)
    floor = min(prompt_len, min_prompt_tokens, max_tokens)
    prompt_keep = max(min(prompt_len, max_tokens - response_len), floor)
    response_keep = min(response_len, max_tokens - prompt_keep)
    return PairBudget(prompt_keep, response_keep)


def truncate_pair(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    *,
    max_tokens: int,
    min_prompt_tokens: int,
    prefix: Sequence[int] = (),
    suffix: Sequence[int] = (),
) -> Truncated:
    """prefix + prompt (cut from its beginning) + response (cut at its end) + suffix.

    `prefix`/`suffix` are the tokenizer's own special tokens (BOS, or BERT's [CLS]/[SEP]);
    they always survive and count against `max_tokens`.
    """
    budget = max_tokens - len(prefix) - len(suffix)
    if budget <= 0:
        raise ValueError(f"max_tokens={max_tokens} leaves no room next to {len(prefix) + len(suffix)} special tokens")
    p_keep, r_keep = pair_budget(len(prompt_ids), len(response_ids), budget, min(min_prompt_tokens, budget))
    kept_prompt = list(prompt_ids[len(prompt_ids) - p_keep :]) if p_keep else []
    ids = [*prefix, *kept_prompt, *response_ids[:r_keep], *suffix]
    return Truncated(ids, truncated=(p_keep, r_keep) != (len(prompt_ids), len(response_ids)))


def truncate_left(ids: Sequence[int], max_tokens: int) -> Truncated:
    """A full templated text (OpenRLHF /get_reward): keep its last `max_tokens` tokens."""
    if len(ids) <= max_tokens:
        return Truncated(list(ids), False)
    return Truncated(list(ids[len(ids) - max_tokens :]), True)


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer's own config adds around a text (BOS; BERT's CLS/SEP).

    Found by diffing one encoding with and without special tokens, so training and serving add
    exactly what the model saw and nothing when the tokenizer adds nothing (our tiny models).
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []
