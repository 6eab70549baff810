"""The search gateway and the embedder service, through HTTP with their lifespans running."""

from __future__ import annotations

import re

import httpx
import pytest

pytestmark = pytest.mark.anyio


async def test_search_returns_ranked_hits(search_client: httpx.AsyncClient, test_image: bytes) -> None:
    response = await search_client.post("/search", params={"k": 7}, files={"file": ("q.jpg", test_image, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"query", "hits", "took_ms"}
    assert body["query"]["predicted_label"] in {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                "horse", "ship", "truck"}
    assert 0.0 <= body["query"]["confidence"] <= 1.0
    hits = body["hits"]
    assert len(hits) == 7
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= score <= 2.0 for score in scores)
    assert len({hit["id"] for hit in hits}) == 7
    image = await search_client.get(hits[0]["image_url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"


async def test_search_rejects_bad_upload_with_json(search_client: httpx.AsyncClient) -> None:
    response = await search_client.post("/search", files={"file": ("x.jpg", b"not an image", "image/jpeg")})
    assert response.status_code == 415
    assert "not a supported image" in response.json()["detail"]


async def test_healthz_and_docs(search_client: httpx.AsyncClient) -> None:
    health = await search_client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["documents"] == 500
    assert (await search_client.get("/docs")).status_code == 200
    schema = (await search_client.get("/openapi.json")).json()
    assert "/search" in schema["paths"]
    page = await search_client.get("/")
    assert page.status_code == 200 and "<form" in page.text


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


async def test_metrics_count_requests_per_route_template(search_client: httpx.AsyncClient, test_image: bytes) -> None:
    await search_client.post("/search", files={"file": ("q.jpg", test_image, "image/jpeg")})
    response = await search_client.get("/metrics", follow_redirects=True)
    assert response.status_code == 200
    text = response.text
    assert 'cbir_http_requests_total{method="POST",route="/search",service="search",status="200"}' in text
    assert "cbir_embedder_batch_images_bucket" in text
    assert not re.search(r'route="/images/[0-9a-f]+"', text)  # ids never become label values
