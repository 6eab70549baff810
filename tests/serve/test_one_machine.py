"""The one-machine app of `cbir serve` (services/serve/one_machine.py), in-process: it answers while its lifespan
indexes in the background, reports the progress in one status vocabulary, becomes ready by itself, cancels the
run before it closes the store, and swaps to a new model's index built while the old one serves."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from servers import asgi_client

from services.common.errors import CollectionError
from services.common.status import IndexProgress
from services.search.app import create_app
from services.search.engine import IndexingJob, SearchEngine
from services.serve import apps
from services.serve.one_machine import OneMachine, OneMachineSettings

pytestmark = pytest.mark.anyio


def one_machine_app(job: IndexingJob | None = None) -> FastAPI:
    """`cbir serve`'s app, or with `job` the same parts running that job in the background instead."""
    one_machine = OneMachine(OneMachineSettings.load())
    if job is None:
        return apps.one_machine_app(one_machine.settings)
    return create_app(one_machine.settings, embedder_factory=one_machine.load_embedder,
                      store_factory=one_machine.build_store, background=job)


async def wait_until(client: httpx.AsyncClient, status: str, *, timeout_s: float = 60.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while (health := await client.get("/healthz")).json()["status"] != status:
        assert time.monotonic() < deadline, health.text
        await asyncio.sleep(0.05)
    return health


async def test_healthz_and_search_report_progress_then_ready_by_itself(cbir_env: Path, test_image: bytes) -> None:
    release = asyncio.Event()

    async def held_indexing(engine: SearchEngine, progress: IndexProgress) -> None:
        progress.total, progress.indexed = 500, 120  # where a run would stand; then the real run
        await release.wait()
        await OneMachine(OneMachineSettings.load()).index(engine, progress)

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
    async def failing(engine: SearchEngine, progress: IndexProgress) -> None:
        raise CollectionError("the collection root /nowhere is not a directory")

    async with asgi_client(one_machine_app(failing)) as client:
        health = await wait_until(client, "failed")
        assert health.status_code == 503
        assert health.json()["detail"] == "indexing failed: the collection root /nowhere is not a directory"
        search = await client.post("/search", files={"file": ("q.jpg", test_image, "image/jpeg")})
        assert search.status_code == 503 and search.json()["status"] == "failed"
        assert (await client.get("/")).status_code == 200


async def test_shutdown_cancels_indexing_before_closing_the_store(cbir_env: Path) -> None:
    from services.common.stores.faiss import FaissStore

    events: list[str] = []

    class RecordingStore(FaissStore):
        async def close(self) -> None:
            events.append("store closed")
            await super().close()

    async def endless(engine: SearchEngine, progress: IndexProgress) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            events.append("indexing stopped")

    one_machine = OneMachine(OneMachineSettings.load())
    app = create_app(one_machine.settings, embedder_factory=one_machine.load_embedder,
                     store_factory=lambda: RecordingStore(one_machine.settings.faiss_path), background=endless)
    async with asgi_client(app) as client:
        assert (await client.get("/healthz")).json()["status"] == "indexing"
    assert events == ["indexing stopped", "store closed"]


async def test_serve_without_a_collection_is_up_and_failed(cbir_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setenv("CBIR_DATA_DIR", str(tmp_path / "missing"))
    async with asgi_client(one_machine_app()) as client:
        health = await wait_until(client, "failed")
        assert health.status_code == 503
        assert health.json()["detail"].startswith("indexing failed: ")
        assert str(tmp_path / "missing") in health.json()["detail"]  # it names the folder to fix


async def test_a_new_model_is_indexed_while_the_old_one_serves_then_both_swap_at_once(
        cbir_env: Path, test_image: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cbir serve` with another model (here: the same bundle at other PCA dims, so another vector space) goes
    on answering with the recorded model while the new index is built; every answer holds one model version;
    an upload and a deletion made meanwhile are carried over; the new pair is recorded, the old index removed."""
    import json

    async with asgi_client(one_machine_app(), base_url="http://127.0.0.1") as client:
        old = (await wait_until(client, "ready")).json()
    record = json.loads((cbir_env / "serving.json").read_text())
    assert record["model_version"] == old["model_version"] and record["index"] == "index.npz"

    monkeypatch.setenv("CBIR_PCA_DIMS", "8")
    release = asyncio.Event()
    real_indexing = OneMachine._index_collection

    async def held(*args: object, **kwargs: object) -> object:
        await release.wait()  # the writes below happen while the new index is being built
        return await real_indexing(*args, **kwargs)

    monkeypatch.setattr(OneMachine, "_index_collection", held)
    files = {"file": ("q.jpg", test_image, "image/jpeg")}
    async with asgi_client(one_machine_app(), base_url="http://127.0.0.1") as client:
        serving = (await client.get("/healthz")).json()
        assert serving["status"] == "ready" and serving["model_version"] == old["model_version"]
        added = (await client.post("/images", files={"file": ("mine.png", test_image, "image/jpeg")})).json()
        hits = (await client.post("/search", params={"k": 2}, files=files)).json()["hits"]
        doomed = next(hit["id"] for hit in hits if hit["id"] != added["id"])  # a collection image
        assert (await client.delete(f"/images/{doomed}")).status_code == 204
        versions: list[str] = []

        async def search_loop() -> None:
            while not versions or versions[-1] == old["model_version"]:
                response = await client.post("/search", params={"k": 5}, files=files)
                assert response.status_code == 200, response.text
                body = response.json()
                versions.append(body["model_version"])
                assert len(body["hits"]) == 5 and doomed not in {hit["id"] for hit in body["hits"]}

        release.set()
        await asyncio.wait_for(search_loop(), timeout=120)
        new_version = versions[-1]
        assert versions[0] == old["model_version"] and new_version != old["model_version"]
        assert set(versions) == {old["model_version"], new_version}
        meta = (await client.get(f"/images/{added['id']}/meta")).json()
        assert meta["model_version"] == new_version and meta["source"] == "upload"
        assert (await client.get(f"/images/{doomed}/meta")).status_code == 404
        collection = (await client.get("/collection")).json()
        assert collection["documents"] == 500 and collection["sources"]["upload"] == 1
    record = json.loads((cbir_env / "serving.json").read_text())
    assert record["model_version"] == new_version and record["index"] != "index.npz" and record["pca_dims"] == 8
    assert (cbir_env / record["index"]).is_file() and not (cbir_env / "index.npz").exists()
    async with asgi_client(one_machine_app(), base_url="http://127.0.0.1") as client:  # a restart serves the new pair
        restarted = (await client.get("/healthz")).json()
        assert restarted["status"] == "ready" and restarted["model_version"] == new_version


async def test_cbir_index_rebuild_builds_beside_the_served_index_and_a_running_server_swaps_to_it(
        cbir_env: Path, test_image: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from services.cli import main

    files = {"file": ("q.jpg", test_image, "image/jpeg")}
    async with asgi_client(one_machine_app(), base_url="http://127.0.0.1") as client:
        old = (await wait_until(client, "ready")).json()["model_version"]
        monkeypatch.setenv("CBIR_PCA_DIMS", "8")  # `cbir index --rebuild` in another shell, with another model
        rebuilt = asyncio.create_task(asyncio.to_thread(main, ["index", "--rebuild", "--no-progress"]))
        versions = []
        while not versions or versions[-1] == old:
            response = await client.post("/search", params={"k": 3}, files=files)
            assert response.status_code == 200, response.text  # served all along
            versions.append(response.json()["model_version"])
            await asyncio.sleep(0.05)
            assert len(versions) < 2000, "the server never swapped"
        await rebuilt
        record = json.loads((cbir_env / "serving.json").read_text())
        assert versions[-1] == record["model_version"] != old and set(versions) == {old, versions[-1]}
        assert (await client.get("/healthz")).json()["documents"] == 500
    assert not (cbir_env / "index.npz").exists() and (cbir_env / record["index"]).is_file()


async def test_a_failed_run_beside_a_serving_index_keeps_search_up_and_collection_says_why(
        cbir_env: Path, test_image: bytes) -> None:
    async with asgi_client(one_machine_app()) as client:
        await wait_until(client, "ready")

    async def failing_update(engine: SearchEngine, progress: IndexProgress) -> None:
        raise CollectionError("the collection root /gone is not a directory")

    async with asgi_client(one_machine_app(failing_update)) as client:  # the index is there and servable
        deadline = time.monotonic() + 30
        while (collection := (await client.get("/collection")).json())["last_indexing_error"] is None:
            assert time.monotonic() < deadline, collection
            await asyncio.sleep(0.02)
        assert collection["last_indexing_error"] == "indexing failed: the collection root /gone is not a directory"
        assert (await client.get("/healthz")).json()["status"] == "ready"
        search = await client.post("/search", files={"file": ("q.jpg", test_image, "image/jpeg")})
        assert search.status_code == 200
