"""The policy_gen router: one thin FastAPI app in front of either backend.

Everything that must not depend on the backend lives here: auth, body limits and request ids
(services.common.http), request validation (protocol.py), per-request work limits,
adapter-path confinement (adapters.py), probes and Prometheus metrics. The backend only
generates and holds adapters.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.common.http import OffLoopJSONRoute, add_common_middleware, add_request_context, error_response
from services.common.metrics import MetricsMiddleware, RunMetrics, count_run_usage
from services.common.openapi import BODY_ERRORS, TEXT, error_responses, install_openapi
from services.policy_gen import protocol as P
from services.policy_gen.adapters import inspect_adapter
from services.policy_gen.backend import Backend, Served
from services.policy_gen.limits import check_work, prompt_count
from services.policy_gen.settings import PolicyGenSettings

# Unset max_tokens: 16 for completions (vLLM's default); chat fills the context.
COMPLETION_DEFAULT_MAX_TOKENS = 16
# With "stream": true the reply is server-sent events (the JSON chunks, then `data: [DONE]`).
SSE = {"content": {"text/event-stream": {"schema": {}}}}  # events: JSON chunks, then [DONE]
KNOWN_PATHS = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/models",
})  # fmt: skip


class Metrics:
    """Per-app registry, so several apps in one process (tests) never collide."""

    def __init__(self, backend: str, max_tracked_runs: int = 32):
        self.registry = CollectorRegistry()
        self.runs = RunMetrics(self.registry, max_tracked_runs)  # crs_run_*: load by trainer run
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

    @staticmethod
    def endpoint(path: str) -> str:
        return path if path in KNOWN_PATHS else "other"


def create_app(settings: PolicyGenSettings, backend: Backend) -> FastAPI:
    metrics = Metrics(settings.backend, settings.max_tracked_runs)
    if hasattr(backend, "observe_batches"):  # only the hf backend batches itself
        backend.observe_batches(lambda sequences, _seconds: metrics.batch_sequences.observe(sequences))
    if hasattr(backend, "observe_queues"):  # hf: its batcher's queues; vllm: the front door's (admission.py)
        backend.observe_queues(metrics.runs)
    backend.on_generated = metrics.tokens.inc  # streamed replies count their tokens when they end

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(title="crs-rlhf policy_gen", lifespan=lifespan)
    app.state.settings, app.state.backend, app.state.metrics = settings, backend, metrics
    app.router.route_class = OffLoopJSONRoute  # large bodies parsed and validated off the event loop

    def _count(served: Served, sequences: int = 0) -> Response:
        metrics.tokens.inc(served.completion_tokens)
        if sequences and served.response.status_code == 200:  # per run: prompts x n, prompt + completion tokens
            count_run_usage(sequences, served.prompt_tokens + served.completion_tokens)
        return served.response

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", responses=error_responses(503))
    async def ready():
        if await backend.ready():
            return {"status": "ready", "backend": settings.backend, "model": backend.model_id}
        return error_response(503, f"{settings.backend} backend is still starting", headers={"Retry-After": "2"})

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: TEXT})
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=P.ModelList, responses=error_responses(503))
    async def models():
        return _count(await backend.models())

    @app.post("/v1/completions", response_model=P.CompletionResponse,
              responses={200: SSE, **error_responses(*BODY_ERRORS, 404, 503)})
    async def completions(req: P.CompletionRequest):
        max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
        check_work(settings, prompt_count(req.prompt), req.n, max_tokens)
        return _count(await backend.completions(req), prompt_count(req.prompt) * req.n)

    @app.post(
        "/v1/chat/completions", response_model=P.ChatCompletionResponse,
        responses={200: SSE, **error_responses(*BODY_ERRORS, 404, 503)},
    )
    async def chat(req: P.ChatCompletionRequest):
        check_work(settings, 1, req.n, req.max_completion_tokens or req.max_tokens or settings.default_max_tokens)
        return _count(await backend.chat(req), req.n)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
              responses={200: TEXT, **error_responses(*BODY_ERRORS, 404, 503)})
    async def load_lora_adapter(req: P.LoadLoRAAdapterRequest):
        info = inspect_adapter(settings.adapter_root, req.lora_path, settings.max_lora_rank)
        served = await backend.load_adapter(req, info)
        if served.response.status_code == 200:
            metrics.adapter_loads.inc()
        return served.response

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
              responses={200: TEXT, **error_responses(*BODY_ERRORS, 404, 503)})
    async def unload_lora_adapter(req: P.UnloadLoRAAdapterRequest):
        return (await backend.unload_adapter(req)).response

    @app.get("/")
    async def root():
        return JSONResponse({"service": "policy_gen", "backend": settings.backend, "model": backend.model_id})

    add_common_middleware(
        app, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
        body_read_timeout_s=settings.body_read_timeout_s,
    )
    add_request_context(app)  # request ids; unexpected errors -> JSON 500, connection kept
    app.add_middleware(
        MetricsMiddleware, requests=metrics.requests, latency=metrics.latency, endpoint=metrics.endpoint, runs=metrics.runs
    )
    install_openapi(app, secured=settings.api_key is not None)
    return app
