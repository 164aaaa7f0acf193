"""The trainer's client for policy_gen (either backend): rollouts and per-step adapter sync.

Prompts are chat message lists, formatted with `services.common.chat.format_prompt` and sent
to /v1/completions with `return_token_ids` and `logprobs`, so the token ids the learner
trains on are exactly the ones the policy saw and sampled -- the trainer never re-tokenizes.
Retries (tenacity, exponential backoff) cover connection errors and 503 only: a 4xx is a
bug in the request and retrying it would only hide that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from services.common.chat import format_prompt

Prompt = str | Sequence[Mapping[str, str]]  # templated text, or chat messages to template


@dataclass(frozen=True)
class SamplingParams:
    """PPO rollout sampling (thesis: top_k 0, top_p 1.0, <= 512 new tokens); all sent explicitly."""

    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # off
    seed: int | None = None  # request i of a call uses seed + i, so prompts draw distinct streams
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rollout:
    """One sampled completion, everything PPO needs from the generator."""

    prompt_index: int  # position of its prompt in the `generate` call
    sample_index: int  # 0..n-1 among that prompt's samples
    prompt_token_ids: list[int]  # (P,) what the policy was conditioned on
    response_token_ids: list[int]  # (R,) sampled tokens, EOS included when it stopped on EOS
    # (R,) log π(a_t | s_t) as the server sampled (post temperature/top-p). Not PPO's π_old, which
    # the learner recomputes in fp32; these only feed the logprob-gap check.
    response_logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length"
    model: str = ""  # the model name policy_gen reports having generated with: the adapter version


class AdapterTableFull(RuntimeError):
    """policy_gen holds `--max-loras` adapters already (other trainers' included): unload one or wait."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIConnectionError):  # includes timeouts
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code == 503


class PolicyClient:
    """Async client; one per trainer process. `model` is the name generation uses right now."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_attempts: int = 6,
        max_backoff_s: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.base_model = model
        self.model = model
        self.max_attempts = max_attempts
        self.max_backoff_s = max_backoff_s
        # Sent with every request (identity: run, step, adapter); the owner updates it per step.
        self.headers: dict[str, str] = dict(headers or {})
        self._api = openai.AsyncOpenAI(
            base_url=base_url.rstrip("/") + "/v1", api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=0
        )

    async def aclose(self) -> None:
        await self._api.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _retry(self, fn, *args, **kwargs):
        retrying = AsyncRetrying(
            retry=retry_if_exception(_retryable),
            wait=wait_exponential_jitter(initial=0.5, max=self.max_backoff_s),
            stop=stop_after_attempt(self.max_attempts),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await fn(*args, **kwargs)

    # ------------------------------------------------------------------ rollouts

    async def generate(
        self,
        prompts: Sequence[Prompt],
        n: int = 1,
        sampling: SamplingParams = SamplingParams(),
        model: str | None = None,
    ) -> list[Rollout]:
        """n completions per prompt, ordered by (prompt, sample). One request per prompt, all concurrent."""
        texts = [p if isinstance(p, str) else format_prompt(p) for p in prompts]
        model = model or self.model
        per_prompt = await asyncio.gather(*(self.complete(i, t, n, sampling, model) for i, t in enumerate(texts)))
        return [r for rollouts in per_prompt for r in rollouts]

    async def complete(self, index: int, text: str, n: int, sp: SamplingParams, model: str) -> list[Rollout]:
        """n completions of one templated prompt (`index`: its position in the caller's batch, the seed offset)."""
        resp = await self._retry(
            self._api.completions.create,
            model=model,
            prompt=text,
            n=n,
            max_tokens=sp.max_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            seed=None if sp.seed is None else sp.seed + index,
            stop=list(sp.stop) or None,
            logprobs=0,
            extra_body={"top_k": sp.top_k, "return_token_ids": True},
            extra_headers=self.headers,
        )
        out = []
        for j, choice in enumerate(sorted(resp.choices, key=lambda c: c.index)):
            extra = choice.model_extra or {}
            ids, prompt_ids = extra.get("token_ids"), extra.get("prompt_token_ids")
            if ids is None or prompt_ids is None or choice.logprobs is None:
                raise RuntimeError(
                    "policy_gen reply lacks token_ids/prompt_token_ids/logprobs: is it vLLM >= 0.10 or our hf backend?"
                )
            logprobs = [float(x) for x in choice.logprobs.token_logprobs]
            if len(logprobs) != len(ids):
                raise RuntimeError(f"policy_gen returned {len(ids)} token ids but {len(logprobs)} logprobs")
            out.append(Rollout(index, j, list(prompt_ids), list(ids), logprobs, choice.text, choice.finish_reason,
                               resp.model))
        return out

    # ------------------------------------------------------------------ adapters

    async def _post_text(self, path: str, body: dict) -> str:
        return await self._retry(self._api.post, path, body=body, cast_to=str, options={"headers": self.headers})

    async def load_adapter(self, path: str, name: str, *, inplace: bool = False) -> None:
        try:
            body = {"lora_name": name, "lora_path": str(path), "load_inplace": inplace}
            await self._post_text("/load_lora_adapter", body)
        except openai.BadRequestError as exc:
            # A retried load whose first try succeeded before the connection dropped.
            if "already been loaded" in str(exc):
                return
            if "max_loras" in str(exc):  # a 400, but one that another trainer's unload resolves
                raise AdapterTableFull(str(exc)) from exc
            raise

    async def unload_adapter(self, name: str) -> bool:
        """True if it was unloaded, False if the server did not hold it (e.g. after a restart)."""
        try:
            await self._post_text("/unload_lora_adapter", {"lora_name": name})
            return True
        except openai.NotFoundError:
            return False

    async def models(self) -> list[str]:
        page = await self._retry(self._api.models.list, extra_headers=self.headers)
        return [m.id for m in page.data]

    async def max_model_len(self) -> int | None:
        """The server's context (prompt + completion tokens) as /v1/models lists it on the base
        model's card (policy_gen and vLLM both do; adapter cards leave it out); None if unlisted."""
        page = await self._retry(self._api.models.list, extra_headers=self.headers)
        lengths = [n for m in page.data if isinstance(n := getattr(m, "max_model_len", None), int)]
        return min(lengths) if lengths else None
