"""How indexer and search reach the embedder: one interface, in-process or over HTTP.

`EmbeddingService` is implemented by `services.embedder.runtime.LocalEmbeddingService` (the model
in this process) and by `HttpEmbeddingClient` below (the embedder service over httpx).
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import numpy as np
from PIL import Image

from services.common.errors import EmbedderUnavailableError, ImageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Embedding:
    """One image's search vector and the model's prediction for it."""

    vector: np.ndarray
    label: str
    confidence: float


@dataclass(frozen=True, slots=True)
class EmbedderInfo:
    """What a client must know about the model behind an embedder."""

    model_version: str
    dims: int
    classes: list[str]
    metadata: dict[str, Any]


class EmbeddingService(Protocol):
    async def info(self) -> EmbedderInfo: ...

    async def embed(self, images: np.ndarray) -> list[Embedding]:
        """Embed `(N, 32, 32, 3)` uint8 RGB images, as `services.common.images.decode_image` makes them."""
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

    def __init__(self, base_url: str, *, timeout_s: float = 10.0, retries: int = 2,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(timeout_s),
                                         transport=transport)
        self._info: EmbedderInfo | None = None

    async def info(self) -> EmbedderInfo:
        if self._info is None:
            body = (await self._request("GET", "/info")).json()
            self._info = EmbedderInfo(model_version=body["model_version"], dims=body["dims"],
                                      classes=body["classes"], metadata=body)
        return self._info

    async def embed(self, images: np.ndarray) -> list[Embedding]:
        files = [("files", (f"{i}.png", encode_png(image), "image/png")) for i, image in enumerate(images)]
        body = (await self._request("POST", "/embed", files=files)).json()
        return [
            Embedding(vector=np.asarray(item["vector"], dtype=np.float32), label=item["label"],
                      confidence=item["confidence"])
            for item in body["embeddings"]
        ]

    async def close(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        delay = 0.25
        for attempt in range(self.retries + 1):
            try:
                response = await self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if response.status_code < 400:
                    return response
                if 400 <= response.status_code < 500:
                    error = ImageError(f"the embedder refused the request: {_detail(response)}")
                    error.status_code = response.status_code
                    raise error
                problem = f"HTTP {response.status_code}: {_detail(response)}"
            if attempt < self.retries:
                logger.warning("embedder %s%s failed (%s); retry %d", self.base_url, path, problem, attempt + 1)
                await asyncio.sleep(delay)
                delay *= 2
        raise EmbedderUnavailableError(f"the embedder at {self.base_url} is unavailable ({problem})")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:200]
