"""The HTTP edge of `services/common/http.py`. The body's edge is driven as the server drives it: one ASGI
call, its `receive` and `send` recorded in order.

What an answer sent before the body has all arrived (the 413, or the app's own early error) must look like
on the wire: the answer first, with `Connection: close`, then the rest of the body read and dropped (so a
client that reads only after sending everything finds its answer, not a reset), then the end of the
response, which closes the connection; bounded in bytes and in time. An answer to a whole body is left alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from fastapi import FastAPI, HTTPException, Request

from services.common.http import BodySizeLimitMiddleware

pytestmark = pytest.mark.anyio

LIMIT = 64 * 1024
CHUNK = 16 * 1024


def upload_app(seen: list[int]) -> FastAPI:
    """An app whose `/upload` reads the whole body and says how long it was (`seen` gets each length it read),
    whose `/early` refuses before reading a byte, and whose `/midway` refuses after two chunks."""
    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        body = await request.body()
        seen.append(len(body))
        return {"bytes": len(body)}

    @app.post("/early")
    async def early() -> None:
        raise HTTPException(415, "not an image, by its first bytes")

    @app.post("/midway")
    async def midway(request: Request) -> None:
        read = 0
        async for chunk in request.stream():
            read += len(chunk)
            if read >= 2 * CHUNK:
                seen.append(read)
                raise HTTPException(400, "malformed, two chunks in")

    return app


class Exchange:
    """One request as the middleware meets it: `chunks` come in through `receive` (then, with
    `stall`, nothing more ever comes), and every `receive` and `send` is logged in order."""

    def __init__(self, chunks: Iterator[bytes], *, headers: dict[str, str] | None = None, stall: bool = False,
                 disconnect: bool = False, path: str = "/upload", method: str = "POST") -> None:
        self.scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
                      "query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http",
                      "server": ("test", 80), "client": ("client", 1234),
                      "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
        self.chunks, self.stall, self.disconnect = chunks, stall, disconnect
        self.next: bytes | None = next(chunks, None)
        if self.next is not None and "content-length" not in (headers or {}):  # framed as a server reads it
            self.scope["headers"].append((b"transfer-encoding", b"chunked"))
        self.log: list[tuple[str, object]] = []
        self.pulled = 0  # body bytes handed to the middleware
        self.status, self.headers, self.body = 0, {}, b""

    async def receive(self) -> dict:
        assert not self.log or self.log[-1] != ("send", "end"), "receive after the response ended"
        if self.next is None:
            if self.stall:
                await anyio.sleep_forever()
            assert self.disconnect, "receive after the body ended (would wait for the disconnect)"
            self.log.append(("receive", "disconnect"))
            return {"type": "http.disconnect"}
        chunk, self.next = self.next, next(self.chunks, None)
        self.pulled += len(chunk)
        more = self.next is not None or self.stall or self.disconnect
        self.log.append(("receive", len(chunk)))
        return {"type": "http.request", "body": chunk, "more_body": more}

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status, self.headers = message["status"], dict(message["headers"])
            self.log.append(("send", "start"))
        else:
            more = message.get("more_body", False)
            self.body += message.get("body", b"")
            self.log.append(("send", "body" if more else "end"))

    async def run(self, app: object) -> Exchange:
        with anyio.fail_after(5):
            await app(self.scope, self.receive, self.send)
        return self


def zeros(chunks: int, size: int = CHUNK) -> Iterator[bytes]:
    return (bytes(size) for _ in range(chunks))


def endless(size: int = CHUNK) -> Iterator[bytes]:
    while True:
        yield bytes(size)


def middleware(seen: list[int], *, max_bytes: int = LIMIT, **bounds: float) -> BodySizeLimitMiddleware:
    return BodySizeLimitMiddleware(upload_app(seen), max_bytes=max_bytes, **bounds)


def assert_refused(exchange: Exchange) -> None:
    assert exchange.status == 413
    assert exchange.headers[b"connection"] == b"close"
    assert exchange.headers[b"content-type"] == b"application/json"
    assert json.loads(exchange.body) == {"detail": f"the request body exceeds {LIMIT} bytes"}
    assert exchange.log[-1] == ("send", "end")  # complete: the server closes the connection now


async def test_body_under_the_limit_reaches_the_app_whole() -> None:
    seen: list[int] = []
    exchange = await Exchange(zeros(3)).run(middleware(seen))
    assert exchange.status == 200 and json.loads(exchange.body) == {"bytes": 3 * CHUNK}
    assert seen == [3 * CHUNK]


async def test_declared_oversized_body_is_answered_first_then_read_and_dropped() -> None:
    seen: list[int] = []
    exchange = await Exchange(zeros(40), headers={"content-length": str(40 * CHUNK)}).run(middleware(seen))
    assert_refused(exchange)
    assert seen == []  # the app never ran
    assert exchange.log[:2] == [("send", "start"), ("send", "body")]  # the 413 before any byte is read
    assert exchange.pulled == 40 * CHUNK  # then all of it, dropped, before the close


async def test_client_waiting_for_100_continue_is_answered_and_closed_without_reading() -> None:
    # Reading would make the server send `100 Continue` and invite the very body being refused.
    exchange = Exchange(zeros(40), headers={"content-length": str(40 * CHUNK), "expect": "100-Continue"})
    await exchange.run(middleware([]))
    assert_refused(exchange)
    assert exchange.log == [("send", "start"), ("send", "end")]


async def test_declared_body_past_the_discard_bound_is_closed_without_reading() -> None:
    exchange = Exchange(zeros(40), headers={"content-length": str(40 * CHUNK)})
    await exchange.run(middleware([], discard_bytes=20 * CHUNK))
    assert_refused(exchange)
    assert exchange.log == [("send", "start"), ("send", "end")]


async def test_streamed_body_is_cut_at_the_limit_answered_then_dropped() -> None:
    seen: list[int] = []
    exchange = await Exchange(zeros(40)).run(middleware(seen))
    assert_refused(exchange)
    assert seen == []  # the app was stopped while reading; its answer to the cut body never went out
    answered = exchange.log.index(("send", "start"))
    read_first = sum(n for event, n in exchange.log[:answered] if event == "receive")
    assert LIMIT < read_first <= LIMIT + CHUNK  # refused on the chunk that passed the limit
    assert exchange.log[answered + 1] == ("send", "body")
    assert exchange.pulled == 40 * CHUNK


async def test_streamed_body_that_ends_past_the_limit_is_not_waited_for() -> None:
    exchange = await Exchange(zeros(1, 2 * LIMIT)).run(middleware([]))  # one message, more_body False
    assert_refused(exchange)
    assert exchange.log == [("receive", 2 * LIMIT), ("send", "start"), ("send", "end")]


async def test_discarding_stops_at_its_byte_bound() -> None:
    exchange = await Exchange(endless()).run(middleware([], discard_bytes=20 * CHUNK))
    assert_refused(exchange)
    assert exchange.pulled <= (LIMIT + CHUNK) + (20 * CHUNK + CHUNK)  # up to the refusal, then the bound


async def test_discarding_stops_at_its_time_bound() -> None:
    exchange = Exchange(zeros(2), headers={"content-length": str(40 * CHUNK)}, stall=True)
    started = time.monotonic()
    await exchange.run(middleware([], discard_s=0.2))
    assert 0.15 < time.monotonic() - started < 2
    assert_refused(exchange)
    assert exchange.pulled == 2 * CHUNK


async def test_discarding_stops_when_the_client_goes_away() -> None:
    exchange = await Exchange(zeros(6), disconnect=True).run(middleware([]))
    assert_refused(exchange)
    assert exchange.log[-2:] == [("receive", "disconnect"), ("send", "end")]


# -- any answer before the body's end: sent at once, then the rest of the body dropped --------------


def assert_answered_early(exchange: Exchange, status: int, detail: str) -> None:
    assert (exchange.status, json.loads(exchange.body)) == (status, {"detail": detail})
    assert exchange.headers[b"connection"] == b"close"  # the body was not all read: no next request on it
    assert exchange.log[-1] == ("send", "end")


BIG = 64 * CHUNK  # a limit no body here reaches: what answers early is the app
EARLY = {"/early": (415, "not an image, by its first bytes"), "/midway": (400, "malformed, two chunks in")}


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "chunked"])
@pytest.mark.parametrize("path", sorted(EARLY))
async def test_an_early_answer_goes_out_at_once_then_the_rest_is_read_and_dropped(path: str, declared: bool) -> None:
    seen: list[int] = []
    headers = {"content-length": str(40 * CHUNK)} if declared else {}
    exchange = await Exchange(zeros(40), headers=headers, path=path).run(middleware(seen, max_bytes=BIG))
    assert_answered_early(exchange, *EARLY[path])
    answered = exchange.log.index(("send", "start"))
    read_first = sum(n for event, n in exchange.log[:answered] if event == "receive")
    assert read_first == (0 if path == "/early" else 2 * CHUNK)  # answered as soon as the app knew
    assert seen == ([] if path == "/early" else [2 * CHUNK])
    assert exchange.log[answered + 1] == ("send", "body")  # the JSON before any of the rest is read ...
    assert exchange.pulled == 40 * CHUNK  # ... then all of it, dropped, before the end


async def test_an_answer_to_a_whole_body_is_left_alone() -> None:
    exchange = await Exchange(zeros(3)).run(middleware([], max_bytes=BIG))
    assert exchange.status == 200 and b"connection" not in exchange.headers  # kept alive
    assert exchange.log[-2:] == [("send", "start"), ("send", "end")]


@pytest.mark.parametrize("headers", [{}, {"content-length": "0"}], ids=["no-framing", "empty"])
async def test_a_request_without_a_body_is_never_read_nor_closed(headers: dict[str, str]) -> None:
    exchange = await Exchange(zeros(0), headers=headers, path="/early").run(middleware([], max_bytes=BIG))
    assert exchange.status == 415 and b"connection" not in exchange.headers
    assert exchange.log == [("send", "start"), ("send", "end")]  # Exchange fails any receive: no body to wait for


async def test_an_early_answer_to_a_client_waiting_for_100_continue_closes_without_reading() -> None:
    exchange = Exchange(zeros(40), headers={"content-length": str(40 * CHUNK), "expect": "100-continue"},
                        path="/early")
    await exchange.run(middleware([], max_bytes=BIG))
    assert_answered_early(exchange, *EARLY["/early"])
    assert exchange.log == [("send", "start"), ("send", "end")] and exchange.pulled == 0


async def test_an_early_answer_to_a_declared_body_past_the_discard_bound_closes_without_reading() -> None:
    exchange = Exchange(zeros(40), headers={"content-length": str(40 * CHUNK)}, path="/early")
    await exchange.run(middleware([], max_bytes=BIG, discard_bytes=20 * CHUNK))
    assert_answered_early(exchange, *EARLY["/early"])
    assert exchange.log == [("send", "start"), ("send", "end")] and exchange.pulled == 0


@pytest.mark.parametrize("path", sorted(EARLY))
async def test_dropping_after_an_early_answer_stops_at_its_byte_bound(path: str) -> None:
    exchange = await Exchange(endless(), path=path).run(middleware([], max_bytes=BIG, discard_bytes=20 * CHUNK))
    assert_answered_early(exchange, *EARLY[path])
    assert 20 * CHUNK < exchange.pulled <= 2 * CHUNK + 21 * CHUNK


@pytest.mark.parametrize("path", sorted(EARLY))
async def test_dropping_after_an_early_answer_stops_at_its_time_bound(path: str) -> None:
    exchange = Exchange(zeros(3), headers={"content-length": str(40 * CHUNK)}, stall=True, path=path)
    started = time.monotonic()
    await exchange.run(middleware([], max_bytes=BIG, discard_s=0.2))
    assert 0.15 < time.monotonic() - started < 2
    assert_answered_early(exchange, *EARLY[path])
    assert exchange.pulled == 3 * CHUNK


async def test_dropping_after_an_early_answer_stops_when_the_client_goes_away() -> None:
    exchange = await Exchange(zeros(6), disconnect=True, path="/early").run(middleware([], max_bytes=BIG))
    assert_answered_early(exchange, *EARLY["/early"])
    assert exchange.log[-2:] == [("receive", "disconnect"), ("send", "end")]


# -- route limits, request ids and the access log -------------------------------------------------


def edge_app() -> FastAPI:
    from services.common.http import install_http_edge

    app = FastAPI()
    install_http_edge(app, service="test", max_upload_bytes=LIMIT, cors_origins=[],
                      route_limits={"/big": 4 * LIMIT})

    @app.post("/big")
    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    return app


async def test_a_route_limit_raises_the_cap_for_its_path_only() -> None:
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=edge_app()), base_url="http://t") as client:
        body = b"x" * (2 * LIMIT)
        assert (await client.post("/big", content=body)).json() == {"bytes": 2 * LIMIT}
        refused = await client.post("/upload", content=body)
        assert refused.status_code == 413 and str(LIMIT) in refused.json()["detail"]
        refused = await client.post("/big", content=body * 3)
        assert refused.status_code == 413 and str(4 * LIMIT) in refused.json()["detail"]


@pytest.mark.parametrize(("incoming", "kept"), [(None, False), ("trace-42.abc", True), ("x" * 65, False),
                                                ("evil\nline", False), ("spaced id", False)],
                         ids=["none", "short", "too-long", "newline", "space"])
async def test_every_answer_has_a_request_id_and_one_json_log_line(
        incoming: str | None, kept: bool, caplog: pytest.LogCaptureFixture) -> None:
    import re

    import httpx

    headers = {"X-Request-ID": incoming} if incoming is not None else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=edge_app()), base_url="http://t") as client:
        with caplog.at_level("INFO", logger="cbir.access"):
            response = await client.post("/upload", content=b"abc", headers=headers)
            refused = await client.post("/upload", content=b"x" * (LIMIT + 1))
    request_id = response.headers["x-request-id"]
    assert request_id == incoming if kept else re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["x-request-id"])  # refusals have one too
    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "cbir.access"]
    assert [line["request_id"] for line in lines] == [request_id, refused.headers["x-request-id"]]
    assert lines[0] | {"ms": 0, "client": None} == {"request_id": request_id, "service": "test", "method": "POST",
                                                    "path": "/upload", "route": "/upload", "status": 200, "ms": 0,
                                                    "client": None}
    assert lines[1]["status"] == 413


# -- /metrics behind the API keys -----------------------------------------------------------------

KEY = "metrics-key-5d1e"


def keyed_edge_app(keys: list[str]) -> FastAPI:
    from services.common.settings import UploadSettings

    app = edge_app()
    app.state.settings = UploadSettings(api_keys=keys)  # what verify_api_key reads, on every service
    return app


@pytest.mark.parametrize("key", [None, "", "wrong", KEY.upper(), KEY + " "], ids=["none", "empty", "wrong", "case",
                                                                                  "space"])
async def test_metrics_refuse_a_missing_or_wrong_key_when_keys_are_set(key: str | None,
                                                                       clean_environment: None) -> None:
    import httpx

    headers = {} if key is None else {"X-API-Key": key}
    transport = httpx.ASGITransport(app=keyed_edge_app([KEY]))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/metrics/", headers=headers)
        redirected = await client.get("/metrics", headers=headers, follow_redirects=True)
    for refused in (response, redirected):
        assert refused.status_code == 401, refused.text
        assert refused.json() == {"detail": "missing or invalid X-API-Key header"}
        assert refused.headers["www-authenticate"] == "ApiKey"
        assert "cbir_http_requests_total" not in refused.text


@pytest.mark.parametrize("keys", [[KEY], []], ids=["with-its-key", "no-keys-configured"])
async def test_metrics_are_served_with_a_valid_key_or_when_no_keys_are_set(keys: list[str],
                                                                           clean_environment: None) -> None:
    import httpx

    transport = httpx.ASGITransport(app=keyed_edge_app(keys))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.post("/upload", content=b"abc")
        response = await client.get("/metrics", headers={"X-API-Key": KEY} if keys else {}, follow_redirects=True)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert 'cbir_http_requests_total{method="POST",route="/upload",service="test",status="200"}' in response.text


async def test_both_services_guard_their_metrics_with_their_keys(cbir_env: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from servers import asgi_client

    from services.serve.apps import embedder_app, gateway_app

    monkeypatch.setenv("CBIR_API_KEYS", f'["{KEY}"]')
    async with asgi_client(gateway_app()) as search, asgi_client(embedder_app()) as embedder:
        for client in (search, embedder):
            refused = await client.get("/metrics/")
            assert (refused.status_code, refused.json()["detail"]) == (401, "missing or invalid X-API-Key header")
            served = await client.get("/metrics/", headers={"X-API-Key": KEY})
            assert served.status_code == 200 and "cbir_http_request_seconds" in served.text
