"""The policy_gen router: one thin FastAPI app in front of either backend.

Everything that must not depend on the backend lives here: auth and the body cap
(services.common.http), request validation (protocol.py), adapter-path confinement
(adapters.py), probes and Prometheus metrics. The backend only generates and holds adapters.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.common.http import add_common_middleware, error_response
from services.policy_gen import protocol as P
from services.policy_gen.adapters import inspect_adapter
from services.policy_gen.backend import Backend, Served
from services.policy_gen.settings import PolicyGenSettings


class Metrics:
    """Per-app registry, so several apps in one process (tests) never collide."""

    def __init__(self, backend: str):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "policy_gen_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "policy_gen_request_seconds", "Request latency", ["endpoint"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.tokens = Counter("policy_gen_generated_tokens", "Completion tokens generated", registry=self.registry)
        self.adapter_loads = Counter("policy_gen_adapter_loads", "Successful adapter loads", registry=self.registry)
        self.batch_sequences = Histogram(
            "policy_gen_batch_sequences", "Sequences decoded together (hf backend)", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        info = Gauge("policy_gen_backend_info", "Which backend serves", ["backend"], registry=self.registry)
        info.labels(backend=backend).set(1)


def create_app(settings: PolicyGenSettings, backend: Backend) -> FastAPI:
    metrics = Metrics(settings.backend)
    if hasattr(backend, "observe_batches"):  # only the hf backend batches itself
        backend.observe_batches(lambda sequences, _seconds: metrics.batch_sequences.observe(sequences))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(title="crs-rlhf policy_gen", lifespan=lifespan)
    app.state.settings, app.state.backend, app.state.metrics = settings, backend, metrics
    add_common_middleware(app, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path if request.url.path.startswith("/v1/") else "other"
        metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)
        return response

    def _count(served: Served) -> Response:
        metrics.tokens.inc(served.completion_tokens)
        return served.response

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if await backend.ready():
            return {"status": "ready", "backend": settings.backend, "model": backend.model_id}
        return error_response(503, f"{settings.backend} backend is still starting", headers={"Retry-After": "2"})

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return _count(await backend.models())

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest):
        return _count(await backend.completions(req))

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatCompletionRequest):
        return _count(await backend.chat(req))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: P.LoadLoRAAdapterRequest):
        info = inspect_adapter(settings.adapter_root, req.lora_path, settings.max_lora_rank)
        served = await backend.load_adapter(req, info)
        if served.response.status_code == 200:
            metrics.adapter_loads.inc()
        return served.response

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: P.UnloadLoRAAdapterRequest):
        return (await backend.unload_adapter(req)).response

    @app.get("/")
    async def root():
        return JSONResponse({"service": "policy_gen", "backend": settings.backend, "model": backend.model_id})

    return app
