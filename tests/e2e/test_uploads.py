"""Hostile, malformed and odd uploads to `POST /search` and `POST /embed`.

Every refusal is a 4xx JSON body whose `detail` string says what was wrong; never a 500, a
crash or a hang. Odd but valid images are searched like any other, and both services decode an
upload as the model bundle says.
"""

from __future__ import annotations

import asyncio
import io
import random
import select
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from factories import copy_bundle
from PIL import Image
from reliability_fixtures import asgi_client, encode, odd_images, png_bomb, png_bytes, sample_image, serve_in_thread

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
    from services.embedder.app import create_app

    monkeypatch.setenv("CBIR_MAX_IMAGES_PER_REQUEST", "2")
    async with asgi_client(create_app()) as client:
        files = [("files", (f"{i}.jpg", test_image, "image/jpeg")) for i in range(3)]
        assert_error(await client.post("/embed", files=files), 400, "3 images", "the limit is 2")


# --- the upload size cap, enforced while streaming --------------------------------------------


@pytest.fixture
async def small_limit_clients(indexed_state: Path, monkeypatch: pytest.MonkeyPatch
                              ) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """Search and embedder apps whose request bodies are capped at 64 KiB (CBIR_MAX_UPLOAD_BYTES)."""
    from services.embedder.app import create_app as create_embedder
    from services.search.app import create_app as create_search

    monkeypatch.setenv("CBIR_MAX_UPLOAD_BYTES", str(SMALL_LIMIT))
    async with asgi_client(create_search()) as search, asgi_client(create_embedder()) as embedder:
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
    assert body.sent == 0  # refused on the Content-Length header alone


@pytest.mark.parametrize("endpoint", ["/search", "/embed"])
async def test_chunked_oversized_body_is_cut_off_while_streaming(small_limit_clients: dict[str, httpx.AsyncClient],
                                                                 endpoint: str) -> None:
    body = CountingBody(endpoint)
    with anyio.fail_after(REQUEST_TIMEOUT_S):
        response = await small_limit_clients[endpoint].post(endpoint, content=body, headers=body.headers)
    assert "content-length" not in response.request.headers  # really chunked
    assert_error(response, 413, f"exceeds {SMALL_LIMIT} bytes")
    assert body.sent < SMALL_LIMIT + 2 * body.chunk_size + len(body.head), (body.sent, body.total)
    assert body.sent < body.total / 10


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
    from services.search.app import create_app

    monkeypatch.setenv("CBIR_MAX_UPLOAD_BYTES", str(SMALL_LIMIT))
    head = (b"POST /search HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: multipart/form-data; boundary=cbir-test-boundary\r\n")
    with serve_in_thread(create_app()) as url:
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
    from services.search.app import create_app
    from services.search.settings import SearchSettings

    async with asgi_client(create_app(SearchSettings(max_concurrent_decodes=2)), base_url="http://search") as client:
        responses = await asyncio.gather(*(post_image(client, "/search", "cat.jpg", test_image, "image/jpeg", k=3)
                                           for _ in range(6)))
    assert [r.status_code for r in responses] == [200] * 6
    assert decode_probe["peak"] == 2


async def test_uploads_are_decoded_as_the_bundle_says(tmp_path, tiny_bundle_dir, indexed_state, monkeypatch) -> None:
    """A bundle that asks for nearest-neighbour resizing gets it from the gateway and the embedder alike."""
    from services.common.images import decode_image
    from services.embedder.app import create_app as create_embedder
    from services.embedder.bundle import load_bundle
    from services.embedder.runtime import Embedder
    from services.search.app import create_app as create_search

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

    async with asgi_client(create_search()) as search, asgi_client(create_embedder()) as embed:
        answered = (await search.post("/search", files={"file": ("q.png", upload, "image/png")})).json()
        vector = (await embed.post("/embed", files=[("files", ("q.png", upload, "image/png"))])).json()
        info = (await embed.get("/info")).json()
    assert answered["query"]["confidence"] == pytest.approx(nearest.confidence, abs=1e-5)
    assert vector["embeddings"][0]["vector"] == pytest.approx(nearest.vector.tolist(), abs=1e-5)
    assert (info["image_size"], info["resize"]) == (32, "nearest")
    assert Image.open(io.BytesIO(upload)).size == (160, 120)
