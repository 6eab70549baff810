"""The apps the `cbir` commands serve (services/serve/apps.py), each built from the settings: the embedder with
the configured vector settings, the gateway that never indexes by itself, and `cbir serve --no-index`."""

from __future__ import annotations

from pathlib import Path

import pytest
from servers import asgi_client

from services.serve.apps import embedder_app, gateway_app, one_machine_app

pytestmark = pytest.mark.anyio


async def test_the_embedder_serves_the_configured_bundle_and_vector_settings(
        cbir_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_PCA_DIMS", "8")
    async with asgi_client(embedder_app()) as client:
        info = (await client.get("/info")).json()
    assert info["pca_dims"] == 8 and info["dims"] == 8 + len(info["classes"])
    assert info["model_version"] == f"{info['bundle']['version']}-d8-w{info['onehot_weight']:g}"


async def test_the_gateway_serves_an_index_and_builds_none(cbir_env: Path, indexed_state: Path) -> None:
    async with asgi_client(gateway_app()) as client:
        health = (await client.get("/healthz")).json()
    assert health["status"] in ("ready", "warming_up") and health["documents"] == 500
    (indexed_state / "serving.json").unlink()
    (indexed_state / "index.npz").unlink()
    async with asgi_client(gateway_app()) as client:
        empty = await client.get("/healthz")
    assert empty.status_code == 503 and empty.json()["status"] == "empty"  # not "indexing": it never indexes


async def test_serve_without_indexing_leaves_an_empty_state_empty(cbir_env: Path) -> None:
    async with asgi_client(one_machine_app(index=False)) as client:
        health = await client.get("/healthz")
        collection = (await client.get("/collection")).json()
    assert health.status_code == 503 and health.json()["status"] == "empty"
    assert collection["documents"] == 0 and collection["indexed"] is None
    assert not (cbir_env / "index.npz").exists()
