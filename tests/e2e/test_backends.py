"""Switching CBIR_BACKEND changes nothing in the API's responses: the same upload gets the same hits
and scores from the embedded FAISS store and from Elasticsearch (the HTTP double), in both ES modes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from es_double import EsDouble
from reliability_fixtures import asgi_client

from services.cli import main as cbir

pytestmark = pytest.mark.anyio


async def search_all(queries: list[bytes]) -> list[dict]:
    from services.search.app import create_app

    async with asgi_client(create_app(), base_url="http://search") as client:
        responses = [await client.post("/search", params={"k": 20}, files={"file": ("q.jpg", q, "image/jpeg")})
                     for q in queries]
        health = await client.get("/healthz")
    assert health.status_code == 200, health.text
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


def comparable(body: dict) -> list[tuple]:
    return [(hit["id"], hit["filename"], hit["label"], hit["image_url"], round(hit["score"], 4))
            for hit in body["hits"]]


@pytest.mark.parametrize("mode", ["exact", "knn"])
async def test_elasticsearch_backend_answers_like_the_embedded_store(
        cbir_env: Path, mini_collection: Path, es_double: EsDouble, monkeypatch: pytest.MonkeyPatch,
        mode: str) -> None:
    queries = [(mini_collection / "test" / label / "0001.jpg").read_bytes() for label in ("cat", "ship", "frog")]
    await asyncio.to_thread(cbir, ["index", "--no-progress"])  # the CLI runs its own event loop
    embedded = await search_all(queries)

    for name, value in (("CBIR_BACKEND", "elasticsearch"), ("CBIR_ES_URL", es_double.url),
                        ("CBIR_ES_INDEX", "cbir-parity"), ("CBIR_ES_SEARCH_MODE", mode),
                        ("CBIR_ES_TIMEOUT_S", "5")):
        monkeypatch.setenv(name, value)
    await asyncio.to_thread(cbir, ["index", "--no-progress"])  # the CLI runs its own event loop
    clustered = await search_all(queries)

    for ours, theirs in zip(embedded, clustered, strict=True):
        assert ours["query"] == theirs["query"]
        assert comparable(ours) == comparable(theirs)


async def test_the_gateway_answers_503_when_elasticsearch_goes_away_and_recovers(
        cbir_env: Path, mini_collection: Path, es_double: EsDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.search.app import create_app

    for name, value in (("CBIR_BACKEND", "elasticsearch"), ("CBIR_ES_URL", es_double.url),
                        ("CBIR_ES_INDEX", "cbir-away"), ("CBIR_ES_TIMEOUT_S", "2"), ("CBIR_ES_MAX_RETRIES", "0")):
        monkeypatch.setenv(name, value)
    await asyncio.to_thread(cbir, ["index", "--no-progress"])
    query = {"file": ("q.jpg", (mini_collection / "test" / "cat" / "0001.jpg").read_bytes(), "image/jpeg")}
    async with asgi_client(create_app(), base_url="http://search") as client:
        assert (await client.post("/search", files=query)).status_code == 200
        es_double.go_down()  # connection refused from now on, mid-run
        search = await client.post("/search", files=query)
        assert search.status_code == 503 and search.headers["retry-after"], search.text
        assert es_double.url.removeprefix("http://") in search.json()["detail"]
        health = await client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "failed"
