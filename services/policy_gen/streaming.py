"""A streamed reply that releases its work however it ends.

A stream's work starts before its first byte is sent (the hf engine's job is queued, or the
upstream vLLM request is open), and its body generator's `finally` releases it. But a client
that hangs up between the response headers and the body's first chunk cancels the response
before the generator has started, and a generator that never started never runs its `finally`:
the sequences would decode to max_tokens for nobody (hf), or vLLM would keep generating on an
upstream connection nobody reads (proxy). `ClosingStreamingResponse` runs `on_close` after the
response however it ended, shielded from the cancellation that ended it.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStreamingResponse(StreamingResponse):
    """`StreamingResponse` plus `on_close()` (sync or async, idempotent), called once it has ended."""

    def __init__(self, content, *, on_close: Callable[[], Awaitable[None] | None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                done = self.on_close()
                if inspect.isawaitable(done):
                    await done
