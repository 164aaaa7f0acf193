"""Prometheus metrics for a reward service, on a per-app registry.

A registry per app (not prometheus_client's global one) lets tests and benchmarks build many
apps in one process without "Duplicated timeseries" errors. Requests are counted by a pure
ASGI middleware, so 401s and 413s answered by the outer middleware are counted too.
Per-run counters (`RunMetrics`) tell an operator which trainer loads a shared server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.http import DISCONNECTED, is_authenticated
from services.common.identity import request_identity

if TYPE_CHECKING:  # the reward core's type; common/ must not import reward/ at run time
    from services.reward.batcher import BatchStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_FILL_BUCKETS = (0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


OTHER_RUN = "other"  # the label of runs beyond the tracked ones, and of missing/invalid run ids
UNCOUNTED_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes belong to no run


class RunMetrics:
    """Requests, items and tokens per run (the `X-CRS-Run` header), on a given registry.

    Label cardinality is bounded: the first `max_tracked_runs` distinct valid run ids get a
    label of their own, every later one (and any missing or invalid id) is "other". A server
    that lives for months among many sweeps must not grow a time series per run forever.
    """

    def __init__(self, registry: CollectorRegistry, max_tracked_runs: int = 32):
        self.requests = Counter("crs_run_requests", "HTTP requests by the run that sent them", ["run"], registry=registry)
        self.items = Counter(
            "crs_run_items", "Items scored, or sequences generated (prompts x n), by run", ["run"], registry=registry
        )
        self.tokens = Counter(
            "crs_run_tokens", "Tokens scored, or prompt + completion tokens, by run", ["run"], registry=registry
        )
        self.queue_wait = Histogram(
            "crs_run_queue_wait_seconds", "How long a request waited in the queue before its work started, by run",
            ["run"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.max_tracked_runs = max_tracked_runs
        self._tracked: set[str] = set()
        self._lock = threading.Lock()  # usage may be counted from worker threads too
        self._registry = registry

    def observe_wait(self, run: str, seconds: float) -> None:
        """A request of `run` ('' = none) waited `seconds` before its work started. Only requests that
        passed the key check reach a queue, so the run may claim a label."""
        self.queue_wait.labels(self.label(run or None)).observe(seconds)

    def watch_queues(self, queued_by_run: Callable[[], dict[str, int]]) -> None:
        """Export `queued_by_run()` (run id -> items or sequences waiting) as crs_run_queue_items,
        read at scrape time and summed into the bounded label set."""
        runs = self

        class _Collector:
            def collect(self):
                family = GaugeMetricFamily(
                    "crs_run_queue_items", "Items (reward) or sequences (policy_gen) waiting to start, by run", labels=["run"]
                )
                totals: dict[str, float] = {}
                for run, n in queued_by_run().items():
                    label = runs.label(run or None)  # queued work passed the key check
                    totals[label] = totals.get(label, 0) + n
                for label, n in sorted(totals.items()):
                    family.add_metric([label], n)
                yield family

        self._registry.register(_Collector())

    def label(self, run: str | None, *, claim: bool = True) -> str:
        """`run`'s label: itself when tracked (or newly tracked, if `claim` and a slot is free), else "other"."""
        if run is None:
            return OTHER_RUN
        with self._lock:
            if run in self._tracked:
                return run
            if claim and len(self._tracked) < self.max_tracked_runs:
                self._tracked.add(run)
                return run
        return OTHER_RUN


# The current request's (run counters, run id), set by MetricsMiddleware. Routes that know a
# request's usage call `count_run_usage` instead of threading the run through every layer;
# asyncio tasks and `asyncio.to_thread` copy it, so it follows the request wherever it runs.
_CURRENT_RUN: ContextVar[tuple[RunMetrics, str | None] | None] = ContextVar("crs_current_run", default=None)


def current_run() -> str | None:
    """The run id (X-CRS-Run) of the request being served, None without one: the key of the
    per-run queues that keep shared servers fair."""
    current = _CURRENT_RUN.get()
    return current[1] if current is not None else None


def count_run_usage(items: int, tokens: int) -> None:
    """Add a finished request's work to its run's counters (no-op outside a served request)."""
    current = _CURRENT_RUN.get()
    if current is None:
        return
    runs, run = current
    label = runs.label(run)
    runs.items.labels(label).inc(items)
    runs.tokens.labels(label).inc(tokens)


class RewardMetrics:
    def __init__(self, known_paths: frozenset[str], max_tracked_runs: int = 32):
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
            "crs_batch_tokens", "Tokens computed per forward pass, padding included: rows x longest row, "
            "or a packed row's length", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.forward_seconds = Histogram(
            "crs_forward_seconds", "Model forward time per pass", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tokens_scored = Counter("crs_tokens_scored", "Real (unpadded) tokens scored", registry=r)
        self.items_scored = Counter("crs_items_scored", "Items scored", registry=r)
        self.padding_tokens = Counter("crs_padding_tokens", "Pad tokens fed to the model", registry=r)
        self.batch_fill = Histogram(
            "crs_batch_fill", "Real / computed tokens per forward pass (1 = no padding)", buckets=_FILL_BUCKETS, registry=r
        )
        self.runs = RunMetrics(r, max_tracked_runs)

    def observe_batch(self, stats: BatchStats) -> None:
        """Called from the worker thread; prometheus_client metrics are thread-safe."""
        self.batch_rows.observe(stats.rows)
        self.batch_tokens.observe(stats.padded_tokens)
        self.forward_seconds.observe(stats.seconds)
        self.tokens_scored.inc(stats.tokens)
        self.items_scored.inc(stats.rows)
        self.padding_tokens.inc(stats.padded_tokens - stats.tokens)
        self.batch_fill.observe(stats.fill)

    def endpoint(self, path: str) -> str:
        return path if path in self.known_paths else "other"

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts every HTTP response by endpoint and status and times it.

    `requests` is a Counter labelled (endpoint, status), `latency` a Histogram labelled
    (endpoint); `endpoint(path)` maps a path to a bounded label set. A client that went away
    before the whole reply was sent (a stream left after its headers too) is counted as "499",
    not as a server error nor as a 200 nobody received. With `runs` (default:
    `metrics.runs`) it also counts requests by run and makes the run current for
    `count_run_usage`; only a request that passed the key check may claim a run label (no key,
    no say in the label set: a keyless 401 or 500 is counted under an existing label or 'other').
    """

    def __init__(self, app: ASGIApp, metrics=None, *, requests=None, latency=None, endpoint=None, runs=None):
        self.app = app
        self.requests = requests if requests is not None else metrics.requests
        self.latency = latency if latency is not None else metrics.latency
        self.endpoint = endpoint if endpoint is not None else metrics.endpoint
        self.runs: RunMetrics | None = runs if runs is not None else getattr(metrics, "runs", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self.endpoint(scope["path"])
        start = time.perf_counter()
        status = None
        run = request_identity(scope).run
        current = _CURRENT_RUN.set((self.runs, run)) if self.runs is not None else None

        completed = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, completed
            if message["type"] == "http.response.start":
                status = str(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            gone = scope.get("state", {}).get("disconnected")
            if status is None:
                status = DISCONNECTED if gone else "500"
            elif gone and not completed:  # a stream left after its headers: nobody got the reply
                status = DISCONNECTED
            self.requests.labels(endpoint, status).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - start)
            if current is not None:
                _CURRENT_RUN.reset(current)
                if scope["path"] not in UNCOUNTED_PATHS:
                    self.runs.requests.labels(self.runs.label(run, claim=is_authenticated(scope))).inc()
