"""Async client of the reward services' `POST /v1/score` (contract: services.common.protocol).

One `RewardClient` per signal. It spreads requests over M replica URLs round-robin and
skips a URL that just failed for `unhealthy_cooldown_s` (health-aware), retries connection
errors, timeouts, 5xx and 503 (honouring `Retry-After`) with exponential backoff via
tenacity, and raises once retries are exhausted. It never turns a failure into a zero
reward: a made-up score would silently train the policy on noise. `headers` go with every
request: the trainer's run identity (services.common.identity.run_headers), so a shared
reward server can log and count its load by run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential

from services.common.protocol import ErrorResponse, MessagesItem, ScoreRequest, ScoreResponse


class RewardServiceError(RuntimeError):
    """Scoring failed for good: a 4xx (our request is wrong) or retries exhausted."""


class RewardRequestRefused(RewardServiceError):
    """A 4xx: the service refused the request itself, so sending it again cannot help."""


class _Retryable(Exception):
    """A transient failure of one URL; `retry_after` seconds from a 503's header if given."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RewardScores:
    """Scores for a batch of items, in request order."""

    scores: list[float]  # raw logit per item
    probabilities: list[float] | None  # sigmoid(logit), absolute RM only
    truncated: list[bool]
    url: str  # the replica that answered


def _error_message(resp: httpx.Response) -> str:
    try:
        return ErrorResponse.model_validate(resp.json()).error.message
    except ValueError:  # not JSON, or not the error shape (pydantic's ValidationError is a ValueError)
        return resp.text[:300]


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def messages_item(messages: Sequence[dict], response: str) -> MessagesItem:
    """A conversation (ending in the user turn) plus the policy's reply, as the service wants it.

    An empty reply (the policy emitted end-of-turn at once) is scored as it is: it is a real
    outcome the reward model should judge, not something to paper over with a placeholder.
    """
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return MessagesItem(messages=[*turns, {"role": "assistant", "content": response}])


class RewardClient:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retry_max_s: float = 300.0,
        retry_max_attempts: int = 50,
        unhealthy_cooldown_s: float = 5.0,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 5.0,
        name: str = "reward",
        headers: Mapping[str, str] | None = None,
    ):
        if not urls:
            raise ValueError(f"{name}: at least one reward service URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.name = name
        self.retry_max_s, self.retry_max_attempts = retry_max_s, retry_max_attempts
        self.cooldown = unhealthy_cooldown_s
        self._backoff = wait_exponential(multiplier=backoff_initial_s, max=backoff_max_s)
        self._next = 0
        self._unhealthy_until: dict[str, float] = {}
        self.failures = 0  # transient failures seen (for logs/metrics)
        sent = {**(headers or {}), **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self._http = httpx.AsyncClient(timeout=timeout_s, headers=sent)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def pick_url(self) -> str:
        """Next healthy URL round-robin; if all are cooling down, the one that recovers first."""
        now = time.monotonic()
        for _ in range(len(self.urls)):
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
            if self._unhealthy_until.get(url, 0.0) <= now:
                return url
        return min(self.urls, key=lambda u: self._unhealthy_until.get(u, 0.0))

    def _mark_unhealthy(self, url: str) -> None:
        self.failures += 1
        self._unhealthy_until[url] = time.monotonic() + self.cooldown

    def _wait(self, retry_state) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        return self._backoff(retry_state)

    async def _post_once(self, body: dict) -> RewardScores:
        url = self.pick_url()
        try:
            resp = await self._http.post(url + "/v1/score", json=body)
        except (httpx.TransportError, httpx.TimeoutException) as e:  # refused, reset, timeout
            self._mark_unhealthy(url)
            raise _Retryable(f"{self.name} {url}: {type(e).__name__}: {e}") from e
        if resp.status_code == 503 or resp.status_code >= 500:
            self._mark_unhealthy(url)
            raise _Retryable(f"{self.name} {url}: HTTP {resp.status_code}: {_error_message(resp)}", _retry_after(resp))
        if resp.status_code != 200:
            raise RewardRequestRefused(f"{self.name} {url} rejected the request (HTTP {resp.status_code}): {_error_message(resp)}")
        out = ScoreResponse.model_validate(resp.json())
        if len(out.scores) != len(body["items"]):
            raise RewardServiceError(f"{self.name} {url}: {len(out.scores)} scores for {len(body['items'])} items")
        self._unhealthy_until.pop(url, None)
        return RewardScores(scores=out.scores, probabilities=out.probabilities, truncated=out.truncated, url=url)

    async def score(self, items: Sequence[MessagesItem | dict], model: str | None = None) -> RewardScores:
        """Score items in order; retries transient failures, raises `RewardServiceError` when it gives up."""
        plain = [i.model_dump() if isinstance(i, MessagesItem) else i for i in items]
        body = ScoreRequest.model_validate({"model": model, "items": plain}).model_dump(exclude_none=True)
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retryable),
            wait=self._wait,
            stop=stop_after_delay(self.retry_max_s) | stop_after_attempt(self.retry_max_attempts),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._post_once(body)
        except _Retryable as e:
            raise RewardServiceError(f"{self.name}: giving up after retries: {e}") from e
        raise AssertionError("unreachable")
