"""The annotation page's FastAPI app: static page + a small JSON API, routes kept thin.

The page shell (/, /app.js, /app.css) and /api/config carry no data and stay open, so the
page can show its login form; with an API key every other /api route needs
`Authorization: Bearer <key>`, which the page sends once the annotator has typed it in.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse

from services.common.http import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    HeadAsGetMiddleware,
    RequestContextMiddleware,
    install_error_handlers,
)
from services.common.openapi import BODY_ERRORS, error_responses, install_openapi
from services.common.protocol import Text
from evaluation.human.engine import AnnotationEngine
from evaluation.human.protocol import ConfigResponse, ItemResponse, SessionResponse, SubmitRequest, SubmitResponse

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/", "/app.js", "/app.css", "/health", "/ready", "/api/config")
# No inline script, no remote anything: even a response that slipped into the DOM as HTML
# could not run a script or load an image from elsewhere.
CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'"


def build_app(
    engine: AnnotationEngine,
    *,
    title: str = "Rank the responses",
    api_key: str | None = None,
    max_body_bytes: int = 1024 * 1024,
    body_read_timeout_s: float | None = None,
) -> FastAPI:
    missing = [n for n in ("index.html", "app.js", "app.css") if not (STATIC / n).is_file()]
    if missing:  # a wheel built without the package data; fail at start, not on the first page view
        raise RuntimeError(
            f"the annotation page's files are missing from {STATIC} ({', '.join(missing)}); "
            "reinstall crs-rlhf from a source tree (pip install -e .) or add evaluation/human/static to package data"
        )
    app = FastAPI(title="crs-rlhf annotation", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    def static(name: str, media_type: str):
        def handler() -> FileResponse:
            return FileResponse(
                STATIC / name,
                media_type=media_type,
                headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"},
            )

        return handler

    app.get("/", include_in_schema=False)(static("index.html", "text/html"))
    app.get("/app.js", include_in_schema=False)(static("app.js", "text/javascript"))
    app.get("/app.css", include_in_schema=False)(static("app.css", "text/css"))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict:
        return {"status": "ready", "prompts": len(engine.prompt_ids)}

    @app.get("/api/config", response_model=ConfigResponse)
    def config() -> ConfigResponse:
        return ConfigResponse(
            title=title,
            auth_required=api_key is not None,
            groups=engine.groups,
            k=engine.k,
            total=len(engine.prompt_ids),
        )

    @app.get("/api/session", response_model=SessionResponse, responses=error_responses(400, 404))
    def session(annotator: Text = Query(...), group: Text = Query(...)) -> SessionResponse:
        return engine.session(annotator, group)

    @app.get("/api/items/{index}", response_model=ItemResponse, responses=error_responses(400, 404))
    def item(index: int, annotator: Text = Query(...), group: Text = Query(...)) -> ItemResponse:
        return engine.item(annotator, group, index)

    @app.post("/api/annotations", response_model=SubmitResponse, responses=error_responses(*BODY_ERRORS, 404))
    def submit(req: SubmitRequest) -> SubmitResponse:
        return engine.submit(req)

    # Auth outermost so an unauthenticated body is never read.
    slow_body = {"read_timeout_s": body_read_timeout_s} if body_read_timeout_s else {}
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes, **slow_body)
    app.add_middleware(ApiKeyMiddleware, api_key=api_key, exempt=OPEN_PATHS)
    app.add_middleware(HeadAsGetMiddleware)
    # As the services: a request id on every reply, and a JSON 500 that keeps the connection.
    app.add_middleware(RequestContextMiddleware)
    install_openapi(app, secured=api_key is not None, exempt=OPEN_PATHS)  # the 400/401 it sends, no 422
    return app
