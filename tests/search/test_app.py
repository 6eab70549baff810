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


def metric(text: str, sample: str) -> float:
    """The value of one sample line of a Prometheus text page (0 when absent)."""
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_metrics_count_requests_per_route_template(search_client: httpx.AsyncClient, test_image: bytes) -> None:
    # The registry is process-wide: compare before and after this test's own requests.
    searches = 'cbir_http_requests_total{method="POST",route="/search",service="search",status="200"}'
    not_found = 'cbir_http_requests_total{method="GET",route="/images/{id}",service="search",status="404"}'
    before = (await search_client.get("/metrics", follow_redirects=True)).text
    for _ in range(2):
        await search_client.post("/search", files={"file": ("q.jpg", test_image, "image/jpeg")})
    await search_client.get("/images/0123456789abcdef0123")
    response = await search_client.get("/metrics", follow_redirects=True)
    assert response.status_code == 200
    text = response.text
    assert metric(text, searches) - metric(before, searches) == 2
    assert metric(text, not_found) - metric(before, not_found) == 1  # counted under the route template
    forward_passes = "cbir_embedder_batch_images_count"
    assert metric(text, forward_passes) - metric(before, forward_passes) >= 1
    assert not re.search(r'route="/images/[0-9a-f]+"', text)  # ids never become label values


async def test_uploads_are_decoded_as_the_bundle_says(tmp_path, tiny_bundle_dir, indexed_state, monkeypatch) -> None:
    """A bundle that asks for nearest-neighbour resizing gets it from the gateway and the embedder alike."""
    import io
    import json
    import shutil

    from PIL import Image
    from reliability_fixtures import asgi_client, sample_image

    from services.common.images import decode_image
    from services.embedder.app import create_app as create_embedder
    from services.embedder.bundle import load_bundle
    from services.embedder.runtime import Embedder
    from services.search.app import create_app as create_search

    bundle_dir = tmp_path / "nearest-bundle"
    shutil.copytree(tiny_bundle_dir, bundle_dir)
    metadata = json.loads((bundle_dir / "bundle.json").read_text())
    metadata["preprocessing"]["resize"] = "nearest"
    (bundle_dir / "bundle.json").write_text(json.dumps(metadata))
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
