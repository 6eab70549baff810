"""How indexer and search reach the embedder: one interface, in-process or over HTTP.

`EmbeddingService` is implemented by `services.embedder.runtime.LocalEmbeddingService` (the model
in this process) and by `HttpEmbeddingClient` below (the embedder service over httpx).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
import numpy as np
from PIL import Image

from services.common.errors import EmbedderUnavailableError, ImageError
from services.common.settings import EmbedderClientSettings, default

logger = logging.getLogger(__name__)


# What an image is embedded for: a query (the bundle's test-time views) or the index (its index-side views,
# which may be fewer: the vectors live in the same space, see `Preprocessing.index_flip_tta`).
Purpose = Literal["query", "index"]


@dataclass(frozen=True, slots=True)
class Embedding:
    """One image's search vector and the model's prediction for it."""

    vector: np.ndarray
    label: str
    confidence: float


@dataclass(frozen=True, slots=True)
class EmbedderInfo:
    """What a client must know about the model behind an embedder.

    `model_version` names the vector space: the bundle (`bundle_version`) with its vector settings
    (`pca_dims`, `onehot_weight`). `image_size` and `resize` are how the bundle wants uploads decoded
    (`decode_image(size=..., resample=...)`). `metadata` is the bundle's own record (`bundle.json`), and
    `device` where its forward pass runs (cpu, cuda).
    """

    model_version: str
    dims: int
    classes: list[str]
    metadata: dict[str, Any]
    bundle_version: str
    pca_dims: int
    onehot_weight: float
    device: str
    image_size: int
    resize: str


class EmbeddingService(Protocol):
    # True while the model is still being compiled (it answers meanwhile, slower); /healthz says so.
    warming_up: bool
    # (batch sizes compiled, sizes to compile), or None when nothing compiles here; /healthz's `warm_up`.
    warm_up_progress: tuple[int, int] | None

    async def info(self) -> EmbedderInfo: ...

    async def embed(self, images: np.ndarray, *, purpose: Purpose = "query") -> list[Embedding]:
        """Embed `(N, S, S, 3)` uint8 RGB images decoded as `info()` says (`decode_image(size=..., resample=...)`),
        with the views the bundle uses for `purpose`."""
        ...

    async def close(self) -> None: ...


def encode_png(image: np.ndarray) -> bytes:
    """Lossless transport of a decoded image to the embedder."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class HttpEmbeddingClient:
    """The embedder service over HTTP, with explicit timeouts and bounded retries.

    >>> client = HttpEmbeddingClient("http://embedder:8001", timeout_s=10)
    >>> vectors = await client.embed(images)
    """

    warming_up = False  # the embedder service reports its own warm-up in its /healthz
    warm_up_progress = None
    # The embedder takes at most 512 images a request (CBIR_MAX_IMAGES_PER_REQUEST); stay well below.
    max_images_per_request = 256

    def __init__(self, base_url: str, *, timeout_s: float = default(EmbedderClientSettings, "embedder_timeout_s"),
                 retries: int = default(EmbedderClientSettings, "embedder_retries"), api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        headers = {"X-API-Key": api_key} if api_key else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(timeout_s),
                                         headers=headers, transport=transport)
        self._info: EmbedderInfo | None = None

    async def info(self) -> EmbedderInfo:
        if self._info is None:
            response = await self._request("GET", "/info")
            with self._expecting_a_valid_answer("/info"):
                body = response.json()
                self._info = EmbedderInfo(model_version=str(body["model_version"]), dims=int(body["dims"]),
                                          classes=list(body["classes"]), metadata=body["bundle"],
                                          bundle_version=str(body["bundle"]["version"]),
                                          pca_dims=int(body["pca_dims"]), onehot_weight=float(body["onehot_weight"]),
                                          device=str(body["device"]),
                                          image_size=int(body["image_size"]), resize=str(body["resize"]))
        return self._info

    async def embed(self, images: np.ndarray, *, purpose: Purpose = "query") -> list[Embedding]:
        step = self.max_images_per_request
        if len(images) > step:
            return [e for start in range(0, len(images), step)
                    for e in await self.embed(images[start:start + step], purpose=purpose)]
        files = [("files", (f"{i}.png", encode_png(image), "image/png")) for i, image in enumerate(images)]
        response = await self._request("POST", "/embed", files=files, params={"purpose": purpose})
        with self._expecting_a_valid_answer("/embed"):
            embeddings = [
                Embedding(vector=np.asarray(item["vector"], dtype=np.float32), label=str(item["label"]),
                          confidence=float(item["confidence"]))
                for item in response.json()["embeddings"]
            ]
            if len(embeddings) != len(images):
                raise ValueError(f"{len(embeddings)} embeddings for {len(images)} images")
        return embeddings

    async def close(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        delay = 0.25
        for attempt in range(self.retries + 1):
            try:
                # httpx times each read separately; this bounds the whole call, so a trickling
                # embedder cannot hold a request for longer than `timeout_s`.
                async with asyncio.timeout(self.timeout_s):
                    response = await self._client.request(method, path, **kwargs)
            except TimeoutError:
                problem = f"no complete answer within {self.timeout_s:g} s"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if response.status_code < 400:
                    return response
                if response.status_code in _IMAGE_REFUSALS:
                    error = ImageError(f"the embedder refused the image: {_detail(response)}")
                    error.status_code = response.status_code
                    raise error
                problem = f"HTTP {response.status_code}: {_detail(response)}"
                if response.status_code < 500 and response.status_code != 429:
                    # A wrong URL, a missing API key or a malformed call: retrying will not help, and
                    # it is not the caller's fault either.
                    raise EmbedderUnavailableError(
                        f"the embedder at {self.base_url} refused {method} {path} ({problem}); "
                        "check CBIR_EMBEDDER_URL and the embedder's settings")
            if attempt < self.retries:
                logger.warning("embedder %s%s failed (%s); retry %d", self.base_url, path, problem, attempt + 1)
                await asyncio.sleep(delay)
                delay *= 2
        raise EmbedderUnavailableError(f"the embedder at {self.base_url} is unavailable ({problem})")

    @contextmanager
    def _expecting_a_valid_answer(self, path: str) -> Iterator[None]:
        try:
            yield
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbedderUnavailableError(
                f"the embedder at {self.base_url} answered {path} with an unexpected body ({exc!r}); "
                "check CBIR_EMBEDDER_URL"
            ) from exc


# What the embedder answers when the image itself is at fault; passed on to the caller as is.
_IMAGE_REFUSALS = {400, 413, 415}


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:200]
