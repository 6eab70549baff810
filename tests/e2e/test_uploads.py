"""Hostile, malformed and odd uploads to `POST /search` and `POST /embed`.

Every refusal is a 4xx JSON body whose `detail` string says what was wrong; never a 500, a
crash or a hang. Odd but valid images are searched like any other, and both services decode an
upload as the model bundle says.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from factories import copy_bundle
from fastapi import FastAPI, Request
from PIL import Image
from processes import free_port, python_path, stop_process
from sample_images import encode, odd_images, png_bomb, png_bytes, sample_image
from servers import asgi_client, serve_in_thread, wait_for_http

from services.common.http import BodySizeLimitMiddleware
from services.common.images import DEFAULT_MAX_BYTES

pytestmark = pytest.mark.anyio

REQUEST_TIMEOUT_S = 15  # a hang fails the test instead of stalling the suite
SMALL_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def photo(mini_collection: Path) -> Image.Image:
    return Image.open(mini_collection / "test" / "cat" / "0000.jpg").convert("RGB")


def hostile_uploads(photo: Image.Image) -> dict[str, tuple[str, bytes, str, int, str]]:
    """name → (filename, bytes, content type, expected status, expected words in `detail`)."""
    jpeg = encode(photo.resize((256, 256)), "JPEG", quality=90)
    return {
        "empty": ("empty.jpg", b"", "image/jpeg", 400, "empty"),
        "text": ("notes.jpg", b"just some text, honest", "image/jpeg", 415, "not a supported image"),
        "random-bytes": ("noise.png", random.Random(7).randbytes(5000), "image/png", 415, "not a supported image"),
        "truncated-jpeg": ("cut.jpg", jpeg[: len(jpeg) * 6 // 10], "image/jpeg", 415, "could not be decoded"),
        "ihdr-100000x100000": ("huge.png", png_bytes(100_000, 100_000), "image/png", 413, "too many pixels"),
        "bomb-16000x16000": ("bomb.png", png_bomb(16_000, 16_000), "image/png", 413, "too many pixels"),
        "over-pixel-limit": ("big.png", png_bomb(7000, 7000), "image/png", 413, "the limit is 40000000 pixels"),
        "svg": ("vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect '
                b'width="10" height="10"/></svg>', "image/svg+xml", 415, "not a supported image"),
    }


HOSTILE = sorted(hostile_uploads(Image.new("RGB", (8, 8))))


async def post_image(client: httpx.AsyncClient, endpoint: str, filename: str, data: bytes, content_type: str,
                     **params: object) -> httpx.Response:
    field = "file" if endpoint == "/search" else "files"
    with anyio.fail_after(REQUEST_TIMEOUT_S):
        return await client.post(endpoint, params=params, files={field: (filename, data, content_type)})


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail, response.text
    for word in words:
        assert word in detail, detail
    return detail


@pytest.mark.parametrize("case", HOSTILE)
async def test_hostile_search_upload_is_refused(search_client: httpx.AsyncClient, photo: Image.Image,
                                                case: str) -> None:
    filename, data, content_type, status, words = hostile_uploads(photo)[case]
    assert_error(await post_image(search_client, "/search", filename, data, content_type), status, words)


@pytest.mark.parametrize("case", HOSTILE)
async def test_hostile_embed_upload_is_refused(embedder_client: httpx.AsyncClient, photo: Image.Image,
                                               case: str) -> None:
    filename, data, content_type, status, words = hostile_uploads(photo)[case]
    detail = assert_error(await post_image(embedder_client, "/embed", filename, data, content_type), status, words)
    assert f"file 0 ({filename})" in detail  # which of the uploaded files was wrong


async def test_embed_names_the_bad_file_among_good_ones(embedder_client: httpx.AsyncClient,
                                                        test_image: bytes) -> None:
    files = [("files", ("good.jpg", test_image, "image/jpeg")), ("files", ("bad.jpg", b"nope", "image/jpeg"))]
    response = await embedder_client.post("/embed", files=files)
    assert_error(response, 415, "file 1 (bad.jpg)")


# --- form fields and query parameters --------------------------------------------------------


@pytest.mark.parametrize(("files", "data", "words"), [
    (None, None, ["file", "required"]),
    ({"image": ("q.jpg", b"x", "image/jpeg")}, None, ["file", "required"]),
    (None, {"file": "not a file"}, ["file"]),
], ids=["missing", "misnamed", "text-field"])
async def test_search_without_a_file_field_is_422(search_client: httpx.AsyncClient, files: dict | None,
                                                  data: dict | None, words: list[str]) -> None:
    response = await search_client.post("/search", files=files, data=data)
    assert_error(response, 422, *words)


@pytest.mark.parametrize("k", ["0", "-3", "1001", "ten", "2.5", ""])
async def test_search_k_out_of_range_or_not_a_number_is_422(search_client: httpx.AsyncClient, test_image: bytes,
                                                            k: str) -> None:
    response = await post_image(search_client, "/search", "q.jpg", test_image, "image/jpeg", k=k)
    assert_error(response, 422, "k")


@pytest.mark.parametrize(("files", "words"), [
    (None, ["files", "required"]),
    ({"file": ("q.jpg", b"x", "image/jpeg")}, ["files", "required"]),
], ids=["missing", "misnamed"])
async def test_embed_without_a_files_field_is_422(embedder_client: httpx.AsyncClient, files: dict | None,
                                                  words: list[str]) -> None:
    assert_error(await embedder_client.post("/embed", files=files), 422, *words)


async def test_embed_too_many_files_is_400(cbir_env: Path, monkeypatch: pytest.MonkeyPatch,
                                           test_image: bytes) -> None:
    from services.serve.apps import embedder_app

    monkeypatch.setenv("CBIR_MAX_IMAGES_PER_REQUEST", "2")
    async with asgi_client(embedder_app()) as client:
        files = [("files", (f"{i}.jpg", test_image, "image/jpeg")) for i in range(3)]
        assert_error(await client.post("/embed", files=files), 400, "3 images", "the limit is 2")


# --- the upload size cap, enforced while streaming --------------------------------------------


@pytest.fixture
async def small_limit_clients(indexed_state: Path, monkeypatch: pytest.MonkeyPatch
                              ) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """Search and embedder apps whose request bodies are capped at 64 KiB (CBIR_MAX_UPLOAD_BYTES)."""
    from services.serve.apps import embedder_app, gateway_app

    monkeypatch.setenv("CBIR_MAX_UPLOAD_BYTES", str(SMALL_LIMIT))
    async with asgi_client(gateway_app()) as search, asgi_client(embedder_app()) as embedder:
        yield {"/search": search, "/embed": embedder}


def multipart_head(endpoint: str, boundary: str) -> bytes:
    field = "file" if endpoint == "/search" else "files"
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"big.bmp\"\r\n"
            "Content-Type: image/bmp\r\n\r\n").encode()


class CountingBody:
    """A multipart upload of `chunks` × `chunk_size` bytes that counts how much the server pulled."""

    def __init__(self, endpoint: str, *, chunks: int = 200, chunk_size: int = 16 * 1024) -> None:
        self.boundary = "cbir-test-boundary"
        self.head, self.chunks, self.chunk_size = multipart_head(endpoint, self.boundary), chunks, chunk_size
        self.sent = 0
        self.total = len(self.head) + chunks * chunk_size + len(self.tail)

    @property
    def tail(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def headers(self) -> dict[str, str]:
        return {"content-type": f"multipart/form-data; boundary={self.boundary}"}

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in [self.head] + [b"\x00" * self.chunk_size] * self.chunks + [self.tail]:
            self.sent += len(part)
            yield part


@pytest.mark.parametrize("endpoint", ["/search", "/embed"])
async def test_declared_oversized_body_is_413_before_reading(small_limit_clients: dict[str, httpx.AsyncClient],
                                                             endpoint: str) -> None:
    body = CountingBody(endpoint)
    with anyio.fail_after(REQUEST_TIMEOUT_S):
        response = await small_limit_clients[endpoint].post(
            endpoint, content=body, headers={**body.headers, "content-length": str(body.total)})
    assert_error(response, 413, f"exceeds {SMALL_LIMIT} bytes")
    # Answered on the Content-Length header alone (the app never runs), then the body is read through
    # and dropped so that the close is no reset; the order is checked in tests/common/test_http.py.
    assert body.sent == body.total


@pytest.mark.parametrize("endpoint", ["/search", "/embed"])
async def test_chunked_oversized_body_is_refused_while_streaming(small_limit_clients: dict[str, httpx.AsyncClient],
                                                                 endpoint: str) -> None:
    body = CountingBody(endpoint)
    with anyio.fail_after(REQUEST_TIMEOUT_S):
        response = await small_limit_clients[endpoint].post(endpoint, content=body, headers=body.headers)
    assert "content-length" not in response.request.headers  # really chunked
    assert_error(response, 413, f"exceeds {SMALL_LIMIT} bytes")
    # Cut at the limit and answered, then the rest read and dropped (where it is cut: tests/common/test_http.py;
    # that the answer comes before the rest is sent: the live server below).
    assert body.sent == body.total


@pytest.mark.parametrize("endpoint", ["/search", "/embed"])
async def test_upload_just_under_the_cap_is_accepted(small_limit_clients: dict[str, httpx.AsyncClient],
                                                     photo: Image.Image, endpoint: str) -> None:
    data = encode(photo.resize((120, 120)), "BMP")  # ~43 KB, under the 64 KiB cap
    assert len(data) < SMALL_LIMIT - 1024
    response = await post_image(small_limit_clients[endpoint], endpoint, "ok.bmp", data, "image/bmp")
    assert response.status_code == 200, response.text


def test_live_server_refuses_oversized_bodies_without_reading_them(indexed_state: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Through uvicorn and a real socket: 413 arrives before the body is sent (declared) or while
    it is still streaming (chunked)."""
    from services.serve.apps import gateway_app

    monkeypatch.setenv("CBIR_MAX_UPLOAD_BYTES", str(SMALL_LIMIT))
    head = (b"POST /search HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: multipart/form-data; boundary=cbir-test-boundary\r\n")
    with serve_in_thread(gateway_app()) as url:
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(head + b"Content-Length: 50000000\r\n\r\n")  # and not one byte of the body
            assert read_reply(sock).startswith(b"HTTP/1.1 413")

        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n"
                         + http_chunk(multipart_head("/search", "cbir-test-boundary")))
            sent = 0
            while not select.select([sock], [], [], 0.002)[0]:
                assert sent < 50_000_000, "no answer while 50 MB streamed in"
                sock.sendall(http_chunk(b"\x00" * 16384))
                sent += 16384
            assert read_reply(sock).startswith(b"HTTP/1.1 413")
            assert sent < SMALL_LIMIT + 2**20, f"{sent} bytes went in before the 413"  # 64 KiB here


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def read_reply(sock: socket.socket) -> bytes:
    reply = b""
    while b"\r\n\r\n" not in reply:
        data = sock.recv(4096)
        if not data:
            break
        reply += data
    return reply


# --- a 413 that every client can read -----------------------------------------------------------
# The server answers as soon as it refuses, then reads and drops what the client is still sending
# before it closes: a client that reads only after sending everything (urllib.request) otherwise
# sees its unread bytes turn the close into a connection reset, never the 413.

THIRTY_MB = 30 * 2**20
MULTIPART = "multipart/form-data; boundary=cbir-test-boundary"
UPLOAD_HEAD, UPLOAD_TAIL = multipart_head("/search", "cbir-test-boundary"), b"\r\n--cbir-test-boundary--\r\n"
UPLOAD_BYTES = len(UPLOAD_HEAD) + THIRTY_MB + len(UPLOAD_TAIL)


def zero_blocks(total: int, size: int = 2**20) -> Iterator[bytes]:
    """`total` zero bytes in blocks, so that no client has to hold the whole upload."""
    block = bytes(size)
    for start in range(0, total, size):
        yield block[: total - start]


def upload_blocks() -> Iterator[bytes]:
    """A well-formed 30 MB multipart upload (a malformed one would be refused by the form parser first)."""
    yield UPLOAD_HEAD
    yield from zero_blocks(THIRTY_MB)
    yield UPLOAD_TAIL


def split_reply(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def read_until_closed(sock: socket.socket) -> bytes:
    reply = b""
    while data := sock.recv(65536):
        reply += data
    return reply


def post_with_urllib(url: str, *, chunked: bool) -> tuple[int, bytes]:
    headers = {"Content-Type": MULTIPART} | ({} if chunked else {"Content-Length": str(UPLOAD_BYTES)})
    request = urllib.request.Request(f"{url}/search", data=upload_blocks(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def post_with_httpx(url: str, *, chunked: bool) -> tuple[int, bytes]:
    content = upload_blocks() if chunked else b"".join(upload_blocks())
    response = httpx.post(f"{url}/search", content=content, headers={"content-type": MULTIPART},
                          timeout=REQUEST_TIMEOUT_S)
    return response.status_code, response.content


def post_with_socket(url: str, *, chunked: bool) -> tuple[int, bytes]:
    """Headers and the whole body first, and only then a look at the answer."""
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % UPLOAD_BYTES
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: %s\r\n%s\r\n\r\n"
                     % (MULTIPART.encode(), framing))
        for block in upload_blocks():
            sock.sendall(http_chunk(block) if chunked else block)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        status, headers, body = split_reply(read_until_closed(sock))
    assert headers["connection"] == "close"
    return status, body


def post_with_curl(url: str, *, chunked: bool) -> tuple[int, bytes]:
    """curl sends `Expect: 100-continue` for a large body: the 413 comes instead of the 100."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    framing = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    done = subprocess.run(["curl", "-sS", "--max-time", str(REQUEST_TIMEOUT_S), "-H", f"Content-Type: {MULTIPART}",
                           *framing, "--data-binary", "@-", "-w", "\n%{http_code}", f"{url}/search"],
                          input=b"".join(upload_blocks()), capture_output=True, check=True)
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


CLIENTS = {"urllib.request": post_with_urllib, "httpx": post_with_httpx, "socket": post_with_socket,
           "curl": post_with_curl}


@pytest.fixture
def live_search(indexed_state: Path) -> Iterator[str]:
    """The search gateway on a localhost port, at the default body limit (10 MiB)."""
    from services.serve.apps import gateway_app

    with serve_in_thread(gateway_app()) as url:
        yield url


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_every_client_reads_the_413_of_a_30_mb_upload(live_search: str, client: str, chunked: bool) -> None:
    status, body = CLIENTS[client](live_search, chunked=chunked)
    assert status == 413, body[:200]
    assert json.loads(body) == {"detail": f"the request body exceeds {DEFAULT_MAX_BYTES} bytes"}


def test_client_waiting_for_100_continue_gets_the_413_instead(live_search: str) -> None:
    with socket.create_connection(("127.0.0.1", int(live_search.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                     b"Expect: 100-continue\r\n\r\n" % (MULTIPART.encode(), UPLOAD_BYTES))
        status, headers, body = split_reply(read_until_closed(sock))  # and never a byte of the body sent
    assert (status, headers["connection"]) == (413, "close")
    assert json.loads(body)["detail"] == f"the request body exceeds {DEFAULT_MAX_BYTES} bytes"


DISCARD_BYTES, DISCARD_S = 2**20, 0.5


@pytest.fixture
def tight_server() -> Iterator[tuple[str, int]]:
    """uvicorn serving an upload behind a 64 KiB limit whose refused bodies are dropped up to 1 MiB or 0.5 s."""
    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    limited = BodySizeLimitMiddleware(app, max_bytes=SMALL_LIMIT, discard_bytes=DISCARD_BYTES, discard_s=DISCARD_S)
    with serve_in_thread(limited) as url:
        yield "127.0.0.1", int(url.rsplit(":", 1)[1])


def test_client_sending_far_past_the_discard_bound_is_answered_then_closed(tight_server: tuple[str, int]) -> None:
    with socket.create_connection(tight_server, timeout=10) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent, reply, block = 0, b"", http_chunk(bytes(16384))
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 512 * 2**20:  # an endless upload, for what the server cares
                readable, writable, _ = select.select([] if reply else [sock], [sock], [], 1)
                if readable:
                    reply = read_reply(sock)  # read early, as curl does: the 413 is there before the close
                if writable:
                    sent += sock.send(block)
        elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 413"), reply
    assert sent < 64 * 2**20, f"{sent} bytes went in before the connection closed"  # socket buffers included
    assert elapsed < DISCARD_S + 2


def test_stalled_client_is_answered_then_closed_within_the_time_bound(tight_server: tuple[str, int]) -> None:
    with socket.create_connection(tight_server, timeout=10) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (4 * SMALL_LIMIT)
                     + bytes(16384))  # and then nothing more
        started = time.monotonic()
        assert read_reply(sock).startswith(b"HTTP/1.1 413")  # at once ...
        answered = time.monotonic() - started
        read_until_closed(sock)  # ... and the close once the server has waited for the rest long enough
        closed = time.monotonic() - started
    assert answered < DISCARD_S / 2
    assert DISCARD_S * 0.8 < closed < DISCARD_S + 2


MEMORY_PROBE = """
import sys

import uvicorn
from fastapi import FastAPI, Request

from services.common.http import install_http_edge

app = FastAPI()
install_http_edge(app, service="memory-probe", max_upload_bytes=10 * 2**20, cors_origins=[])


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/search")
async def search(request: Request) -> dict[str, int]:  # counts the body, never holds it
    return {"bytes": sum([len(chunk) async for chunk in request.stream()])}


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


@pytest.mark.slow
def test_refused_bodies_are_dropped_not_buffered(tmp_path: Path) -> None:
    """The server process's peak memory barely moves while 30 MB bodies are refused and discarded
    (and while one far past the discard bound is cut off)."""
    port, log = free_port(), tmp_path / "probe.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-c", MEMORY_PROBE, str(port)], stdout=output,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": python_path()})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", timeout_s=60, process=process)
        assert httpx.post(f"{url}/search", content=bytes(4096)).status_code == 200  # warm: the first request's costs
        before = peak_rss_bytes(process.pid)
        for client, chunked in ((post_with_urllib, False), (post_with_urllib, True), (post_with_socket, False)):
            assert client(url, chunked=chunked)[0] == 413
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
                contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"POST /search HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
            for block in zero_blocks(256 * 2**20):  # past the 64 MiB discard bound
                sock.sendall(http_chunk(block))
        growth = peak_rss_bytes(process.pid) - before
    finally:
        stop_process(process)
    assert growth < 8 * 2**20, f"peak RSS grew {growth / 2**20:.1f} MiB while 30 MB bodies were refused"


# --- odd but valid images ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(odd_images(Image.new("RGB", (8, 8)))))
async def test_odd_images_are_searched(search_client: httpx.AsyncClient, photo: Image.Image, name: str) -> None:
    data = odd_images(photo)[name]
    kind = Image.open(io.BytesIO(data)).get_format_mimetype()
    response = await post_image(search_client, "/search", name, data, kind, k=5)
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert len(hits) == 5
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)


@pytest.fixture
def decode_probe(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Slows `decode_image` down a little and records the most decodes ever in flight at once."""
    from services.common import images

    real, lock, state = images.decode_image, threading.Lock(), {"in_flight": 0, "peak": 0, "calls": 0}

    def probed(data: bytes, **kwargs: object):
        with lock:
            state["in_flight"] += 1
            state["calls"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
        try:
            time.sleep(0.05)
            return real(data, **kwargs)
        finally:
            with lock:
                state["in_flight"] -= 1

    monkeypatch.setattr(images, "decode_image", probed)
    return state


@pytest.mark.parametrize("limit", [1, 3])
async def test_upload_decoder_keeps_decodes_in_flight_within_its_limit(decode_probe: dict[str, int],
                                                                      test_image: bytes, limit: int) -> None:
    from services.common.images import UploadDecoder

    decoder = UploadDecoder(limit)
    with anyio.fail_after(REQUEST_TIMEOUT_S):
        arrays = await asyncio.gather(*(decoder.decode(test_image) for _ in range(8)))
    assert all(array.shape == (32, 32, 3) for array in arrays)
    assert decode_probe["calls"] == 8
    assert decode_probe["peak"] == limit  # reached, never passed


async def test_search_decodes_at_most_the_configured_uploads_at_once(indexed_state: Path, decode_probe: dict[str, int],
                                                                    test_image: bytes) -> None:
    from services.search.settings import SearchSettings
    from services.serve.apps import gateway_app

    async with asgi_client(gateway_app(SearchSettings(max_concurrent_decodes=2)), base_url="http://search") as client:
        responses = await asyncio.gather(*(post_image(client, "/search", "cat.jpg", test_image, "image/jpeg", k=3)
                                           for _ in range(6)))
    assert [r.status_code for r in responses] == [200] * 6
    assert decode_probe["peak"] == 2


async def test_uploads_are_decoded_as_the_bundle_says(tmp_path, tiny_bundle_dir, indexed_state, monkeypatch) -> None:
    """A bundle that asks for nearest-neighbour resizing gets it from the gateway and the embedder alike."""
    from services.common.images import decode_image
    from services.embedder.bundle import load_bundle
    from services.embedder.runtime import Embedder
    from services.serve.apps import embedder_app, gateway_app

    bundle_dir = copy_bundle(tiny_bundle_dir, tmp_path / "nearest-bundle",
                             lambda m: m["preprocessing"].update(resize="nearest"))
    monkeypatch.setenv("CBIR_MODEL_DIR", str(bundle_dir))
    buffer = io.BytesIO()
    sample_image((160, 120)).save(buffer, format="PNG")
    upload = buffer.getvalue()
    embedder = Embedder(load_bundle(bundle_dir))
    [nearest] = embedder.embed_batch(decode_image(upload, resample="nearest")[None])
    [lanczos] = embedder.embed_batch(decode_image(upload, resample="lanczos")[None])
    assert nearest.confidence != pytest.approx(lanczos.confidence, abs=1e-4)  # the filter matters for this image

    async with asgi_client(gateway_app()) as search, asgi_client(embedder_app()) as embed:
        answered = (await search.post("/search", files={"file": ("q.png", upload, "image/png")})).json()
        vector = (await embed.post("/embed", files=[("files", ("q.png", upload, "image/png"))])).json()
        info = (await embed.get("/info")).json()
    assert answered["query"]["confidence"] == pytest.approx(nearest.confidence, abs=1e-5)
    assert vector["embeddings"][0]["vector"] == pytest.approx(nearest.vector.tolist(), abs=1e-5)
    assert (info["image_size"], info["resize"]) == (32, "nearest")
    assert Image.open(io.BytesIO(upload)).size == (160, 120)
