"""Faults survived: embedder down or slow, store missing or broken, indexer killed, bad files,
a broken model bundle, a crash in the middle of saving the index.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
from factories import BUNDLE_DAMAGES, copy_bundle, copy_collection, damage_bundle, make_documents
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from processes import free_port, python_path, read_index, start_cbir, stop_process, subprocess_env
from servers import StallingServer, asgi_client, serve_in_thread

from services.common.collection import iter_images
from services.common.errors import BundleError
from services.common.stores.faiss import FaissStore

pytestmark = pytest.mark.anyio

EMBEDDER_TIMEOUT_S = 0.5
EMBEDDER_RETRIES = 1
# every attempt times out, plus the back-off between them, plus slack for a loaded CI machine
WORST_CASE_S = (EMBEDDER_RETRIES + 1) * EMBEDDER_TIMEOUT_S + 0.25 + 2.0


@pytest.fixture
def gateway_factory(indexed_state: Path, monkeypatch: pytest.MonkeyPatch):
    """Build the search gateway against an embedder at `url` (the index is already built)."""
    from services.serve.apps import gateway_app

    @asynccontextmanager
    async def gateway(url: str) -> AsyncIterator[httpx.AsyncClient]:
        monkeypatch.setenv("CBIR_EMBEDDER_URL", url)
        monkeypatch.setenv("CBIR_EMBEDDER_TIMEOUT_S", str(EMBEDDER_TIMEOUT_S))
        monkeypatch.setenv("CBIR_EMBEDDER_RETRIES", str(EMBEDDER_RETRIES))
        async with asgi_client(gateway_app()) as client:
            yield client

    return gateway


async def timed_search(client: httpx.AsyncClient, image: bytes) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    with anyio.fail_after(30):
        response = await client.post("/search", files={"file": ("q.jpg", image, "image/jpeg")})
    return response, time.perf_counter() - started


def assert_unavailable(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, detail


# --- (a) the embedder down, slow, or not an embedder -------------------------------------------


async def test_embedder_down_is_503_and_the_gateway_recovers_by_itself(gateway_factory, test_image: bytes) -> None:
    from services.serve.apps import embedder_app

    port = free_port()  # nothing listens here yet
    async with gateway_factory(f"http://127.0.0.1:{port}") as gateway:
        response, seconds = await timed_search(gateway, test_image)
        assert_unavailable(response, "unavailable", "ConnectError")
        assert seconds < WORST_CASE_S
        assert (await gateway.get("/healthz")).status_code == 503

        with serve_in_thread(embedder_app(), port=port):  # the embedder comes up
            response, _ = await timed_search(gateway, test_image)
            assert response.status_code == 200, response.text
            assert len(response.json()["hits"]) == 10
            assert (await gateway.get("/healthz")).status_code == 200

        response, seconds = await timed_search(gateway, test_image)  # ... goes away again
        assert_unavailable(response, "unavailable")
        assert seconds < WORST_CASE_S

        with serve_in_thread(embedder_app(), port=port):  # ... and comes back
            response, _ = await timed_search(gateway, test_image)
            assert response.status_code == 200, response.text


@pytest.mark.slow  # waits out the gateway's embedder timeout
@pytest.mark.parametrize("mode", ["silent", "trickle"])
async def test_slow_embedder_is_503_within_the_timeout(gateway_factory, test_image: bytes, mode: str) -> None:
    with StallingServer(mode=mode) as slow:
        async with gateway_factory(slow.url) as gateway:
            response, seconds = await timed_search(gateway, test_image)
            assert_unavailable(response, "unavailable")
            assert seconds < WORST_CASE_S, f"{seconds:.1f} s against a {mode} embedder"
            assert slow.connections >= 1


@pytest.mark.slow
async def test_concurrent_searches_do_not_queue_behind_a_slow_embedder(gateway_factory, test_image: bytes) -> None:
    # Readiness is checked once for all waiting requests, not once per request in turn.
    with StallingServer(mode="silent") as slow:
        async with gateway_factory(slow.url) as gateway:
            results: list[tuple[httpx.Response, float]] = []

            async def one() -> None:
                results.append(await timed_search(gateway, test_image))

            async with anyio.create_task_group() as group:
                for _ in range(8):
                    group.start_soon(one)
    for response, seconds in results:
        assert_unavailable(response, "unavailable")
        assert seconds < WORST_CASE_S, [round(s, 1) for _, s in results]


def not_an_embedder(kind: str) -> FastAPI:
    """Something else listening where the embedder should be."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def anything(path: str) -> object:
        if kind == "html":
            return HTMLResponse("<html>welcome to nginx</html>")
        if kind == "wrong-json":
            return JSONResponse({"hello": "world"})
        return JSONResponse({"detail": "Not Found"}, status_code=404)

    return app


@pytest.mark.parametrize(("kind", "words"), [("html", ["unexpected body", "CBIR_EMBEDDER_URL"]),
                                             ("wrong-json", ["unexpected body"]),
                                             ("not-found", ["404", "CBIR_EMBEDDER_URL"])])
async def test_something_else_at_the_embedder_url_is_503_not_500(gateway_factory, test_image: bytes, kind: str,
                                                                 words: list[str]) -> None:
    with serve_in_thread(not_an_embedder(kind)) as url:
        async with gateway_factory(url) as gateway:
            response, _ = await timed_search(gateway, test_image)
            assert_unavailable(response, *words)


async def test_embedder_refusing_the_gateway_is_not_blamed_on_the_client(
        gateway_factory, monkeypatch: pytest.MonkeyPatch, test_image: bytes) -> None:
    from services.serve.apps import embedder_app

    monkeypatch.setenv("CBIR_API_KEYS", '["embedder-only-key"]')
    embedder = embedder_app()
    monkeypatch.delenv("CBIR_API_KEYS")  # the gateway itself is open
    with serve_in_thread(embedder) as url:
        async with gateway_factory(url) as gateway:
            response, _ = await timed_search(gateway, test_image)
            assert_unavailable(response, "401")


# --- (b) the store missing, empty, mismatched or unreadable ------------------------------------


@pytest.fixture
def model_version(tiny_bundle) -> str:
    from services.embedder.runtime import Embedder

    return Embedder(tiny_bundle).model_version


async def write_index(path: Path, *, dims: int, model_version: str, documents: int) -> None:
    store = FaissStore(path)
    await store.open(dims=dims, model_version=model_version)
    await store.upsert(make_documents(documents, dims=dims, model_version=model_version))
    await store.flush()
    await store.close()


async def search_app_answers(image: bytes) -> tuple[httpx.Response, httpx.Response]:
    from services.serve.apps import gateway_app

    async with asgi_client(gateway_app()) as client:
        search, _ = await timed_search(client, image)
        return search, await client.get("/healthz")


async def test_missing_index_is_503_naming_the_fix(cbir_env: Path, test_image: bytes) -> None:
    search, health = await search_app_answers(test_image)
    assert_unavailable(search, "no index", "cbir index")
    assert_unavailable(health, "no index")


async def test_empty_index_is_503(cbir_env: Path, test_image: bytes, model_version: str) -> None:
    await write_index(cbir_env / "index.npz", dims=26, model_version=model_version, documents=0)
    search, health = await search_app_answers(test_image)
    assert_unavailable(search, "empty", "cbir index")
    assert health.status_code == 503


@pytest.mark.parametrize(("dims", "version", "words"), [(26, "another-model", "model version"),
                                                        (12, None, "12-dimensional")])
async def test_index_of_another_model_is_409(cbir_env: Path, test_image: bytes, model_version: str, dims: int,
                                             version: str | None, words: str) -> None:
    await write_index(cbir_env / "index.npz", dims=dims, model_version=version or model_version, documents=3)
    search, health = await search_app_answers(test_image)
    assert search.status_code == 409, search.text
    assert words in search.json()["detail"] and "--rebuild" in search.json()["detail"]
    assert health.status_code == 503


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
async def test_unreadable_index_is_503_not_a_traceback(cbir_env: Path, test_image: bytes, model_version: str,
                                                       damage: str) -> None:
    path = cbir_env / "index.npz"
    await write_index(path, dims=26, model_version=model_version, documents=5)
    data = path.read_bytes()
    path.write_bytes(b"this is no index" * 10 if damage == "garbage" else data[: len(data) // 2])
    search, health = await search_app_answers(test_image)
    assert_unavailable(search, "unreadable", "cbir index")
    assert health.status_code == 503


# --- (c) the indexer killed mid-run, then re-run -------------------------------------------------


@pytest.fixture
def thousand_images(tmp_path: Path, cifar10_dir: Path) -> Path:
    return copy_collection(cifar10_dir, tmp_path / "thousand", train=100)


@pytest.mark.slow
def test_indexer_killed_mid_run_loses_and_duplicates_nothing(
        thousand_images: Path, tiny_bundle_dir: Path, cbir_env: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from services.cli import main

    index_file, log = cbir_env / "index.npz", cbir_env.parent / "indexer.log"
    process = start_cbir("index", "--no-progress", "--batch-size", "8", "--concurrency", "1",
                         env=subprocess_env(tiny_bundle_dir, thousand_images, cbir_env), cwd=cbir_env.parent, log=log)
    try:
        deadline = time.monotonic() + 120
        while not (index_file.exists() and len(read_index(index_file)["ids"])):  # the first flush has landed
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the indexer wrote nothing in 120 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        stop_process(process)
    assert process.returncode == -signal.SIGKILL
    partial = anyio.run(stored_count, index_file)  # the index file's, and the writes logged beside it since
    assert 0 < partial < 1000, f"killed after {partial} images: not mid-run"

    monkeypatch.setenv("CBIR_DATA_DIR", str(thousand_images))
    with caplog.at_level(logging.INFO):
        main(["index", "--no-progress", "--batch-size", "64"])
    assert f"unchanged {partial}," in caplog.text

    arrays = read_index(index_file)
    ids = arrays["ids"].tolist()
    assert len(ids) == len(set(ids)) == 1000
    assert set(ids) == {image.id for image in iter_images(thousand_images, "train")}
    assert arrays["vectors"].shape == (1000, 26)
    np.testing.assert_allclose(np.linalg.norm(arrays["vectors"], axis=1), 1.0, atol=1e-3)


# --- (d) corrupt files in the collection --------------------------------------------------------


def test_corrupt_files_are_skipped_listed_and_the_run_goes_on(
        tmp_path: Path, mini_collection: Path, cbir_env: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from services.cli import main

    root = tmp_path / "collection"
    shutil.copytree(mini_collection / "train", root / "train")
    (root / "train" / "cat" / "zz-truncated.jpg").write_bytes((root / "train" / "cat" / "0000.jpg").read_bytes()[:200])
    (root / "train" / "dog" / "zz-empty.png").write_bytes(b"")
    (root / "train" / "frog" / "zz-text.png").write_text("not a frog")
    (root / "train" / "ship" / "zz-folder.jpg").mkdir()  # a folder, searched like any other: nothing in it
    (root / "train" / "ship" / "zz-dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    monkeypatch.setenv("CBIR_DATA_DIR", str(root))
    with caplog.at_level(logging.INFO):
        main(["index", "--no-progress"])
    skipped = sorted(line.split(": ")[0].removeprefix("skipped ") for line in caplog.messages
                     if line.startswith("skipped "))
    assert skipped == ["train/cat/zz-truncated.jpg", "train/dog/zz-empty.png", "train/frog/zz-text.png",
                       "train/ship/zz-dangling.jpg"]
    assert "indexed 500 " in caplog.text and "skipped 4 undecodable" in caplog.text
    assert len(read_index(cbir_env / "index.npz")["ids"]) == 500


# --- (e) a broken model bundle refuses to start ---------------------------------------------------

@pytest.fixture
def broken_bundle(request: pytest.FixtureRequest, tmp_path: Path, tiny_bundle_dir: Path, cbir_env: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Path:
    bundle = copy_bundle(tiny_bundle_dir, tmp_path / "bundle")
    damage_bundle(bundle, request.param)
    monkeypatch.setenv("CBIR_MODEL_DIR", str(bundle))
    return bundle


@pytest.mark.parametrize("broken_bundle", BUNDLE_DAMAGES, indirect=True)
async def test_services_refuse_to_start_on_a_broken_bundle(broken_bundle: Path) -> None:
    from services.serve.apps import embedder_app, gateway_app

    for build_app in (embedder_app, gateway_app):
        app = build_app()
        with pytest.raises(BundleError, match="cbir train"):
            async with app.router.lifespan_context(app):
                pass


@pytest.mark.parametrize("broken_bundle", BUNDLE_DAMAGES, indirect=True)
def test_cbir_commands_exit_with_a_clear_message_on_a_broken_bundle(
        broken_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    from services.cli import main

    with pytest.raises(SystemExit) as exit_info, caplog.at_level(logging.ERROR):
        main(["index", "--no-progress"])
    assert exit_info.value.code == 2
    [error] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert str(broken_bundle) in error.getMessage() and "cbir train" in error.getMessage()
    assert error.exc_info is None  # a message, not a traceback


# --- (f) a crash in the middle of saving the index ------------------------------------------------


async def stored_ids(path: Path) -> list[str]:
    return read_index(path)["ids"].tolist()


async def stored_count(path: Path) -> int:
    """How many documents a store opening `path` holds: the index file's, and the writes its log holds."""
    arrays = read_index(path)
    store = FaissStore(path)
    await store.open(dims=arrays["vectors"].shape[1], model_version=str(arrays["model_version"]), create=False)
    return await store.count()


@pytest.fixture
async def saved_store(tmp_path: Path) -> tuple[FaissStore, Path, bytes]:
    """A store with 5 documents saved, then 5 more upserted but not yet saved."""
    path = tmp_path / "state" / "index.npz"
    await write_index(path, dims=8, model_version="v1", documents=5)
    store = FaissStore(path)
    await store.open(dims=8, model_version="v1")
    await store.upsert(make_documents(5, dims=8, seed=1, prefix="new"))
    return store, path, path.read_bytes()


def assert_previous_index_intact(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    assert read_index(path)["ids"].tolist() == [f"doc-{i:04d}" for i in range(5)]
    # No temporary file left behind; only the writer's lock file and the write log (the unsaved upserts) stay.
    assert sorted(p.name for p in path.parent.iterdir()) == ["index.npz", "index.npz.00000001.log", "index.npz.lock"]


async def test_failure_while_writing_leaves_the_previous_index(saved_store, monkeypatch: pytest.MonkeyPatch) -> None:
    store, path, before = saved_store

    def disk_full(file, **arrays) -> None:
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        await store.flush()
    assert_previous_index_intact(path, before)
    monkeypatch.undo()
    await store.flush()  # the next save goes through
    assert len(await stored_ids(path)) == 10


async def test_failure_while_renaming_leaves_the_previous_index(saved_store,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store, path, before = saved_store

    def cross_device(source, target) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", cross_device)
    with pytest.raises(OSError, match="cross-device"):
        await store.flush()
    monkeypatch.undo()
    assert_previous_index_intact(path, before)
    reopened = FaissStore(path)
    await reopened.open(dims=8, model_version="v1", create=False)
    assert await reopened.count() == 10  # the index file's 5, and the 5 upserts its log holds


KILLED_WHILE_SAVING = textwrap.dedent("""
    import asyncio, os, sys, time
    import numpy as np
    from pathlib import Path
    from factories import make_documents
    from services.common.stores.faiss import FaissStore

    path, marker = Path(sys.argv[1]), Path(sys.argv[2])
    def stall(source, target):  # the new file is written but not yet renamed
        marker.write_text("saving")
        time.sleep(60)
    os.replace = stall

    async def main():
        store = FaissStore(path)
        await store.open(dims=8, model_version="v1")
        await store.upsert(make_documents(5, dims=8, seed=1, prefix="new"))
        await store.flush()
    asyncio.run(main())
""")


async def test_process_killed_while_saving_leaves_the_previous_index(tmp_path: Path) -> None:
    path, marker = tmp_path / "state" / "index.npz", tmp_path / "saving"
    await write_index(path, dims=8, model_version="v1", documents=5)
    before = path.read_bytes()
    process = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_SAVING, str(path), str(marker)],
                               env={**os.environ, "PYTHONPATH": python_path()})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None, "the saving process died on its own"
            assert time.monotonic() < deadline
            await anyio.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        stop_process(process)
    assert path.read_bytes() == before
    leftovers = [p.name for p in path.parent.iterdir()
                 if p.name not in ("index.npz", "index.npz.lock") and not p.name.endswith(".log")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the half-written file never replaced it
    reopened = FaissStore(path)
    await reopened.open(dims=8, model_version="v1", create=False)
    assert await reopened.count() == 10  # the index file's 5, and the 5 upserts its log holds
