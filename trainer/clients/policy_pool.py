"""Several policy_gen replicas behind one `generate()`: least outstanding requests, health-aware.

A rollout worker's requests go to the replica with the fewest requests in flight (ties
rotate, so an idle pool alternates). Like the reward client's replicas:
- a connection error, timeout or 503 marks the replica unhealthy for `unhealthy_cooldown_s`
  and the request is retried at once on another one (with backoff only when every replica is
  cooling down), up to `retry_max_s` (the trainer passes what is left of the step's deadline) / `retry_max_attempts`;
- a 404 for the model means the replica does not hold the adapter (it restarted since the
  driver's sync): it leaves this pool for good, and the driver syncs it at the next step.
So the pool never generates with another model than the one asked for. `use_replicas_with`
applies the same rule up front: a rollout starts on the replicas that list its model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import openai
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential

from services.common.chat import format_prompt
from trainer.clients.policy import PolicyClient, Prompt, Rollout, SamplingParams, _retryable


class NoReplicaAvailable(RuntimeError):
    """No replica of the pool can serve the model (all left it, or retries ran out)."""


class _Transient(Exception):
    """One replica failed in a way another replica (or a later try) may not."""


@dataclass
class Replica:
    url: str
    client: PolicyClient
    outstanding: int = 0  # requests in flight
    unhealthy_until: float = 0.0  # time.monotonic() before which it is skipped


class PolicyPool:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retry_max_s: float = 300.0,
        retry_max_attempts: int = 50,
        unhealthy_cooldown_s: float = 5.0,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 5.0,
        headers: Mapping[str, str] | None = None,
        probe_timeout_s: float = 10.0,
    ):
        if not urls:
            raise ValueError("policy_gen: at least one replica URL is needed (services.policy_urls)")
        self.model = model  # what generate() asks for when given no model
        # max_attempts 1: the pool retries, on another replica when there is one.
        self.replicas = [Replica(u.rstrip("/"), PolicyClient(u, model=model, api_key=api_key, timeout_s=timeout_s,
                                                              max_attempts=1, headers=headers)) for u in urls]
        self.retry_max_s, self.retry_max_attempts = retry_max_s, retry_max_attempts
        self.cooldown, self.probe_timeout_s = unhealthy_cooldown_s, probe_timeout_s
        self._backoff = wait_exponential(multiplier=backoff_initial_s, max=backoff_max_s)
        self._next = 0
        self.left: dict[str, str] = {}  # url -> why it left the pool
        self.failures = 0  # transient failures seen (for metrics)

    async def aclose(self) -> None:
        for r in self.replicas:
            await r.client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    @property
    def in_pool(self) -> list[Replica]:
        return [r for r in self.replicas if r.url not in self.left]

    def pick(self) -> Replica:
        """The healthy replica with the fewest requests in flight (ties: rotating start); if all
        are cooling down, the one that recovers first."""
        live = self.in_pool
        if not live:
            raise NoReplicaAvailable(self._why_none())
        now = time.monotonic()
        start = self._next % len(live)
        self._next += 1
        rotated = live[start:] + live[:start]
        healthy = [r for r in rotated if r.unhealthy_until <= now]
        if not healthy:
            return min(rotated, key=lambda r: r.unhealthy_until)
        return min(healthy, key=lambda r: r.outstanding)  # min() keeps the first of equals: the rotation

    def _why_none(self) -> str:
        reasons = "; ".join(f"{u}: {why}" for u, why in self.left.items())
        return f"no policy_gen replica can serve this rollout ({reasons}); check services.policy_urls"

    def _leave(self, replica: Replica, why: str) -> None:
        self.left.setdefault(replica.url, why)

    async def use_replicas_with(self, model: str) -> list[str]:
        """Keep only the replicas whose /v1/models lists `model` (asked concurrently); returns
        the URLs that left. Raises NoReplicaAvailable when none is left."""
        async def probe(r: Replica) -> str | None:
            try:
                held = await asyncio.wait_for(r.client.models(), self.probe_timeout_s)
            except (TimeoutError, openai.APIError) as e:
                return f"/v1/models failed ({type(e).__name__})"
            return None if model in held else f"does not hold {model}"

        live = self.in_pool
        whys = await asyncio.gather(*(probe(r) for r in live))
        for r, why in zip(live, whys):
            if why is not None:
                self._leave(r, why)
        if not self.in_pool:
            raise NoReplicaAvailable(self._why_none())
        return [r.url for r, why in zip(live, whys) if why is not None]

    async def models(self) -> list[str]:
        """/v1/models of the first replica that answers."""
        errors = []
        for r in self.in_pool:
            try:
                return await asyncio.wait_for(r.client.models(), self.probe_timeout_s)
            except (TimeoutError, openai.APIError) as e:
                errors.append(f"{r.url}: {type(e).__name__}")
        raise NoReplicaAvailable(f"no policy_gen replica answered /v1/models ({'; '.join(errors)})")

    # ------------------------------------------------------------------ generation

    async def generate(self, prompts: Sequence[Prompt], n: int = 1, sampling: SamplingParams | None = None,
                       model: str | None = None) -> list[Rollout]:
        """n completions per prompt, ordered by (prompt, sample); each prompt's request may go to another replica."""
        sampling, model = sampling or SamplingParams(), model or self.model
        texts = [p if isinstance(p, str) else format_prompt(p) for p in prompts]
        per_prompt = await asyncio.gather(*(self._complete(i, t, n, sampling, model) for i, t in enumerate(texts)))
        return [r for rollouts in per_prompt for r in rollouts]

    def _wait(self, retry_state) -> float:
        # Straight to another replica when one is healthy; back off only when all are cooling.
        now = time.monotonic()
        if any(r.unhealthy_until <= now for r in self.in_pool):
            return 0.0
        return self._backoff(retry_state)

    async def _complete(self, index: int, text: str, n: int, sp: SamplingParams, model: str) -> list[Rollout]:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Transient), wait=self._wait,
            stop=stop_after_delay(self.retry_max_s) | stop_after_attempt(self.retry_max_attempts), reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._try_once(index, text, n, sp, model)
        except _Transient as e:
            raise NoReplicaAvailable(f"policy_gen: giving up after retries: {e}") from None
        raise AssertionError("unreachable")

    async def _try_once(self, index: int, text: str, n: int, sp: SamplingParams, model: str) -> list[Rollout]:
        r = self.pick()
        r.outstanding += 1
        try:
            out = await r.client.complete(index, text, n, sp, model)
        except openai.NotFoundError as e:  # the replica lost the adapter (a restart): never fall back to another model
            self._leave(r, f"answered 404 for {model}")
            raise _Transient(f"{r.url}: {e.message}") from None
        except openai.APIError as e:
            if not _retryable(e):
                raise
            self.failures += 1
            r.unhealthy_until = time.monotonic() + self.cooldown
            raise _Transient(f"{r.url}: {type(e).__name__}: {e}") from None
        finally:
            r.outstanding -= 1
        r.unhealthy_until = 0.0
        return out


__all__ = ["NoReplicaAvailable", "PolicyPool", "Replica"]
