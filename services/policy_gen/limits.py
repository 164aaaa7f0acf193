"""Per-request work limits of policy_gen, the same for both backends (pure but for APIError).

A 359-byte request (20 prompts x n=64) once held the engine for 18 s, and a 15 MB prompt
took 26 s to tokenize only to be refused: limits are checked on what a request asks for,
before any tokenizing or generating.
"""

from __future__ import annotations

from services.common.http import APIError
from services.common.tokenize import ThreadTokenizer
from services.policy_gen.settings import PolicyGenSettings


def prompt_count(prompt) -> int:
    """How many prompts a completion request carries (a token-id list is one prompt)."""
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


def check_work(settings: PolicyGenSettings, prompts: int, n: int, max_tokens: int) -> None:
    """Per-request caps, the same for both backends: samples, sequences, requested tokens."""
    if n > settings.max_n:
        raise APIError(400, f"n={n} exceeds the server's max_n {settings.max_n}", param="n")
    sequences = prompts * n
    if sequences > settings.max_request_sequences:
        raise APIError(
            413, f"{prompts} prompts x n={n} = {sequences} sequences exceeds max_request_sequences "
            f"{settings.max_request_sequences}; split the request", param="n",
        )
    tokens = sequences * max_tokens
    if tokens > settings.max_request_tokens:
        raise APIError(
            413, f"{sequences} sequences x max_tokens {max_tokens} = {tokens} tokens exceeds max_request_tokens "
            f"{settings.max_request_tokens}; lower max_tokens or n, or split the request", param="max_tokens",
        )


def too_long_for_context(settings: PolicyGenSettings, tok: ThreadTokenizer, text: str, param: str) -> None:
    """400 before tokenizing a text that cannot fit: a token spans at most max_chars_per_token
    characters, so more characters than that per context token cannot be a valid prompt."""
    limit = settings.max_model_len * tok.max_chars_per_token
    if len(text) > limit:
        raise APIError(
            400, f"{param} has {len(text)} characters: more than fit this model's maximum context length of "
            f"{settings.max_model_len} tokens (max_model_len); shorten it", param=param,
        )
