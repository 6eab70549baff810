"""The HTTP embedder client: large batches are split, API keys are sent, refusals are clear, and /info says
what the local model's info says (the model, its vector settings, how to decode)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from services.common.embedding import HttpEmbeddingClient
from services.common.errors import EmbedderUnavailableError
from services.embedder.bundle import Bundle
from services.embedder.runtime import Embedder

pytestmark = pytest.mark.anyio


@pytest.fixture
async def guarded_embedder(cbir_env: Path, monkeypatch: pytest.MonkeyPatch):
    from services.serve.apps import embedder_app

    monkeypatch.setenv("CBIR_API_KEYS", '["s3cret-key"]')
    app = embedder_app()
    async with app.router.lifespan_context(app):
        yield app


async def test_batches_over_the_request_limit_are_split_and_keys_sent(guarded_embedder) -> None:
    client = HttpEmbeddingClient("http://embedder", api_key="s3cret-key",
                                 transport=httpx.ASGITransport(app=guarded_embedder))
    client.max_images_per_request = 16
    images = np.random.default_rng(0).integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    embeddings = await client.embed(images)
    assert len(embeddings) == 40
    single = await client.embed(images[37:38])
    np.testing.assert_allclose(embeddings[37].vector, single[0].vector, atol=1e-5)
    await client.close()


async def test_missing_key_is_an_unavailable_embedder_not_a_user_error(guarded_embedder) -> None:
    client = HttpEmbeddingClient("http://embedder", transport=httpx.ASGITransport(app=guarded_embedder))
    with pytest.raises(EmbedderUnavailableError, match="401"):
        await client.embed(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    await client.close()


async def test_info_over_http_is_the_local_models_info_and_a_body_lacking_a_field_is_refused(
        embedder_client: httpx.AsyncClient, tiny_bundle: Bundle) -> None:
    body = (await embedder_client.get("/info")).json()
    assert (body["image_size"], body["resize"]) == (32, "lanczos")
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    client = HttpEmbeddingClient("http://embedder", transport=transport)
    info = await client.info()
    await client.close()
    assert info == Embedder(tiny_bundle, device="cpu").info()  # every field, the bundle's record included
    assert info.bundle_version == tiny_bundle.version and info.metadata == tiny_bundle.metadata
    for field in ("image_size", "pca_dims", "bundle"):
        lacking = {key: value for key, value in body.items() if key != field}
        transport = httpx.MockTransport(lambda request, answer=lacking: httpx.Response(200, json=answer))
        client = HttpEmbeddingClient("http://embedder", transport=transport)
        with pytest.raises(EmbedderUnavailableError, match="answered /info with an unexpected body"):
            await client.info()
        await client.close()
