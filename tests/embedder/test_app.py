"""The embedder service through HTTP, with its lifespan running: one fused vector per uploaded image."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.anyio


async def test_embed_returns_one_vector_per_image(embedder_client: httpx.AsyncClient, test_image: bytes) -> None:
    files = [("files", ("a.jpg", test_image, "image/jpeg")), ("files", ("b.jpg", test_image, "image/jpeg"))]
    response = await embedder_client.post("/embed", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dims"] == 26  # 16 PCA dims + 10 classes
    assert len(body["embeddings"]) == 2
    first, second = body["embeddings"]
    assert first["vector"] == pytest.approx(second["vector"], abs=1e-6)
    assert sum(v * v for v in first["vector"]) == pytest.approx(1.0, abs=1e-4)
    info = (await embedder_client.get("/info")).json()
    assert info["model_version"] == body["model_version"]
    assert len(info["classes"]) == 10


async def test_healthz_is_ready_with_no_warm_up_when_the_model_is_not_compiled(
        embedder_client: httpx.AsyncClient) -> None:
    health = (await embedder_client.get("/healthz")).json()
    assert health["status"] == "ready" and health["warm_up"] is None  # CBIR_COMPILE=off in the tests
