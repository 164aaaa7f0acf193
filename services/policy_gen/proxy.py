"""The vllm backend: forward validated requests to the vLLM server policy_gen started.

policy_gen stays the front door (auth, validation, adapter-path confinement, metrics) and
vLLM does the generating. Bodies come back exactly as vLLM wrote them, status included, so
clients see vLLM's own replies and errors. vLLM unreachable -> 503 with Retry-After (the
trainer's client retries on it). vLLM's chat endpoint parses special-token strings inside
message contents as the real tokens and has no switch to stop it, so chat messages that hold
such strings are refused here (400) instead of forging turns; the hf backend keeps them as text.
Generation requests pass a fair admission gate first (admission.py): vLLM schedules first come
first served, so the front door keeps one run from holding all of vLLM's sequence slots.
"""

from __future__ import annotations

import asyncio
import json

import httpx
from starlette.responses import Response

from services.common.http import APIError
from services.common.metrics import RunMetrics, current_run
from services.policy_gen import protocol as P
from services.policy_gen.admission import FairAdmission
from services.policy_gen.adapters import AdapterInfo
from services.policy_gen.backend import Served
from services.common.tokenize import ThreadTokenizer
from services.policy_gen.limits import prompt_count, too_long_for_context
from services.policy_gen.settings import PolicyGenSettings
from services.policy_gen.streaming import ClosingStreamingResponse
from services.policy_gen.vllm_launcher import max_num_seqs


class VLLMProxyBackend:
    def __init__(self, settings: PolicyGenSettings, upstream_url: str):
        self.settings = settings
        self.model_id = settings.model_id
        self.upstream_url = upstream_url
        self.client: httpx.AsyncClient | None = None
        self.tok: ThreadTokenizer | None = None
        self._ready = False
        self.on_generated = lambda tokens: None  # completion tokens of a streamed reply, when it ends
        # None with --fair-scheduling false: requests go straight to vLLM's own FIFO.
        self.gate = FairAdmission(max_num_seqs(settings), settings.max_run_sequences, settings.run_weight_map()) \
            if settings.fair_scheduling else None

    async def start(self) -> None:
        from transformers import AutoTokenizer

        # Only to know the special tokens and the longest token; vLLM does the real tokenizing.
        self.tok = ThreadTokenizer(await asyncio.to_thread(AutoTokenizer.from_pretrained, self.settings.model_path))
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        # vLLM was started with our API key (vllm_launcher), so forwarded calls carry it.
        headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.upstream_url, timeout=self.settings.vllm_request_timeout_s, limits=limits, headers=headers
        )

    async def stop(self) -> None:
        if self.client:
            await self.client.aclose()

    async def ready(self) -> bool:
        # Sticky once vLLM answered: /ready should not flap while vLLM is busy decoding.
        if not self._ready:
            try:
                self._ready = (await self.client.get("/health", timeout=2.0)).status_code == 200
            except httpx.HTTPError:
                return False
        return self._ready

    def observe_queues(self, runs: RunMetrics) -> None:
        """Per-run front-door queue depth and wait in /metrics (crs_run_queue_items, crs_run_queue_wait_seconds)."""
        if self.gate is not None:
            self.gate.on_wait = runs.observe_wait
            runs.watch_queues(self.gate.queued_by_run)

    async def _generate(self, path: str, body: dict, sequences: int, stream: bool) -> Served:
        """Forward one generation request once the gate admits it. Its `sequences` hold slots
        until the reply has arrived, or for a stream until the stream ends, however it ends."""
        run = current_run() or ""
        if self.gate is not None:
            await self.gate.acquire(run, sequences)  # a client gone meanwhile: out of the queue
        released = False

        def release() -> None:
            nonlocal released
            if self.gate is not None and not released:
                released = True
                self.gate.release(run, sequences)

        streaming = False
        try:
            if stream:
                served = await self._forward_stream(path, body, on_end=release)
                streaming = isinstance(served.response, ClosingStreamingResponse)  # else vLLM's error reply
                return served
            resp = await self._forward("POST", path, body)
            return Served(resp, *self._usage(resp))
        finally:
            if not streaming:
                release()

    async def _forward(self, method: str, path: str, body: dict | None = None) -> Response:
        try:
            upstream = await self.client.request(method, path, json=body)
        except httpx.TimeoutException:
            limit = self.settings.vllm_request_timeout_s
            raise APIError(504, f"vLLM did not answer {path} within {limit:.0f}s") from None
        except httpx.TransportError as exc:
            message = f"vLLM server is not reachable ({type(exc).__name__}); retry shortly"
            raise APIError(503, message, headers={"Retry-After": "2"}) from None
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
        return Response(content=upstream.content, status_code=upstream.status_code, headers=headers)

    async def _forward_stream(self, path: str, body: dict, on_end=lambda: None) -> Served:
        """A streamed request: vLLM's server-sent events passed through as they come. An error
        before the stream starts is vLLM's JSON reply, as for any request. When the client hangs
        up, the upstream connection is closed, and vLLM aborts the request (its own disconnect
        handling). vLLM is always asked for the usage chunk, so the generated-tokens counter sees
        every streamed reply; a client that did not ask for it does not get it. `on_end()` runs
        once the stream is over, however it ended."""
        options = body.get("stream_options") or {}
        asked = bool(options.get("include_usage"))
        if not asked:  # continuous_usage_stats counts only with include_usage, in vLLM too
            body = {**body, "stream_options": {**options, "include_usage": True, "continuous_usage_stats": False}}
        try:
            upstream = await self.client.send(self.client.build_request("POST", path, json=body), stream=True)
        except httpx.TimeoutException:
            raise APIError(504, f"vLLM did not answer {path} within {self.settings.vllm_request_timeout_s:.0f}s") from None
        except httpx.TransportError as exc:
            message = f"vLLM server is not reachable ({type(exc).__name__}); retry shortly"
            raise APIError(503, message, headers={"Retry-After": "2"}) from None
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
            return Served(Response(content=content, status_code=upstream.status_code, headers=headers))
        counted = {"completion": 0, "prompt": 0}

        async def relay():
            pending = b""  # bytes of an event not yet complete
            try:
                async for chunk in upstream.aiter_raw():
                    events, pending = _split_events(pending + chunk)
                    out = []
                    for event in events:
                        usage = _usage_event(event)
                        if usage is not None:
                            counted["completion"], counted["prompt"] = usage
                            if not asked:
                                continue
                        out.append(event)
                    if out:
                        yield b"".join(out)
                if pending:
                    yield pending
            finally:
                await upstream.aclose()
                self.on_generated(counted["completion"])

        headers = {"Cache-Control": "no-cache"}

        async def close() -> None:
            try:
                await upstream.aclose()
            finally:
                on_end()

        # vLLM generates from now: a client gone before relay() starts must close the upstream too.
        return Served(ClosingStreamingResponse(relay(), on_close=close, media_type="text/event-stream",
                                               headers=headers))

    @staticmethod
    def _usage(resp: Response) -> tuple[int, int]:
        """(completion_tokens, prompt_tokens) of vLLM's reply; zeros when it has none."""
        if resp.status_code != 200:
            return 0, 0
        try:
            usage = json.loads(resp.body).get("usage") or {}
            return int(usage.get("completion_tokens") or 0), int(usage.get("prompt_tokens") or 0)
        except (ValueError, AttributeError, TypeError):
            return 0, 0

    async def completions(self, req: P.CompletionRequest) -> Served:
        for text in [req.prompt] if isinstance(req.prompt, str) else req.prompt:
            if isinstance(text, str):
                too_long_for_context(self.settings, self.tok, text, "prompt")
        sequences = prompt_count(req.prompt) * req.n
        return await self._generate("/v1/completions", req.model_dump(exclude_unset=True), sequences, req.stream)

    async def chat(self, req: P.ChatCompletionRequest) -> Served:
        for i, m in enumerate(req.messages):
            too_long_for_context(self.settings, self.tok, m.content, f"messages.{i}.content")
            if self.tok.has_special(m.content):
                raise APIError(
                    400, f"messages.{i}.content holds special-token text (e.g. a chat marker); the vllm backend "
                    "would read it as a real token, so it is refused. Remove it, or use the hf backend, which "
                    "keeps it as plain text", param=f"messages.{i}.content",
                )
        return await self._generate("/v1/chat/completions", req.model_dump(exclude_unset=True), req.n, req.stream)

    async def load_adapter(self, req: P.LoadLoRAAdapterRequest, info: AdapterInfo) -> Served:
        # vLLM gets the path we checked (resolved), never the caller's spelling of it.
        body = {"lora_name": req.lora_name, "lora_path": str(info.path), "load_inplace": req.load_inplace}
        return Served(await self._forward("POST", "/v1/load_lora_adapter", body))

    async def unload_adapter(self, req: P.UnloadLoRAAdapterRequest) -> Served:
        return Served(await self._forward("POST", "/v1/unload_lora_adapter", req.model_dump(exclude_none=True)))

    async def models(self) -> Served:
        resp = await self._forward("GET", "/v1/models")
        if resp.status_code != 200:
            return Served(resp)
        # vLLM's `root` is the base model's folder or the adapter's path: names only, as the hf backend.
        listing = P.ModelList.model_validate_json(resp.body)
        for card in listing.data:
            card.root = card.id
        return Served(Response(listing.model_dump_json(), media_type="application/json"))


def _split_events(data: bytes) -> tuple[list[bytes], bytes]:
    """Server-sent events: (the complete events, each with its blank line, and the rest). Pure.

    >>> _split_events(b'data: {"a": 1}\\n\\ndata: [DO')
    ([b'data: {"a": 1}\\n\\n'], b'data: [DO')
    """
    parts = data.split(b"\n\n")
    return [p + b"\n\n" for p in parts[:-1]], parts[-1]


def _usage_event(event: bytes) -> tuple[int, int] | None:
    """(completion_tokens, prompt_tokens) if `event` is the stream's usage chunk (no choices, a
    usage object: what include_usage adds before [DONE]), else None. Pure.

    >>> _usage_event(b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}\\n\\n')
    (5, 3)
    >>> _usage_event(b'data: {"choices": [{"text": "usage"}], "usage": null}\\n\\n') is None
    True
    """
    if not event.startswith(b"data: {") or b'"usage"' not in event:
        return None
    try:
        chunk = json.loads(event[6:])
        usage = chunk.get("usage")
        if chunk.get("choices") or not isinstance(usage, dict):
            return None
        return int(usage.get("completion_tokens") or 0), int(usage.get("prompt_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return None
