"""Errors answered before an upload has all arrived, read by clients that look at the answer only once they
have sent everything.

`urllib.request` (and `http.client` under it) sends the whole body before it reads, and asks for
`Connection: close`: a server that answers early and then closes with the client's bytes unread resets the
connection, and the client never sees the JSON. Answers that come before the body's end, on both services:
the multipart parser's 400 on malformed first bytes or mid-body (a text field past Starlette's 1 MiB part
limit), a missing boundary, a 422 on a body that is no form, a 404. A file part that is not an image is
answered 415 only once the whole form has been read (FastAPI parses the form before the route runs), so
it is the case that always worked. Each is read here through a real uvicorn on loopback.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import serve_in_thread

from services.common.http import DISCARD_MAX_BYTES, DISCARD_MAX_S

REQUEST_TIMEOUT_S = 20  # a hang fails the test instead of stalling the suite
MiB = 2**20
BOUNDARY = "cbir-early-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
SERVICES = {"search": "/search", "embedder": "/embed"}


@pytest.fixture(params=sorted(SERVICES))
def live(request: pytest.FixtureRequest, cbir_env: Path) -> Iterator[tuple[str, str]]:
    """The search gateway or the embedder, each as its entry point builds it, on a localhost port:
    (base URL, its upload endpoint). No index is needed: every answer here comes before a search."""
    from services.serve.apps import embedder_app, gateway_app

    app = gateway_app() if request.param == "search" else embedder_app()
    with serve_in_thread(app) as url:
        yield url, SERVICES[request.param]


def file_part(endpoint: str, data: bytes) -> bytes:
    field = "file" if endpoint == "/search" else "files"
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="upload.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def text_field(size: int) -> bytes:
    """A form with one text field of `size` bytes: Starlette refuses a part past 1 MiB while it streams."""
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="note"\r\n\r\n'.encode() + b"a" * size
            + f"\r\n--{BOUNDARY}--\r\n".encode())


# name → (content type, body of a few MB, status, the words of `detail`)
def early_uploads(endpoint: str) -> dict[str, tuple[str, bytes, int, str]]:
    return {
        "garbage-first-bytes": (MULTIPART, b"no boundary here " * (4 * MiB // 17), 400, "Invalid multipart data"),
        "part-past-1-mib": (MULTIPART, text_field(4 * MiB), 400, "Part exceeded maximum size of 1024KB"),
        "no-boundary": ("multipart/form-data", bytes(4 * MiB), 400, "Missing boundary in multipart"),
        "raw-image-no-form": ("image/png", b"\x89PNG\r\n\x1a\n" + bytes(4 * MiB), 422, "Field required"),
        "not-an-image": (MULTIPART, file_part(endpoint, b"plain text, not pixels " * (4 * MiB // 23)), 415,
                         "not a supported image"),
    }


CASES = sorted(early_uploads("/search"))


def blocks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def post_with_urllib(url: str, content_type: str, body: bytes, *, chunked: bool) -> tuple[int, dict]:
    """POST as `urllib.request` does: the whole body first (declared, or chunked from an iterable), then the
    answer. A reset raises here, and fails the test."""
    headers = {"Content-Type": content_type} | ({} if chunked else {"Content-Length": str(len(body))})
    request = urllib.request.Request(url, data=blocks(body) if chunked else body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, json.loads(refused.read())


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
@pytest.mark.parametrize("case", CASES)
def test_urllib_reads_the_json_of_an_error_answered_before_the_body_ended(live: tuple[str, str], case: str,
                                                                           chunked: bool) -> None:
    url, endpoint = live
    content_type, body, status, words = early_uploads(endpoint)[case]
    answered, error = post_with_urllib(url + endpoint, content_type, body, chunked=chunked)
    assert answered == status, error
    assert words in error["detail"], error


def test_urllib_reads_a_404_sent_without_reading_the_body(live: tuple[str, str]) -> None:
    url, _ = live
    assert post_with_urllib(f"{url}/no-such-route", "application/octet-stream", bytes(4 * MiB),
                            chunked=False) == (404, {"detail": "Not Found"})


# --- keep-alive: an early answer closes the connection, an answer to a whole body keeps it -------------


def test_an_early_answer_closes_its_connection_and_a_whole_body_answer_keeps_it(live: tuple[str, str]) -> None:
    url, endpoint = live
    connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=REQUEST_TIMEOUT_S)
    try:
        _, not_image, _, _ = early_uploads(endpoint)["not-an-image"]
        connection.request("POST", endpoint, body=not_image, headers={"Content-Type": MULTIPART})
        whole = connection.getresponse()
        assert (whole.status, whole.will_close) == (415, False), whole.getheaders()  # read whole: kept alive
        whole.read()
        connection.request("POST", endpoint, body=text_field(4 * MiB), headers={"Content-Type": MULTIPART})
        early = connection.getresponse()  # on the same connection
        assert (early.status, early.getheader("connection")) == (400, "close")
        assert "Part exceeded" in json.loads(early.read())["detail"]
        assert early.will_close
    finally:
        connection.close()


# --- past the bounds: answered, then closed; never a hang ----------------------------------------------


def open_upload(url: str, endpoint: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=REQUEST_TIMEOUT_S)
    sock.sendall(f"POST {endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {MULTIPART}\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    return sock


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def read_answer(sock: socket.socket) -> bytes:
    """One answer: its head, and a body of the Content-Length the head declares."""
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < declared_length(reply):
        data = sock.recv(65536)
        if not data:
            break
        reply += data
    return reply


def declared_length(reply: bytes) -> int:
    head = reply.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    return next((int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 0)


def read_until_closed(sock: socket.socket) -> bytes:
    reply = b""
    with contextlib.suppress(ConnectionResetError):
        while data := sock.recv(65536):
            reply += data
    return reply


def test_a_body_past_the_drain_cap_is_answered_then_closed(live: tuple[str, str]) -> None:
    """An endless malformed upload: the 400 comes at once, the server drops at most its 64 MiB cap more,
    then closes; the client, reading early as curl does, has the JSON and sees the close."""
    url, endpoint = live
    block = http_chunk(b"no boundary here " * 4096)
    sent, reply, started = 0, b"", time.monotonic()
    with open_upload(url, endpoint) as sock, contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while sent < 8 * DISCARD_MAX_BYTES:  # endless, for what the server cares
            readable, writable, _ = select.select([] if reply else [sock], [sock], [], 1)
            if readable:
                reply = read_answer(sock)  # the answer, before the close
            if writable:
                sent += sock.send(block)
            assert time.monotonic() - started < DISCARD_MAX_S + REQUEST_TIMEOUT_S, "no close"
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower(), reply
    assert json.loads(body) == {"detail": "Invalid multipart data."}
    assert sent < DISCARD_MAX_BYTES + 16 * MiB, f"{sent} bytes went in before the close"  # socket buffers too


@pytest.mark.slow  # the server waits its 5 s for the rest of the body
def test_a_client_that_stalls_after_an_early_answer_is_closed_within_the_time_bound(live: tuple[str, str]) -> None:
    url, endpoint = live
    with open_upload(url, endpoint) as sock:
        sock.sendall(http_chunk(text_field(2 * MiB)[: 3 * MiB // 2]))  # past the part limit, and then nothing
        started = time.monotonic()
        reply = read_until_closed(sock)
        closed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 400") and b"Part exceeded" in reply, reply
    assert DISCARD_MAX_S * 0.8 < closed < DISCARD_MAX_S + 5
