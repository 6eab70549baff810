"""A Bag-of-Visual-Words bundle served as a network is: `CBIR_MODEL_DIR` at it, `cbir index`, and the same
gateway searches, stores uploads and answers by id (the study's other system through our API)."""

from __future__ import annotations

from pathlib import Path

import pytest
from servers import asgi_client

from services.cli import main
from services.embedder.bundle import load_bundle

pytestmark = pytest.mark.anyio


@pytest.fixture
def bovw_indexed(cbir_env: Path, bovw_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The mini collection's train split indexed by the BOVW bundle into the embedded store."""
    monkeypatch.setenv("CBIR_MODEL_DIR", str(bovw_bundle_dir))
    main(["index", "--no-progress"])
    return cbir_env


async def test_the_gateway_serves_a_bovw_bundle_through_the_same_api(
        bovw_indexed: Path, bovw_bundle_dir: Path, test_image: bytes) -> None:
    from services.serve.apps import gateway_app

    bundle = load_bundle(bovw_bundle_dir)
    async with asgi_client(gateway_app(), base_url="http://127.0.0.1") as client:  # loopback: writes allowed
        health = (await client.get("/healthz")).json()
        assert health["status"] == "ready" and health["documents"] == 500
        response = await client.post("/search", params={"k": 5}, files={"file": ("q.jpg", test_image, "image/jpeg")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_version"].startswith(bundle.version) and len(body["hits"]) == 5
        assert body["query"]["predicted_label"] in bundle.classes
        scores = [hit["score"] for hit in body["hits"]]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 2 for s in scores)
        # The one-hot at weight 2 ranks images of the query's predicted class first, as for the deep models.
        assert {hit["predicted_label"] for hit in body["hits"]} == {body["query"]["predicted_label"]}
        added = await client.post("/images", files={"file": ("mine.jpg", test_image, "image/jpeg")})
        assert added.status_code == 201, added.text
        similar = await client.get(f"/images/{added.json()['id']}/similar", params={"k": 3})
        assert similar.status_code == 200 and len(similar.json()["hits"]) == 3
