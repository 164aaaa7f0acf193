"""HTTP plumbing every service shares: one error shape, API-key auth, a body-size cap.

The error shape is vLLM's / OpenAI's ``{"error": {"message", "type", "code", "param"}}`` so
one client handles failures from policy_gen (either backend) and both reward services.
Auth and the size cap are pure ASGI middleware: they answer before FastAPI parses a byte.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    409: "ConflictError",
    413: "RequestTooLarge",
    422: "BadRequestError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raise anywhere in a route or engine to answer with the shared error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "Error")
        self.param = param
        self.headers = headers


def error_body(status: int, message: str, type: str | None = None, param: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=type or _TYPES.get(status, "Error"), code=status, param=param)
    return ErrorResponse(error=info).model_dump()


def error_response(
    status: int, message: str, *, type: str | None = None, param: str | None = None, headers=None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, type, param), status_code=status, headers=headers)


_UNION_TAGS = frozenset({"pair", "messages"})


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """Turn pydantic's error list into one readable sentence and the first bad field."""
    parts, first_param = [], None
    for err in exc.errors()[:5]:
        loc, prev = [], None
        for part in err.get("loc", ()):
            # Tagged unions put the branch tag right after the list index; noise for the user.
            if not (part == "body" or (isinstance(prev, int) and part in _UNION_TAGS)):
                loc.append(str(part))
            prev = part
        where = ".".join(loc) or "body"
        first_param = first_param or where
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        parts.append(f"{where}: {err.get('msg')}")
    more = len(exc.errors()) - 5
    if more > 0:
        parts.append(f"... and {more} more")
    return "invalid request: " + "; ".join(parts), first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _describe_validation(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()):
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` on every path but the probes.

    Compared with `hmac.compare_digest` so response timing leaks nothing about the key.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, exempt: Iterable[str] = ("/health", "/ready")):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            await _send_json(
                send,
                401,
                error_body(401, "missing or invalid API key: send 'Authorization: Bearer <key>'"),
                [(b"www-authenticate", b"Bearer")],
            )
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Answers 413 for bodies over `max_bytes`, by Content-Length or while streaming.

    Counting the stream too matters: a chunked upload has no Content-Length to check.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_body(413, f"request body exceeds the limit of {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, too_large)
            return

        # Buffer the body (bounded by the cap) and replay it: raising from inside `receive`
        # would be swallowed by FastAPI's body parsing and turned into a generic 400.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                await _send_json(send, 413, too_large)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def add_common_middleware(app: FastAPI, *, api_key: str | None, max_body_bytes: int) -> None:
    """Order matters: auth runs first (outermost), so unauthenticated bodies are never read."""
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=api_key)
