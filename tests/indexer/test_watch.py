"""Watched folders (services/indexer/watch.py) over the real pipeline, a controlled embedder and a store in memory:
added, changed and removed files followed, nothing outside the folder touched, a half-written file retried, a
file that never decodes reported once, a burst batched, a failed batch tried again."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
from factories import make_document
from fakes import ControlledEmbedder, MemoryStore, poll_until
from sample_images import encode, sample_image
from watchfiles import Change

from services.common.collection import CollectionImage, Layout
from services.common.documents import UPLOAD_SOURCE
from services.common.errors import StoreUnavailableError
from services.indexer.pipeline import IndexOptions, IndexReport, index_collection
from services.indexer.watch import FolderWatcher, WatchOptions, relevant

pytestmark = pytest.mark.anyio
OPTIONS = IndexOptions(batch_size=64, concurrency=2, rebuild=False, progress_bar=False, layout=Layout.flat, sync=True)
FAST = WatchOptions(settle_ms=100, max_batch_ms=1000, retries=2, retry_ms=100)
JPEG = encode(sample_image(), "JPEG", quality=90)


def image_id(folder: Path, relative: str) -> str:
    return CollectionImage.from_relative(str(folder.resolve()), relative, None).id


@asynccontextmanager
async def watching(watcher: FolderWatcher) -> AsyncIterator[FolderWatcher]:
    """The watcher running as a task, cancelled after the block (as the lifespan does)."""
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert watcher.state.state == "stopped"


def pipeline_watcher(folder: Path, store: MemoryStore, *, options: WatchOptions = FAST,
                     calls: list[int] | None = None) -> FolderWatcher:
    embedder = ControlledEmbedder()

    async def reconcile(root: Path) -> IndexReport:
        if calls is not None:
            calls.append(len(calls))
        return await index_collection(root, "train", embedder, store, OPTIONS)

    return FolderWatcher(folder, reconcile=reconcile, options=options)


def holds(store: MemoryStore, id: str, *, size: int | None = None) -> Callable[[], bool]:
    return lambda: id in store.documents and (size is None or store.documents[id].size == size)


async def test_a_watched_folder_follows_added_changed_and_removed_files_and_leaves_the_rest_alone(
        tmp_path: Path) -> None:
    folder, outside = tmp_path / "watched", tmp_path / "outside"
    (folder / "old").mkdir(parents=True)
    outside.mkdir()
    (folder / "old" / "there.jpg").write_bytes(JPEG)
    (outside / "beside.jpg").write_bytes(JPEG)
    vector = np.eye(16, dtype=np.float32)[0]
    others = [make_document("upload-1", vector, source=UPLOAD_SOURCE, model_version="v1"),
              make_document("other-root", vector, source=str(outside.resolve()), path="gone.jpg", model_version="v1")]
    vanished = make_document(image_id(folder, "vanished.jpg"), vector, source=str(folder.resolve()),
                             path="vanished.jpg", model_version="v1")
    store = MemoryStore([*others, vanished])
    async with watching(pipeline_watcher(folder, store)) as watcher:
        # The first reconcile: the folder as it is (like `cbir index DIR --sync`, scoped to the folder).
        there = holds(store, image_id(folder, "old/there.jpg"))
        await poll_until(lambda: there() and vanished.id not in store.documents, what="the first reconcile")
        added = image_id(folder, "new.jpg")
        (folder / "new.jpg").write_bytes(JPEG)
        await poll_until(holds(store, added), what="the added file indexed")
        bigger = encode(sample_image((64, 64)), "PNG")
        (folder / "new.jpg").write_bytes(bigger)
        await poll_until(holds(store, added, size=len(bigger)), what="the changed file re-embedded")
        (folder / "new.jpg").unlink()
        await poll_until(lambda: added not in store.documents, what="the removed file gone")
        # The state is set once the batch's reconcile has returned, just after the store changed.
        await poll_until(lambda: (watcher.state.last_batch or {}).get("removed") == 1, what="the batch reported")
        assert watcher.state.state == "running" and not watcher.state.errors
    assert {"upload-1", "other-root"} <= set(store.documents)  # uploads and another root's documents untouched
    assert {doc.source for doc in store.documents.values()} == {UPLOAD_SOURCE, str(outside.resolve()),
                                                                str(folder.resolve())}
    assert not any(doc.path == "beside.jpg" for doc in store.documents.values())  # nothing outside is indexed


async def test_a_half_written_file_is_retried_until_it_decodes(tmp_path: Path) -> None:
    folder = tmp_path / "watched"
    folder.mkdir()
    store = MemoryStore()
    async with watching(pipeline_watcher(folder, store, options=WatchOptions(settle_ms=100, retries=1000,
                                                                             retry_ms=100))) as watcher:
        await poll_until(lambda: watcher.state.batches >= 1, what="the first reconcile")
        with (folder / "copying.jpg").open("wb") as file:
            file.write(JPEG[: len(JPEG) // 2])
            file.flush()
            await poll_until(lambda: watcher.state.retrying == ["copying.jpg"], what="the half file retried")
            batches = watcher.state.batches
            await poll_until(lambda: watcher.state.batches >= batches + 2, what="more tries")
            file.write(JPEG[len(JPEG) // 2:])
        await poll_until(holds(store, image_id(folder, "copying.jpg"), size=len(JPEG)), what="the whole file indexed")
        await poll_until(lambda: not watcher.state.retrying, what="retrying emptied")
        assert not watcher.state.errors  # never reported bad


async def test_a_file_that_never_decodes_is_reported_once_after_its_retries(tmp_path: Path) -> None:
    folder = tmp_path / "watched"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    store = MemoryStore()
    async with watching(pipeline_watcher(folder, store)) as watcher:
        await poll_until(lambda: len(watcher.state.errors) == 1, what="the broken file reported")
        assert watcher.state.errors[0].startswith("broken.jpg: ") and not watcher.state.retrying
        batches = watcher.state.batches
        (folder / "fine.jpg").write_bytes(JPEG)  # another batch, which lists the broken file again
        fine = holds(store, image_id(folder, "fine.jpg"))
        await poll_until(lambda: fine() and watcher.state.batches > batches, what="the next file's batch done")
        assert len(watcher.state.errors) == 1  # reported once, until it changes
        (folder / "broken.jpg").write_bytes(JPEG)  # replaced by an image: indexed
        await poll_until(holds(store, image_id(folder, "broken.jpg")), what="the repaired file indexed")


async def test_a_burst_of_a_thousand_files_is_indexed_in_a_few_batches(tmp_path: Path) -> None:
    folder = tmp_path / "watched"
    folder.mkdir()
    store, calls = MemoryStore(), []
    async with watching(pipeline_watcher(folder, store, calls=calls)) as watcher:
        await poll_until(lambda: watcher.state.batches >= 1, what="the first reconcile")
        for i in range(1000):
            (folder / f"burst-{i:04d}.jpg").write_bytes(JPEG)
        await poll_until(lambda: len(store.documents) == 1000, within_s=120, what="the burst indexed")
        await poll_until(lambda: watcher.state.batches == len(calls), what="the last batch reported")
        assert len(calls) - 1 <= 10, f"{len(calls) - 1} batches for 1,000 files"  # batched, not one per file


async def test_a_failed_batch_is_kept_in_the_state_and_tried_again(tmp_path: Path) -> None:
    folder = tmp_path / "watched"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(JPEG)
    store, failures = MemoryStore(), [StoreUnavailableError("the store is down")]
    embedder = ControlledEmbedder()

    async def reconcile(root: Path) -> IndexReport:
        if failures:
            raise failures.pop()
        return await index_collection(root, "train", embedder, store, OPTIONS)

    async with watching(FolderWatcher(folder, reconcile=reconcile, options=FAST)) as watcher:
        await poll_until(holds(store, image_id(folder, "a.jpg")), what="indexed after the failed batch")
        await poll_until(lambda: watcher.state.state == "running", what="the batch reported")
        assert list(watcher.state.errors) == ["the store is down"]


async def test_a_folder_that_goes_away_keeps_its_documents_and_is_watched_again_when_it_is_back(
        tmp_path: Path) -> None:
    folder = tmp_path / "disk"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(JPEG)
    store = MemoryStore()
    async with watching(pipeline_watcher(folder, store)) as watcher:
        await poll_until(holds(store, image_id(folder, "a.jpg")), what="the first reconcile")
        shutil.rmtree(folder)  # an unmounted disk: not a reason to forget its images
        await poll_until(lambda: watcher.state.state == "error", what="the folder reported gone")
        assert "is gone" in watcher.state.errors[-1] and image_id(folder, "a.jpg") in store.documents
        folder.mkdir()
        (folder / "b.jpg").write_bytes(JPEG)
        await poll_until(lambda: holds(store, image_id(folder, "b.jpg"))() and len(store.documents) == 1,
                         what="the folder followed again")  # and a.jpg, gone with it, removed
        await poll_until(lambda: watcher.state.state == "running", what="the batch reported")


async def test_a_replaced_store_is_reconciled_again_without_a_change(tmp_path: Path) -> None:
    folder = tmp_path / "watched"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(JPEG)
    stores = [MemoryStore()]
    embedder = ControlledEmbedder()

    async def reconcile(root: Path) -> IndexReport:
        return await index_collection(root, "train", embedder, stores[-1], OPTIONS)

    watcher = FolderWatcher(folder, reconcile=reconcile, options=FAST, stale=lambda: not stores[-1].documents)
    async with watching(watcher):
        await poll_until(holds(stores[0], image_id(folder, "a.jpg")), what="the first store filled")
        stores.append(MemoryStore())  # a swap to a new model's index, built without the watched folder
        await poll_until(holds(stores[1], image_id(folder, "a.jpg")), what="the new store filled")


@pytest.mark.parametrize(("change", "name", "expected"), [
    (Change.added, "cat.jpg", True), (Change.modified, "CAT.PNG", True), (Change.deleted, "cat.webp", True),
    (Change.added, "cat.jpg.part", False), (Change.added, ".cat.jpg", False), (Change.added, "notes.txt", False),
    (Change.deleted, "album", True), (Change.modified, "cat.jpg~", False)])
def test_only_changes_that_can_matter_to_the_index_wake_the_watcher(tmp_path: Path, change: Change, name: str,
                                                                    expected: bool) -> None:
    assert relevant(change, str(tmp_path / name)) is expected
