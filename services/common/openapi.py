"""The OpenAPI document says what the services really send.

FastAPI documents a 422 `HTTPValidationError` on every route with a body; our services
answer 400 with the shared error body instead, plus 401/404/408/413/503 that FastAPI cannot
know about. `error_responses` declares the real ones per route; `install_openapi` drops the
422s and their schemas and, when a key is required, declares the bearer scheme (and the
query-string key where it is accepted) so generated clients and fuzzers authenticate.
"""

from __future__ import annotations

from typing import Iterable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.common.protocol import ErrorResponse

_WHY = {
    400: "Invalid request: malformed JSON, wrong types, a value out of range.",
    401: "Missing or wrong API key.",
    404: "Unknown model or resource.",
    408: "The request body did not arrive in time (body_read_timeout_s).",
    413: "Request body or work over a configured limit.",
    503: "Overloaded or still loading; retry after Retry-After seconds.",
}
BODY_ERRORS = (400, 408, 413)  # any route that reads a body can answer these
TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}


def error_responses(*statuses: int) -> dict[int, dict]:
    return {s: {"model": ErrorResponse, "description": _WHY.get(s, "Error.")} for s in statuses}


def install_openapi(
    app: FastAPI, *, secured: bool, exempt: Iterable[str] = ("/health", "/ready"), query_key_paths: Iterable[str] = ()
) -> None:
    exempt, query_key_paths = frozenset(exempt), frozenset(query_key_paths)

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        err = {"$ref": "#/components/schemas/ErrorResponse"}
        for path, operations in schema.get("paths", {}).items():
            for op in operations.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                for status, response in responses.items():
                    if status[0] in "45":  # errors are JSON even where success is text/plain
                        response["content"] = {"application/json": {"schema": err}}
                if not secured or path in exempt:
                    op["security"] = []
                    continue
                op["security"] = [{"bearer": []}] + ([{"api_key_query": []}] if path in query_key_paths else [])
                responses.setdefault("401", {"description": _WHY[401], "content": {"application/json": {"schema": err}}})
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        schemas.setdefault("ErrorResponse", ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}"))
        for name, sub in ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas["ErrorResponse"].pop("$defs", None)
        if secured:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            if query_key_paths:
                components["securitySchemes"]["api_key_query"] = {"type": "apiKey", "in": "query", "name": "api_key"}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
