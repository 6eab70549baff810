"""Switching CBIR_BACKEND changes nothing in the API's responses: the same upload gets the same hits
and scores from the embedded FAISS store and from Elasticsearch (the HTTP double) in exact mode, and in
kNN mode (approximate per shard) at least 95% of the same hits, scored alike.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from es_double import EsDouble
from servers import asgi_client

from services.cli import main as cbir

pytestmark = pytest.mark.anyio


async def search_all(queries: list[bytes]) -> list[dict]:
    from services.serve.apps import gateway_app

    async with asgi_client(gateway_app(), base_url="http://search") as client:
        responses = [await client.post("/search", params={"k": 20}, files={"file": ("q.jpg", q, "image/jpeg")})
                     for q in queries]
        health = await client.get("/healthz")
    assert health.status_code == 200, health.text
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


def comparable(body: dict) -> list[tuple]:
    return [(hit["id"], hit["filename"], hit["label"], hit["image_url"], round(hit["score"], 4))
            for hit in body["hits"]]


async def embedded_and_clustered(queries: list[bytes], es_double: EsDouble, monkeypatch: pytest.MonkeyPatch,
                                 mode: str) -> tuple[list[dict], list[dict]]:  # fmt: skip
    await asyncio.to_thread(cbir, ["index", "--no-progress"])  # the CLI runs its own event loop
    embedded = await search_all(queries)
    for name, value in (("CBIR_BACKEND", "elasticsearch"), ("CBIR_ES_URL", es_double.url),
                        ("CBIR_ES_INDEX", "cbir-parity"), ("CBIR_ES_SEARCH_MODE", mode),
                        ("CBIR_ES_TIMEOUT_S", "5")):
        monkeypatch.setenv(name, value)
    await asyncio.to_thread(cbir, ["index", "--no-progress"])
    return embedded, await search_all(queries)


def upload_queries(mini_collection: Path) -> list[bytes]:
    return [(mini_collection / "test" / label / "0001.jpg").read_bytes() for label in ("cat", "ship", "frog")]


async def test_elasticsearch_exact_backend_answers_like_the_embedded_store(
        cbir_env: Path, mini_collection: Path, es_double: EsDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    embedded, clustered = await embedded_and_clustered(upload_queries(mini_collection), es_double, monkeypatch, "exact")
    for ours, theirs in zip(embedded, clustered, strict=True):
        assert ours["query"] == theirs["query"]
        assert comparable(ours) == comparable(theirs)
        # The visual similarity, read off each store's float32 score, agrees too.
        assert [hit["similarity"] for hit in theirs["hits"]] == pytest.approx(
            [hit["similarity"] for hit in ours["hits"]], abs=1e-5)


async def test_elasticsearch_knn_backend_recalls_the_embedded_stores_hits(
        cbir_env: Path, mini_collection: Path, es_double: EsDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    embedded, clustered = await embedded_and_clustered(upload_queries(mini_collection), es_double, monkeypatch, "knn")
    for ours, theirs in zip(embedded, clustered, strict=True):
        assert ours["query"] == theirs["query"]
        exact = {hit[0]: hit for hit in comparable(ours)}
        approximate = comparable(theirs)
        shared = [hit for hit in approximate if hit[0] in exact]
        assert len(approximate) == len(exact) and len(shared) >= 0.95 * len(exact)
        assert all(hit == exact[hit[0]] for hit in shared)  # same documents, same scores


async def test_elasticsearch_partial_results_are_a_503_with_retry_after_at_the_gateway(
        cbir_env: Path, mini_collection: Path, es_double: EsDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.serve.apps import gateway_app

    for name, value in (("CBIR_BACKEND", "elasticsearch"), ("CBIR_ES_URL", es_double.url),
                        ("CBIR_ES_INDEX", "cbir-partial"), ("CBIR_ES_TIMEOUT_S", "5")):
        monkeypatch.setenv(name, value)
    await asyncio.to_thread(cbir, ["index", "--no-progress"])
    query = {"file": ("q.jpg", (mini_collection / "test" / "cat" / "0001.jpg").read_bytes(), "image/jpeg")}
    async with asgi_client(gateway_app(), base_url="http://search") as client:
        assert (await client.post("/search", files=query)).status_code == 200
        es_double.break_shards(5)
        search = await client.post("/search", files=query)
        assert search.status_code == 503 and search.headers["retry-after"], search.text
        assert "1 of 30 shards failed (shard 5: circuit_breaking_exception" in search.json()["detail"]
        es_double.broken_shards.clear()
        assert (await client.post("/search", files=query)).status_code == 200


async def test_the_gateway_answers_503_when_elasticsearch_goes_away_and_recovers(
        cbir_env: Path, mini_collection: Path, es_double: EsDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.serve.apps import gateway_app

    for name, value in (("CBIR_BACKEND", "elasticsearch"), ("CBIR_ES_URL", es_double.url),
                        ("CBIR_ES_INDEX", "cbir-away"), ("CBIR_ES_TIMEOUT_S", "2"), ("CBIR_ES_MAX_RETRIES", "0")):
        monkeypatch.setenv(name, value)
    await asyncio.to_thread(cbir, ["index", "--no-progress"])
    query = {"file": ("q.jpg", (mini_collection / "test" / "cat" / "0001.jpg").read_bytes(), "image/jpeg")}
    async with asgi_client(gateway_app(), base_url="http://search") as client:
        assert (await client.post("/search", files=query)).status_code == 200
        es_double.go_down()  # connection refused from now on, mid-run
        search = await client.post("/search", files=query)
        assert search.status_code == 503 and search.headers["retry-after"], search.text
        assert es_double.url.removeprefix("http://") in search.json()["detail"]
        health = await client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "failed"
