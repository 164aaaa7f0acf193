"""The async reward client against a real reward service process (the session's shared reward_pref,
conftest.py: these tests only score with it) and a real flaky proxy."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from services.common.process import free_port
from trainer.clients.reward import RewardClient, RewardServiceError, messages_item

CONV = [{"role": "user", "content": "How do I bake bread?"}]


class FlakyProxy:
    """A real HTTP server that answers 503 + Retry-After `fail` times, then forwards."""

    def __init__(self, upstream: str, fail: int, status: int = 503):
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        self.calls, self.fail, self.upstream = 0, fail, upstream

        async def score(request):
            self.calls += 1
            if self.calls <= self.fail:
                body = {"error": {"message": "overloaded", "type": "ServiceUnavailableError", "code": status}}
                return JSONResponse(body, status_code=status, headers={"Retry-After": "0.2"})
            async with httpx.AsyncClient() as c:
                r = await c.post(self.upstream + "/v1/score", content=await request.body(),
                                 headers={"content-type": "application/json"})
            return Response(r.content, status_code=r.status_code, media_type="application/json")

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/v1/score", score, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(5)


def test_scores_match_the_service_and_keep_order(reward_pref_url):
    items = [messages_item(CONV, r) for r in ("Mix flour and water.", "No.", "")]

    async def go():
        async with RewardClient([reward_pref_url]) as client:
            return await client.score(items)

    got = asyncio.run(go())
    direct = httpx.post(reward_pref_url + "/v1/score", json={"items": [i.model_dump() for i in items]}).json()
    assert got.scores == direct["scores"] and len(got.scores) == 3
    assert got.probabilities is None


def test_empty_reply_is_scored_as_empty_not_as_a_space(reward_pref_url):
    """A policy that ends its turn at once is judged on the empty reply itself."""
    assert messages_item(CONV, "").messages[-1].content == ""

    async def go():
        async with RewardClient([reward_pref_url]) as client:
            return await client.score([messages_item(CONV, ""), messages_item(CONV, " ")])

    empty, space = asyncio.run(go()).scores
    pair = httpx.post(reward_pref_url + "/v1/score",
                      json={"items": [{"prompt": CONV[0]["content"], "response": ""}]}).json()
    assert pair["scores"][0] == pytest.approx(empty, abs=1e-6)  # both forms template the same empty reply
    assert empty != space  # the old " " placeholder scored a different text


def test_dead_replica_is_skipped_round_robin(reward_pref_url):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    async def go():
        async with RewardClient([dead, reward_pref_url], unhealthy_cooldown_s=60, backoff_initial_s=0.01) as client:
            urls = [(await client.score([messages_item(CONV, "hi")])).url for _ in range(4)]
            return urls, client.failures

    urls, failures = asyncio.run(go())
    assert urls == [reward_pref_url] * 4
    assert failures == 1  # tried once, then skipped while cooling down


def test_bad_request_raises_at_once_and_dead_service_raises_after_retries(reward_pref_url):
    async def bad():
        async with RewardClient([reward_pref_url]) as client:
            await client.score([messages_item(CONV, "hi")], model="no-such-model")

    with pytest.raises(RewardServiceError, match="rejected"):
        asyncio.run(bad())

    async def dead():
        async with RewardClient([f"http://127.0.0.1:{free_port()}"], retry_max_s=1.0, backoff_initial_s=0.05) as client:
            await client.score([messages_item(CONV, "hi")])

    t0 = time.monotonic()
    with pytest.raises(RewardServiceError, match="giving up"):
        asyncio.run(dead())
    assert time.monotonic() - t0 < 10


def test_503_retry_after_is_honoured(reward_pref_url):
    with FlakyProxy(reward_pref_url, fail=2) as proxy:
        async def go():
            async with RewardClient([proxy.url], unhealthy_cooldown_s=0) as client:
                return await client.score([messages_item(CONV, "hi")])

        t0 = time.monotonic()
        got = asyncio.run(go())
        assert proxy.calls == 3 and len(got.scores) == 1
        assert time.monotonic() - t0 >= 0.4  # waited Retry-After twice
