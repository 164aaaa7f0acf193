"""Prometheus metrics for a reward service, on a per-app registry.

A registry per app (not prometheus_client's global one) lets tests and benchmarks build many
apps in one process without "Duplicated timeseries" errors. Requests are counted by a pure
ASGI middleware, so 401s and 413s answered by the outer middleware are counted too.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from typing import TYPE_CHECKING

from services.common.http import DISCONNECTED

if TYPE_CHECKING:  # the reward core's type; common/ must not import reward/ at run time
    from services.reward.batcher import BatchStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class RewardMetrics:
    def __init__(self, known_paths: frozenset[str]):
        self.registry = CollectorRegistry()
        self.known_paths = known_paths  # any other path is labelled "other": bounded cardinality
        r = self.registry
        self.requests = Counter("crs_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "crs_request_latency_seconds", "HTTP request latency", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("crs_queue_items", "Items waiting for the model worker", registry=r)
        self.batch_rows = Histogram("crs_batch_items", "Items per forward pass", buckets=_ROW_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "crs_batch_tokens", "Padded tokens (rows x longest) per forward pass", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.forward_seconds = Histogram(
            "crs_forward_seconds", "Model forward time per pass", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tokens_scored = Counter("crs_tokens_scored", "Real (unpadded) tokens scored", registry=r)
        self.items_scored = Counter("crs_items_scored", "Items scored", registry=r)
        self.padding_tokens = Counter("crs_padding_tokens", "Pad tokens fed to the model", registry=r)

    def observe_batch(self, stats: BatchStats) -> None:
        """Called from the worker thread; prometheus_client metrics are thread-safe."""
        self.batch_rows.observe(stats.rows)
        self.batch_tokens.observe(stats.padded_tokens)
        self.forward_seconds.observe(stats.seconds)
        self.tokens_scored.inc(stats.tokens)
        self.items_scored.inc(stats.rows)
        self.padding_tokens.inc(stats.padded_tokens - stats.tokens)

    def endpoint(self, path: str) -> str:
        return path if path in self.known_paths else "other"

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts every HTTP response by endpoint and status and times it.

    `requests` is a Counter labelled (endpoint, status), `latency` a Histogram labelled
    (endpoint); `endpoint(path)` maps a path to a bounded label set. A client that went away
    before any reply is counted as "499", not as a server error.
    """

    def __init__(self, app: ASGIApp, metrics=None, *, requests=None, latency=None, endpoint=None):
        self.app = app
        self.requests = requests if requests is not None else metrics.requests
        self.latency = latency if latency is not None else metrics.latency
        self.endpoint = endpoint if endpoint is not None else metrics.endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self.endpoint(scope["path"])
        start = time.perf_counter()
        status = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if status is None:
                status = DISCONNECTED if scope.get("state", {}).get("disconnected") else "500"
            self.requests.labels(endpoint, status).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - start)
