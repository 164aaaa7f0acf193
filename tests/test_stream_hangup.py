"""A stream the client hangs up on after the response headers (issue 25): the work stops and the
request counts as 499, on the hf backend (its own engine) and behind the vLLM front door.

The client reads the status line and headers of a `stream: true` reply, then closes the
connection without reading the body: the generation must not run on to max_tokens for nobody,
and /metrics must not say 200 for a reply nobody received.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from _serving_support import ThreadServer, metric, until

BODY = {"prompt": "go on", "n": 8, "max_tokens": 400, "ignore_eos": True, "stream": True}


def _hang_up_after_the_headers(url: str, headers: dict | None = None) -> None:
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=BODY) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    # Leaving the block unread closed the connection: the client is gone.


def test_hf_stream_hung_up_after_the_headers_stops_and_counts_499(tiny_models):
    from services.policy_gen.app import create_app
    from services.policy_gen.hf_backend import HFBackend
    from services.policy_gen.settings import PolicyGenSettings

    settings = PolicyGenSettings(model_path=str(tiny_models["policy"]), max_model_len=512)
    backend = HFBackend(settings)
    with ThreadServer(create_app(settings, backend), settings) as srv:
        srv.wait_ready()
        _hang_up_after_the_headers(srv.url)
        # The engine drops the 8 sequences at its next step, far from 8 x 400 tokens, and idles.
        time.sleep(1.0)
        steps = backend.batcher.batches
        time.sleep(0.5)
        assert backend.batcher.batches == steps and backend.engine.running == 0 and not backend.engine.groups, \
            f"still decoding for a client that left: {steps} -> {backend.batcher.batches} steps"
        ok = 'policy_gen_requests_total{endpoint="/v1/completions",status="200"}'
        gone = 'policy_gen_requests_total{endpoint="/v1/completions",status="499"}'
        assert until(lambda: metric(srv.url, gone) == 1, timeout=5) and metric(srv.url, ok) == 0
        assert metric(srv.url, "policy_gen_generated_tokens_total") < 8 * 400


def test_hf_stream_cancelled_before_its_body_starts_cancels_its_job(tiny_models):
    """The narrowest window, made deterministic in process: the response is cancelled while its
    headers are being sent, before the body generator's first step. Its job was queued when the
    route ran; a plain StreamingResponse never ran the generator's `finally`, so the 8 sequences
    decoded to the end for nobody."""
    from services.policy_gen import protocol as P
    from services.policy_gen.hf_backend import HFBackend
    from services.policy_gen.settings import PolicyGenSettings

    settings = PolicyGenSettings(model_path=str(tiny_models["policy"]), max_model_len=512)
    backend = HFBackend(settings)

    async def main() -> tuple[int, int]:
        await backend.start()
        try:
            served = await backend.completions(P.CompletionRequest(**BODY))
            headers_sent = asyncio.Event()

            async def send(message) -> None:
                if message["type"] == "http.response.start":
                    headers_sent.set()
                    await asyncio.Event().wait()  # the connection dies here

            async def receive():
                await asyncio.Event().wait()

            scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/v1/completions",
                     "headers": []}
            task = asyncio.ensure_future(served.response(scope, receive, send))
            await headers_sent.wait()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(1.0)  # a few decode steps' time: a leaked job would still be decoding
            steps = backend.batcher.batches
            await asyncio.sleep(0.5)
            return steps, backend.batcher.batches
        finally:
            await backend.stop()

    before, after = asyncio.run(main())
    assert before == after and backend.engine.running == 0 and not backend.engine.groups, \
        f"still decoding for a client that left: {before} -> {after} steps"


def test_proxy_stream_hung_up_after_the_headers_closes_the_upstream_and_counts_499(tiny_models):
    """The vllm backend's front door (VLLMProxyBackend) in front of a real OpenAI-compatible
    upstream over HTTP -- an hf policy_gen here, so the upstream's own engine shows whether the
    hang-up reached it (vLLM aborts a request whose connection closes, as this upstream does)."""
    from services.policy_gen.app import create_app
    from services.policy_gen.hf_backend import HFBackend
    from services.policy_gen.proxy import VLLMProxyBackend
    from services.policy_gen.settings import PolicyGenSettings

    up_settings = PolicyGenSettings(model_path=str(tiny_models["policy"]), max_model_len=512)
    upstream = HFBackend(up_settings)
    with ThreadServer(create_app(up_settings, upstream), up_settings) as up:
        up.wait_ready()
        settings = PolicyGenSettings(model_path=str(tiny_models["policy"]), max_model_len=512, backend="vllm")
        with ThreadServer(create_app(settings, VLLMProxyBackend(settings, up.url)), settings) as srv:
            srv.wait_ready()
            _hang_up_after_the_headers(srv.url)
            time.sleep(1.0)
            steps = upstream.batcher.batches
            time.sleep(0.5)
            assert upstream.batcher.batches == steps and upstream.engine.running == 0, \
                f"the upstream still decodes for a client that left: {steps} -> {upstream.batcher.batches} steps"
            gone = 'policy_gen_requests_total{endpoint="/v1/completions",status="499"}'
            ok = 'policy_gen_requests_total{endpoint="/v1/completions",status="200"}'
            assert until(lambda: metric(srv.url, gone) == 1, timeout=5) and metric(srv.url, ok) == 0
            assert until(lambda: metric(up.url, gone) == 1, timeout=5)  # the upstream saw the hang-up too
