"""The HTTP edge shared by the services: one error envelope, the body-size limit, API keys, CORS,
Prometheus metrics, the OpenAPI explorers."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram, make_asgi_app
from pydantic import BaseModel, SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.docs import install_offline_docs
from services.common.errors import CbirError, EmbedderUnavailableError, IndexNotReadyError, OverloadedError

logger = logging.getLogger(__name__)

REQUESTS = Counter("cbir_http_requests_total", "HTTP requests answered", ["service", "method", "route", "status"])
LATENCY = Histogram("cbir_http_request_seconds", "HTTP request latency", ["service", "method", "route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


class ErrorResponse(BaseModel):
    """Every error this service returns: `{"detail": "what was wrong"}`."""

    detail: str


class NotReadyResponse(ErrorResponse):
    """A 503: `detail` says why; `status` is `indexing` (with `indexed` of `total` images so far),
    `empty` or `failed`."""

    status: str | None = None
    indexed: int | None = None
    total: int | None = None


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(ErrorResponse):
    """A 422: `detail` sums up every problem in one line; `errors` lists them one by one."""

    errors: list[FieldError]


ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Empty or unusable upload"),
        (401, "Missing or wrong API key"),
        (409, "The index was built by another model; re-index"),
        (413, "Upload or image too large"),
        (415, "Not a supported image"),
    )
} | {
    422: {"model": ValidationErrorResponse, "description": "Missing or invalid field or parameter"},
    503: {"model": NotReadyResponse, "description": "Model, embedder or index not ready (see Retry-After)"},
}
ERROR_RESPONSES[503]["headers"] = {
    "Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CbirError)
    async def _cbir_error(request: Request, exc: CbirError) -> JSONResponse:
        headers = {}
        if isinstance(exc, EmbedderUnavailableError | OverloadedError):
            headers["Retry-After"] = str(exc.retry_after)
        elif exc.status_code == 503:
            headers["Retry-After"] = "5"
        if exc.status_code >= 500 and not isinstance(exc, OverloadedError):  # refusals: cbir_admission_refused_total
            logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
        return JSONResponse(error_body(exc), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 carries a list in `detail` (and echoes the input); keep the one envelope.
        errors = [_field_error(error) for error in exc.errors()]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or "invalid request"
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


def error_body(exc: CbirError) -> dict[str, Any]:
    """The JSON body of a domain error: `detail`, and for a not-ready index its status and progress."""
    if isinstance(exc, IndexNotReadyError):
        return {"detail": exc.message, "status": exc.status, **exc.progress}
    return {"detail": exc.message}


def _field_error(error: dict[str, Any]) -> dict[str, Any]:
    return {"loc": [part if isinstance(part, int) else str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "invalid")), "type": str(error.get("type", "value_error"))}


# An answer that goes out before the request body has all arrived (the 413 below, or the app's own: the form
# parser's 400 mid-body, a 404, a 422 on a body that is no form) is followed by the rest of the body, read and
# dropped, before the connection closes (nginx's lingering close): a client that reads the answer only once it
# has sent everything (urllib.request) would otherwise find its unread bytes turning the close into a
# connection reset, and never see the answer.
DISCARD_MAX_BYTES = 64 * 2**20  # past this much of an unread body the connection is closed unread ...
DISCARD_MAX_S = 5.0  # ... and past this long, however little has come
_CLOSE = (b"connection", b"close")


class BodySizeLimitMiddleware:
    """The request body's edge: answers 413 as soon as a body passes `max_bytes` (or its path's own limit in
    `route_limits`), before it is read into memory, and makes any answer sent before the body has all
    arrived readable by every client.

    A declared Content-Length is checked up front; a chunked body is counted while it streams. Whatever
    answers before the body's end (the 413, or the app itself: the multipart parser's 400 mid-body, a 404)
    goes out at once with `Connection: close`; then whatever the client is still sending is read and dropped
    (never kept) up to `discard_bytes` or `discard_s`, the answer ends, and the connection closes. A client
    that declared more than that, or that waits for `100 Continue` (and so sends nothing), is closed at once.
    An answer to a body that has all arrived is left as it is (and its connection kept alive).

        app.add_middleware(BodySizeLimitMiddleware, max_bytes=10 * 2**20)
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, route_limits: Mapping[str, int] | None = None,
                 discard_bytes: int = DISCARD_MAX_BYTES, discard_s: float = DISCARD_MAX_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.route_limits = dict(route_limits or {})
        self.discard_bytes = discard_bytes
        self.discard_s = discard_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _RequestBody(scope, limit=self.route_limits.get(scope["path"], self.max_bytes))
        if body.declared is not None and body.declared > body.limit:
            await self._refuse(receive, send, body)
            return
        started = early = end_held = False

        async def counted_receive() -> Message:
            message = await receive()
            body.count(message)  # raises _BodyTooLarge past the limit
            return message

        async def early_aware_send(message: Message) -> None:
            nonlocal started, early, end_held
            if body.exceeded:  # whatever the app answers to the cut body is replaced by the 413
                return
            if message["type"] == "http.response.start":
                started, early = True, not body.ended
                if early:
                    message = {**message, "headers": _with_close(message.get("headers", []))}
            elif (early and message["type"] == "http.response.body" and not message.get("more_body", False)
                  and body.worth_discarding(self.discard_bytes)):
                end_held = True  # the answer is on the wire; only its end waits for the rest of the body
                if not message.get("body"):
                    return
                message = {**message, "more_body": True}
            await send(message)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counted_receive, early_aware_send)
        if body.exceeded and not started:
            await self._refuse(receive, send, body)
        elif end_held:
            await self._finish(receive, send, body)
        # else the app's answer ended as it was sent (or, cut past the limit mid-answer, never will: the
        # server closes the connection)

    async def _refuse(self, receive: Receive, send: Send, body: _RequestBody) -> None:
        """The 413, then the rest of the body dropped (bounded), then the close."""
        detail = json.dumps({"detail": f"the request body exceeds {body.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), _CLOSE,
                                (b"content-length", str(len(detail)).encode())]})
        discard = body.worth_discarding(self.discard_bytes)
        await send({"type": "http.response.body", "body": detail, "more_body": discard})
        if discard:
            await self._finish(receive, send, body)

    async def _finish(self, receive: Receive, send: Send, body: _RequestBody) -> None:
        """Ends an answer sent before the body's end: first the rest of the body is read and dropped, as far as
        the bounds allow, since the server closes the connection as soon as the answer is complete."""
        if body.worth_discarding(self.discard_bytes):
            discarded = 0
            with anyio.move_on_after(self.discard_s):
                while discarded <= self.discard_bytes:
                    message = await receive()
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        body.ended = True  # the body ended, or the client went away
                        break
                    discarded += len(message.get("body", b""))
            if not body.ended:
                logger.info("closing a connection answered early after discarding %d bytes of its body", discarded)
        await send({"type": "http.response.body", "body": b""})


class _RequestBody:
    """What has come of one request's body: its declared length, the bytes received, whether it ended."""

    def __init__(self, scope: Scope, *, limit: int) -> None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        self.limit = limit
        self.declared = int(length) if length.isdigit() else None
        # Without Content-Length or Transfer-Encoding an HTTP/1.1 request has no body (RFC 9112, 6.3).
        self.ended = b"transfer-encoding" not in headers and not self.declared
        self.received = 0
        self.reads = 0
        self.exceeded = False
        # A client that sent `Expect: 100-continue` sends its body only once the server asks for it by reading.
        self.held_back = headers.get(b"expect", b"").lower() == b"100-continue"

    def count(self, message: Message) -> None:
        self.reads += 1
        if message["type"] != "http.request":
            self.ended = True  # the client went away
            return
        self.received += len(message.get("body", b""))
        self.ended = not message.get("more_body", False)
        if self.received > self.limit:
            self.exceeded = True
            raise _BodyTooLarge

    def worth_discarding(self, max_bytes: int) -> bool:
        """Whether what is left of the body may be read and dropped within `max_bytes`."""
        if self.ended or (self.held_back and self.reads == 0):  # no `100 Continue` went out: no body coming
            return False
        return self.declared is None or self.declared - self.received <= max_bytes


class _BodyTooLarge(Exception):
    pass


def _with_close(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [*(header for header in headers if header[0].lower() != b"connection"), _CLOSE]


def api_key_valid(provided: str | None, accepted: Sequence[SecretStr]) -> bool:
    """True when no keys are configured, or `provided` matches one (in constant time)."""
    if not accepted:
        return True
    if not provided:
        return False
    return any(secrets.compare_digest(provided.encode(), key.get_secret_value().encode()) for key in accepted)


async def verify_api_key(request: Request) -> None:
    """Dependency guarding search and embed routes when `CBIR_API_KEYS` is set."""
    if not api_key_valid(request.headers.get("x-api-key"), request.app.state.settings.api_keys):
        raise HTTPException(401, "missing or invalid X-API-Key header", headers={"WWW-Authenticate": "ApiKey"})


def install_cors(app: FastAPI, origins: Sequence[str]) -> None:
    """CORS stays closed unless origins are configured."""
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["X-API-Key", "Content-Type"])


def install_http_edge(app: FastAPI, *, service: str, max_upload_bytes: int, cors_origins: Sequence[str],
                      route_limits: Mapping[str, int] | None = None) -> None:
    """Everything between the network and a service's routes, in the right order.

    From the outside in: the request id, its log line and its metrics (so every answer has them, refusals
    included), CORS (so refusals carry its headers too), the body-size limit (`route_limits`: paths with a
    limit of their own), then FastAPI with the one error envelope. `GET /metrics` serves Prometheus metrics, behind
    the API keys when `CBIR_API_KEYS` is set (`app.state.settings.api_keys`, as every guarded route); `/docs` and
    `/redoc` load their scripts from the service itself, never a CDN.
    """
    install_error_handlers(app)
    install_offline_docs(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_upload_bytes, route_limits=route_limits)
    install_cors(app, cors_origins)
    app.add_middleware(RequestLogMiddleware, service=service)
    app.mount("/metrics", _guarded_metrics_app())


def _guarded_metrics_app() -> ASGIApp:
    """Prometheus's exposition app, asking for an API key as the other routes do: its routes, traffic and model
    version are nobody else's business either."""
    exposition = make_asgi_app()

    async def metrics(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await verify_api_key(Request(scope))  # its 401 goes through the app's error handlers
        await exposition(scope, receive, send)

    return metrics


REQUEST_ID_HEADER = "x-request-id"
# An incoming id is kept when it is short and plainly printable (a proxy's or a client's trace id); anything
# else is replaced, so a log line can never be forged or bloated through it.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,64}")
access_logger = logging.getLogger("cbir.access")


class RequestLogMiddleware:
    """Gives every request an id, returns it as `X-Request-ID`, logs one JSON line per request on the
    `cbir.access` logger (`{"request_id", "service", "method", "path", "route", "status", "ms", "client"}`),
    and counts and times it per route template (never per raw path: ids would explode the metrics)."""

    def __init__(self, app: ASGIApp, *, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds, method = time.perf_counter() - started, scope["method"]
            route = getattr(scope.get("route"), "path", None)
            REQUESTS.labels(self.service, method, route or "unmatched", str(status)).inc()
            LATENCY.labels(self.service, method, route or "unmatched").observe(seconds)
            client = scope.get("client")
            access_logger.info("%s", json.dumps({
                "request_id": request_id, "service": self.service, "method": method, "path": scope["path"][:200],
                "route": route, "status": status, "ms": round(seconds * 1000, 2),
                "client": client[0] if client else None,
            }))
