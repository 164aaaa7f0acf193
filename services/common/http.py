"""HTTP plumbing every service shares: one error shape, request ids, API-key auth, body limits.

The error shape is vLLM's / OpenAI's ``{"error": {"message", "type", "code", "param"}}`` so
one client handles failures from policy_gen (either backend) and both reward services.
Everything here is pure ASGI middleware: it answers before FastAPI parses a byte, and an
unexpected exception becomes a JSON 500 *without* re-raising (Starlette's own handler
re-raises, and uvicorn then drops the keep-alive connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.identity import request_identity
from services.common.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)
# One DEBUG line per request with its run: per-request lines at INFO would cost real time at
# thousands of requests/s (the per-run counters in /metrics are the always-on view).
access_log = logging.getLogger("services.access")

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    409: "ConflictError",
    413: "RequestTooLarge",
    422: "BadRequestError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
REQUEST_ID_HEADER = "X-Request-ID"
DISCONNECTED = "499"  # nginx's label for "client closed the request": not a server error
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Absolute POSIX paths inside messages (exception texts quote files): never shown to clients.
_ABS_PATH = re.compile(r"(?<![\w.:/>-])/(?:[^\s'\"/]+/)*[^\s'\"]*")


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


def scrub_paths(message: str, replacements: dict[str, str] | None = None) -> str:
    """`message` fit for a client: known folders become their names (e.g. '<adapter-root>'),
    any other absolute path '<path>'. Server paths tell an attacker the layout, a user nothing."""
    for path, name in sorted((replacements or {}).items(), key=lambda kv: -len(kv[0])):
        if path:
            message = message.replace(path, name)
    return _ABS_PATH.sub("<path>", message)


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
    """APIError, validation and HTTP errors in the shared shape. Anything else is left to
    `RequestContextMiddleware` (a handler for `Exception` here would make Starlette re-raise)."""

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


class RequestContextMiddleware:
    """Outermost: a request id on every response (`X-Request-ID`), and a JSON 500 for any
    exception that escaped the app, its details logged under that id, the connection kept.

    A client-supplied id is kept when it is short and plain, so traces join across services.
    `scope["state"]["disconnected"]` tells the metrics layer that the client went away.
    Log lines name the sending run, step and adapter (the X-CRS-* identity headers).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        who = request_identity(scope).log_fields()
        started, status, t0 = False, 0, time.perf_counter()

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                state["disconnected"] = True
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
            if access_log.isEnabledFor(logging.DEBUG):
                access_log.debug("request %s %s %s %s %.1fms %s", request_id, scope.get("method"), scope.get("path"),
                                 status, 1000 * (time.perf_counter() - t0), who)
        except Exception as exc:
            if state.get("disconnected"):
                log.info("request %s: client disconnected (%s) %s", request_id, type(exc).__name__, who)
                return
            log.exception("request %s %s %s failed %s", request_id, scope.get("method"), scope.get("path"), who)
            if not started:
                message = f"internal server error (request id {request_id}); the details are in the server log"
                await send_wrapper(_json_start(500))
                await send({"type": "http.response.body", "body": json.dumps(error_body(500, message)).encode()})


def _json_start(status: int) -> Message:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` on every path but the probes.

    Paths in `query_key_paths` also take the key as ``?api_key=<key>``: OpenRLHF's remote
    reward client sends no headers, so /get_reward could not authenticate otherwise. The
    parameter is removed from the scope once checked, so access logs never print it.
    Compared with `hmac.compare_digest` so response timing leaks nothing about the key.
    """

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        exempt: Iterable[str] = ("/health", "/ready"),
        query_key_paths: Iterable[str] = (),
    ):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.expected = b"Bearer " + self.key if self.key else None
        self.exempt = frozenset(exempt)
        self.query_key_paths = frozenset(query_key_paths)

    def _query_key_ok(self, scope: Scope) -> bool:
        if scope["path"] not in self.query_key_paths or b"api_key" not in scope.get("query_string", b""):
            return False
        pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        given = [v for k, v in pairs if k == "api_key"]
        # parse_qsl decodes %-escapes as UTF-8 (%E2%82%AC is one char past latin-1, %FF a lone
        # surrogate-escape): encode back the same way, so any spelling is a plain mismatch (401).
        ok = len(given) == 1 and hmac.compare_digest(given[0].encode("utf-8", "surrogatepass"), self.key)
        scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != "api_key"]).encode()
        return ok

    def _header_key_ok(self, scope: Scope) -> bool:
        """`Authorization: Bearer <key>`, the scheme case-insensitive (RFC 7235 section 2.1)."""
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(b" "), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keyless = bool(scope.get("state", {}).get("keyless"))  # an operator's named route and network (keyless.py)
        if self.expected is None or scope["type"] != "http" or scope["path"] in self.exempt or keyless:
            if scope["type"] == "http" and (self.expected is None or keyless):
                authenticate(scope)  # no key set, or let in by the operator: as good as a keyed request
            await self.app(scope, receive, send)
            return
        if not (self._header_key_ok(scope) or self._query_key_ok(scope)):
            hint = " (or '?api_key=<key>' on this path)" if scope["path"] in self.query_key_paths else ""
            await _send_json(
                send,
                401,
                error_body(401, f"missing or invalid API key: send 'Authorization: Bearer <key>'{hint}"),
                [(b"www-authenticate", b"Bearer")],
            )
            return
        authenticate(scope)
        await self.app(scope, receive, send)


def authenticate(scope: Scope) -> None:
    """Mark a request as having passed the key check: only such requests may claim a per-run
    metrics label (a keyless client must not fill the bounded label set)."""
    scope.setdefault("state", {})["authenticated"] = True


def is_authenticated(scope: Scope) -> bool:
    return bool(scope.get("state", {}).get("authenticated"))


class HeadAsGetMiddleware:
    """HEAD answered as GET without the body (RFC 9110 section 9.3.2): load balancers and
    uptime checkers probe /health with HEAD, and FastAPI routes only list GET."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def no_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, no_body)


class BodySizeLimitMiddleware:
    """Answers 413 for bodies over `max_bytes` (by Content-Length or while streaming) and 408
    when the whole body has not arrived within `read_timeout_s` of the headers.

    Counting the stream matters: a chunked upload has no Content-Length to check. The read
    deadline is for the whole body, not per chunk, so a client dribbling a byte a second
    cannot hold a connection (and its buffer) open forever.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_body(413, f"request body exceeds the limit of {self.max_bytes} bytes (max_body_bytes)")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, too_large)
            return

        # Buffer the body (bounded by the cap) and replay it: raising from inside `receive`
        # would be swallowed by FastAPI's body parsing and turned into a generic 400.
        chunks, seen = [], 0
        deadline = time.monotonic() + self.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                message = f"request body not received within {self.read_timeout_s:g}s (body_read_timeout_s)"
                await _send_json(send, 408, error_body(408, message), [(b"connection", b"close")])
                return
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

        await run_until_disconnect(self.app, scope, replay, receive, send)


async def run_until_disconnect(app: ASGIApp, scope: Scope, replay: Receive, receive: Receive, send: Send) -> None:
    """Run `app` on a body already read; if the client hangs up first, cancel it.

    Once the body is in, the server's `receive()` only returns when the client disconnects (or
    the response is complete), so awaiting it beside the app tells a hang-up as it happens.
    Cancelling the app reaches whatever it awaits: a queued scoring or generation job takes its
    work out of the queue (services/reward/batcher.py, services/policy_gen/batcher.py), and the
    request is counted as 499, not 200 for work nobody receives.
    """
    state = scope.setdefault("state", {})
    completed = False

    async def send_wrapper(message: Message) -> None:
        nonlocal completed
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            completed = True
        await send(message)

    task = asyncio.ensure_future(app(scope, replay, send_wrapper))
    watcher = asyncio.ensure_future(receive())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done and not completed and watcher.result()["type"] == "http.disconnect":
            state["disconnected"] = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
    finally:
        watcher.cancel()
        if not task.done():  # we were cancelled ourselves (server shutdown): take the app with us
            task.cancel()
    await task


def add_common_middleware(
    app: FastAPI,
    *,
    api_key: str | None,
    max_body_bytes: int,
    body_read_timeout_s: float = 30.0,
    query_key_paths: Iterable[str] = (),
) -> None:
    """Order matters: auth runs before the body is read, so unauthenticated bodies never are.
    Call before adding a metrics middleware; `add_request_context` goes last (outermost)."""
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes, read_timeout_s=body_read_timeout_s)
    app.add_middleware(ApiKeyMiddleware, api_key=api_key, query_key_paths=tuple(query_key_paths))
    app.add_middleware(HeadAsGetMiddleware)


def add_request_context(app: FastAPI) -> None:
    app.add_middleware(RequestContextMiddleware)


class OffLoopJSONRoute(APIRoute):
    """A route whose large JSON bodies are parsed and validated in a thread, a few at a time.

    FastAPI parses and validates a body on the event loop: one 15 MB token-id body held the
    loop ~0.5 s, and 32 at once held /health for 8.5 s (and doubled the RSS). Bodies of at
    least OFF_LOOP_BYTES go to a worker thread (at most OFF_LOOP_PARSES at once, the rest wait
    their turn without blocking anything); FastAPI then receives the validated model, which
    pydantic passes through without validating it again. Invalid bodies get the same 400.
    Set `app.router.route_class = OffLoopJSONRoute` before declaring routes.
    """

    OFF_LOOP_BYTES = 64 * 1024
    OFF_LOOP_PARSES = 2

    def get_route_handler(self):
        handler = super().get_route_handler()
        annotation = self.body_field.field_info.annotation if self.body_field is not None else None
        adapter = TypeAdapter(annotation) if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if adapter is None:
            return handler
        slots: list[asyncio.Semaphore] = []  # made in the serving loop, on first use

        def parse(body: bytes):
            try:
                return adapter.validate_python(json.loads(body))
            except ValidationError as exc:
                raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None

        async def off_loop(request: Request):
            body = await request.body()
            kind = request.headers.get("content-type", "")
            if len(body) >= self.OFF_LOOP_BYTES and kind.split(";")[0].strip().endswith("json"):
                if not slots:
                    slots.append(asyncio.Semaphore(self.OFF_LOOP_PARSES))
                async with slots[0]:
                    try:
                        request._json = await asyncio.to_thread(parse, body)  # Request.json() returns it
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        pass  # FastAPI parses it again on the loop and answers its usual 400
            return await handler(request)

        return off_loop
