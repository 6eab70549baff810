"""Watched folders composed (services/serve/watching.py), with the tiny model: `cbir serve --watch DIR` makes an
added image searchable and a removed one no hit, after its own background run, and lists the folder in
`/collection`; `cbir index DIR --watch` does the same as a writer beside a gateway on Elasticsearch."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest
from es_double import EsDouble
from fakes import poll_until
from servers import asgi_client

from services.common.collection import CollectionImage, Layout
from services.common.errors import ConfigError
from services.common.settings import Backend
from services.indexer.pipeline import IndexOptions
from services.indexer.settings import IndexerSettings
from services.indexer.watch import WatchState
from services.search.settings import SearchSettings
from services.serve import apps
from services.serve.one_machine import OneMachineSettings
from services.serve.watching import watch_into_store

pytestmark = pytest.mark.anyio
FAST = {"watch_settle_ms": 100, "watch_max_batch_ms": 1000, "watch_retry_ms": 100}


def image_id(folder: Path, relative: str) -> str:
    return CollectionImage.from_relative(str(folder.resolve()), relative, None).id


async def hit_ids(client: httpx.AsyncClient, image: bytes) -> set[str]:
    response = await client.post("/search", params={"k": 20}, files={"file": ("q.jpg", image, "image/jpeg")})
    return {hit["id"] for hit in response.json()["hits"]} if response.status_code == 200 else set()


async def follows_the_folder(client: httpx.AsyncClient, folder: Path, image: Path) -> None:
    """Add `image` to `folder`: a hit within the deadline; remove it: no hit any more."""
    data, added = image.read_bytes(), image_id(folder, "new/cat.jpg")
    (folder / "new").mkdir()
    shutil.copy(image, folder / "new" / "cat.jpg")

    async def found() -> bool:
        return added in await hit_ids(client, data)

    await poll_until(found, what="the added image a hit")
    assert (await client.get(f"/images/{added}")).content == data  # its file is served from the watched folder
    (folder / "new" / "cat.jpg").unlink()

    async def gone() -> bool:
        meta = await client.get(f"/images/{added}/meta")
        return added not in await hit_ids(client, data) and meta.status_code == 404

    await poll_until(gone, what="the removed image no hit")


async def test_cbir_serve_watch_follows_a_folder_after_its_own_run_and_collection_lists_it(
        cbir_env: Path, tmp_path: Path, mini_collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "watched"
    folder.mkdir()
    shutil.copy(mini_collection / "test" / "dog" / "0001.jpg", folder / "dog.jpg")  # there before the start
    for name, value in FAST.items():
        monkeypatch.setenv(f"CBIR_{name.upper()}", str(value))
    app = apps.one_machine_app(OneMachineSettings.load(), watch=[folder])
    async with asgi_client(app, base_url="http://search") as client:
        async def reconciled() -> bool:
            [watched] = (await client.get("/collection")).json()["watching"]
            return watched["state"] == "running"

        await poll_until(reconciled, what="the first reconcile")
        collection = (await client.get("/collection")).json()
        assert collection["documents"] == 501  # the collection's 500 train images, then the folder's one
        assert collection["sources"][str(folder.resolve())] == 1
        [watched] = collection["watching"]
        assert watched["folder"] == str(folder.resolve()) and watched["errors"] == []
        assert watched["last_batch"]["added"] == 1
        await follows_the_folder(client, folder, mini_collection / "test" / "cat" / "0000.jpg")
        assert (await client.get("/collection")).json()["sources"][str(mini_collection.resolve())] == 500


async def test_cbir_serve_refuses_to_watch_what_is_not_a_folder(cbir_env: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        apps.one_machine_app(OneMachineSettings.load(), watch=[tmp_path / "missing"])


async def test_cbir_index_watch_beside_a_gateway_on_elasticsearch(
        tmp_path: Path, tiny_bundle_dir: Path, mini_collection: Path, es_double: EsDouble) -> None:
    folder = tmp_path / "watched"
    folder.mkdir()
    shutil.copy(mini_collection / "test" / "dog" / "0001.jpg", folder / "dog.jpg")
    es = {"backend": Backend.elasticsearch, "es_url": es_double.url, "es_index": "photos", "es_shards": 1,
          "state_dir": tmp_path / "state", "model_dir": tiny_bundle_dir, "compile": "off"}
    settings = IndexerSettings(_env_file=None, **es, **FAST)  # type: ignore[arg-type]
    states: list[WatchState] = []
    options = IndexOptions(batch_size=64, concurrency=2, rebuild=False, progress_bar=False, layout=Layout.auto)
    writer = asyncio.create_task(watch_into_store(settings, folder, "train", options,
                                                  on_batch=lambda state: states.append(state.as_dict())))
    try:
        await poll_until(lambda: bool(states) or writer.done(), what="the first reconcile")
        assert states[0]["last_batch"]["added"] == 1 and states[0]["last_batch"]["documents"] == 1
        gateway = apps.gateway_app(SearchSettings(_env_file=None, **es))  # type: ignore[arg-type]
        async with asgi_client(gateway, base_url="http://search") as client:
            await follows_the_folder(client, folder, mini_collection / "test" / "cat" / "0000.jpg")
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    assert states[-1]["state"] == "running" and states[-1]["errors"] == []
