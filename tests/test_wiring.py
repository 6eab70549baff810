"""The one-machine app of `cbir serve` (services/wiring.py), in-process: it answers while its lifespan
indexes in the background, reports the progress in one status vocabulary, becomes ready by itself,
and cancels the run before it closes the store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from reliability_fixtures import asgi_client

from services.common.errors import CollectionError
from services.common.status import IndexProgress

pytestmark = pytest.mark.anyio


def one_machine_app(job=None):
    from services.search.app import create_app
    from services.wiring import OneMachineSettings, create_one_machine_app

    if job is None:
        return create_one_machine_app(OneMachineSettings.load())
    return create_app(OneMachineSettings.load(), background=job)


async def wait_until(client: httpx.AsyncClient, status: str, *, timeout_s: float = 60.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while (health := await client.get("/healthz")).json()["status"] != status:
        assert time.monotonic() < deadline, health.text
        await asyncio.sleep(0.05)
    return health


async def test_healthz_and_search_report_progress_then_ready_by_itself(cbir_env: Path, test_image: bytes) -> None:
    from services.wiring import OneMachineSettings, index_configured_collection

    release = asyncio.Event()

    async def held_indexing(embedder, store, progress: IndexProgress) -> None:
        progress.total, progress.indexed = 500, 120  # where a run would stand; then the real run
        await release.wait()
        await index_configured_collection(OneMachineSettings.load(), embedder, store, progress)

    async with asgi_client(one_machine_app(held_indexing)) as client:
        health = await client.get("/healthz")
        assert health.status_code == 503 and health.headers["retry-after"]
        assert health.json() == {"status": "indexing", "indexed": 120, "total": 500,
                                 "detail": "indexing the collection: 120 of 500 images (24%)"}
        search = await client.post("/search", files={"file": ("q.jpg", test_image, "image/jpeg")})
        assert search.status_code == 503 and search.headers["retry-after"]
        assert search.json() == health.json()
        page = await client.get("/")
        assert page.status_code == 200 and "/healthz" in page.text
        release.set()
        ready = await wait_until(client, "ready")
        assert ready.status_code == 200 and ready.json()["documents"] == 500
        hits = await client.post("/search", files={"file": ("q.jpg", test_image, "image/jpeg")})
        assert hits.status_code == 200 and len(hits.json()["hits"]) == 10


async def test_a_failed_indexing_run_leaves_the_server_up_and_says_why(cbir_env: Path, test_image: bytes) -> None:
    async def failing(embedder, store, progress: IndexProgress) -> None:
        raise CollectionError("the collection root /nowhere is not a directory")

    async with asgi_client(one_machine_app(failing)) as client:
        health = await wait_until(client, "failed")
        assert health.status_code == 503
        assert health.json()["detail"] == "indexing failed: the collection root /nowhere is not a directory"
        search = await client.post("/search", files={"file": ("q.jpg", test_image, "image/jpeg")})
        assert search.status_code == 503 and search.json()["status"] == "failed"
        assert (await client.get("/")).status_code == 200


async def test_shutdown_cancels_indexing_before_closing_the_store(cbir_env: Path) -> None:
    from services.common.stores.faiss_store import FaissStore
    from services.search.app import create_app
    from services.wiring import OneMachineSettings

    events: list[str] = []

    class RecordingStore(FaissStore):
        async def close(self) -> None:
            events.append("store closed")
            await super().close()

    async def endless(embedder, store, progress: IndexProgress) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            events.append("indexing stopped")

    settings = OneMachineSettings.load()
    app = create_app(settings, store_factory=lambda: RecordingStore(settings.faiss_path), background=endless)
    async with asgi_client(app) as client:
        assert (await client.get("/healthz")).json()["status"] == "indexing"
    assert events == ["indexing stopped", "store closed"]


async def test_serve_without_a_collection_is_up_and_failed(cbir_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setenv("CBIR_DATA_DIR", str(tmp_path / "missing"))
    async with asgi_client(one_machine_app()) as client:
        health = await wait_until(client, "failed")
        assert "is not a directory" in health.json()["detail"] and "CBIR_DATA_DIR" not in health.json()["status"]


def test_the_faiss_store_searches_with_the_configured_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    from services.common.settings import StoreSettings
    from services.common.stores.faiss_store import FaissStore
    from services.wiring import build_store

    before = faiss.omp_get_max_threads()
    try:
        for threads in (2, 1):
            monkeypatch.setenv("CBIR_FAISS_THREADS", str(threads))
            store = build_store(StoreSettings.load())
            assert isinstance(store, FaissStore) and faiss.omp_get_max_threads() == threads
    finally:
        faiss.omp_set_num_threads(before)
