"""`cbir serve`: the server answers while its lifespan indexes in the background, reports the progress
in one status vocabulary, becomes ready by itself, and stops cleanly mid-run keeping what it wrote."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from reliability_fixtures import asgi_client, free_port, read_index, stop_process, subprocess_env

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


# --- the real command, as a user starts it -----------------------------------------------------------


@pytest.fixture(scope="module")
def larger_collection(tmp_path_factory: pytest.TempPathFactory, cifar10_dir: Path) -> Path:
    """300 train images per class: with batches of 4, indexing takes long enough to be watched."""
    root = tmp_path_factory.mktemp("larger")
    for class_dir in sorted((cifar10_dir / "train").iterdir()):
        target = root / "train" / class_dir.name
        target.mkdir(parents=True)
        for source in sorted(class_dir.iterdir())[:300]:
            shutil.copyfile(source, target / source.name)
    return root


def start_serve(tmp_path: Path, bundle: Path, collection: Path) -> tuple[subprocess.Popen, str, Path]:
    port, log = free_port(), tmp_path / "serve.log"
    env = subprocess_env(bundle, collection, tmp_path / "state", CBIR_INDEX_BATCH_SIZE="4",
                         CBIR_INDEX_CONCURRENCY="1")
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--port", str(port)], env=env,
                                   cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", log


def poll_health(url: str, process: subprocess.Popen, log: Path, *, until, timeout_s: float = 120.0) -> list[dict]:
    """Every /healthz answer (status code folded into the body) until `until(body)` holds."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            response = httpx.get(f"{url}/healthz", timeout=5)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        seen.append({"code": response.status_code, **response.json()})
        if until(seen[-1]):
            return seen
        time.sleep(0.02)
    pytest.fail(f"no /healthz answer satisfied the condition; last {seen[-3:]}\n{log.read_text()[-3000:]}")


def test_serve_answers_at_once_and_becomes_ready_by_itself(tmp_path: Path, tiny_bundle_dir: Path,
                                                           larger_collection: Path) -> None:
    started = time.monotonic()
    process, url, log = start_serve(tmp_path, tiny_bundle_dir, larger_collection)
    try:
        first = poll_health(url, process, log, until=lambda body: True, timeout_s=30)
        assert time.monotonic() - started < 30
        seen = first + poll_health(url, process, log, until=lambda body: body["status"] == "ready")
        page = httpx.get(f"{url}/", timeout=5)
    finally:
        stop_process(process)
    indexing = [body for body in seen if body["status"] == "indexing"]
    assert indexing, seen[:3]  # the server answered while it indexed
    assert all(body["code"] == 503 for body in indexing)
    counts = [body["indexed"] for body in indexing if body.get("total")]
    assert counts == sorted(counts) and all(0 <= n <= 3000 for n in counts)
    assert {body["total"] for body in indexing if body.get("total")} <= {3000}
    assert seen[-1]["code"] == 200 and seen[-1]["documents"] == 3000
    assert page.status_code == 200
    assert process.returncode == 0 and "Traceback" not in log.read_text()


def test_sigterm_during_indexing_stops_cleanly_and_keeps_what_was_written(tmp_path: Path, tiny_bundle_dir: Path,
                                                                          larger_collection: Path) -> None:
    process, url, log = start_serve(tmp_path, tiny_bundle_dir, larger_collection)
    try:
        poll_health(url, process, log, until=lambda body: body["status"] == "indexing" and body["indexed"] >= 400)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        stop_process(process)
    output = log.read_text()
    assert process.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert "stopped: every resource closed" in output
    kept = len(read_index(tmp_path / "state" / "index.npz")["ids"])
    assert 400 <= kept < 3000  # everything up to the signal, saved on the way out; not the whole run
    assert np.unique(read_index(tmp_path / "state" / "index.npz")["ids"]).size == kept
