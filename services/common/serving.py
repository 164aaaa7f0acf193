"""uvicorn as every service runs it: one place for the connection limits uvicorn lacks.

uvicorn times out an idle keep-alive connection, but not a request head that arrives a byte
at a time: 300 clients sending one header byte every 10 s held 300 connections open for as
long as they liked. `head_timeout_s` closes a connection whose request head (request line and
headers) is not complete that long after the connection opened or its last response ended.
"""

from __future__ import annotations

import asyncio
from typing import Any

HEAD_TIMEOUT_FIELD = "head_timeout_s"


def _with_head_timeout(base: type[asyncio.Protocol], head_timeout_s: float) -> type[asyncio.Protocol]:
    """`base` (uvicorn's h11 or httptools protocol) plus a deadline on each request head.

    Both protocols make `self.cycle` when a head is complete, so the timer only has to see
    whether a new cycle began since it was armed: no parser hooks needed.
    """

    class HeadTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            old = getattr(self, "_head_timer", None)
            if old is not None:
                old.cancel()
            cycle = self.cycle
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out, cycle)

        def _head_timed_out(self, armed_cycle) -> None:
            waiting = self.cycle is armed_cycle and (armed_cycle is None or armed_cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.close()  # no head, nobody to answer: just close (as nginx's client_header_timeout)

    HeadTimeoutProtocol.__name__ = f"HeadTimeout{base.__name__}"
    return HeadTimeoutProtocol


def uvicorn_config(app: Any, settings: Any, **overrides: Any):
    """uvicorn.Config for `app` from a service's settings (host, port, log level, head timeout)."""
    import uvicorn

    kwargs: dict[str, Any] = dict(host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    kwargs.update(overrides)
    config = uvicorn.Config(app, **kwargs)
    config.load()  # resolves 'auto' to the http protocol class in use, which we then wrap
    config.http_protocol_class = _with_head_timeout(config.http_protocol_class, getattr(settings, HEAD_TIMEOUT_FIELD))
    return config
