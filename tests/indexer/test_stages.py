"""The indexer's stages one at a time: the plan from a scanned folder and a store's contents, read on real
files, embed through a recording embedder, write into a recording store and a FAISS file."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from factories import make_document, unit_vectors
from fakes import FixedEmbedder

from services.common.collection import CollectionImage, Layout, scan_collection
from services.common.documents import ImageDocument, StoredImage, document_id
from services.common.images import decode_image
from services.common.stores.faiss import FaissStore
from services.common.stores.faiss.persistence import load_index
from services.indexer.stages import (
    UNREADABLE,
    DecodedBatch,
    IndexPlan,
    StoreWriter,
    embed_batch,
    make_plan,
    plan_run,
    read_batch,
    read_in_threads,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def photos(tmp_path: Path, mini_collection: Path) -> Path:
    """A flat folder of five real images a.jpg … e.jpg (cats of the mini collection)."""
    root = tmp_path / "photos"
    root.mkdir()
    for name, image in zip("abcde", sorted((mini_collection / "train" / "cat").iterdir()), strict=False):
        shutil.copyfile(image, root / f"{name}.jpg")
    return root


def stored_as(image: CollectionImage, **changes: object) -> StoredImage:
    """The store's record of `image` as the indexer wrote it (size and mtime as scanned), with `changes`."""
    fields: dict = {"id": image.id, "filename": image.filename, "path": image.path, "source": image.source,
                    "label": image.label, "predicted_label": "cat", "confidence": 0.9, "size": image.size,
                    "mtime": image.mtime, "model_version": "v1"}
    return StoredImage(**(fields | changes))


# --- plan ---------------------------------------------------------------------------------------------


def test_the_plan_embeds_new_and_changed_files_and_skips_the_rest(photos: Path) -> None:
    (photos / "f.jpg").symlink_to(photos / "gone.jpg")  # listed, but cannot be read
    images = {image.filename: image for image in scan_collection(photos, layout=Layout.flat)}
    source = str(photos.resolve())
    vanished = make_document(document_id(source, "z.jpg"), unit_vectors(1)[0], path="z.jpg", source=source)
    stored = {images["a.jpg"].id: stored_as(images["a.jpg"]),  # as it was: unchanged
              images["b.jpg"].id: stored_as(images["b.jpg"], mtime=1.0),  # touched since
              images["c.jpg"].id: stored_as(images["c.jpg"], size=1),  # another file under the same name
              vanished.id: vanished}

    plan = make_plan(source, list(images.values()), stored, sync=False)
    assert [image.filename for image in plan.to_embed] == ["b.jpg", "c.jpg", "d.jpg", "e.jpg"]  # in order
    assert plan.replacing == {images["b.jpg"].id, images["c.jpg"].id}
    assert plan.unreadable == [("f.jpg", UNREADABLE)]
    assert (plan.total, plan.unchanged, plan.to_delete) == (6, 1, [])  # without sync nothing is deleted

    synced = make_plan(source, list(images.values()), stored, sync=True)
    assert synced.to_delete == [vanished.id]
    assert synced.to_embed == plan.to_embed and synced.unchanged == 1


def test_a_plan_batches_what_it_embeds_in_order() -> None:
    images = [CollectionImage.from_relative("/c", f"{i}.jpg", None, size=1, mtime=0.0) for i in range(5)]
    plan = make_plan("/c", images, {}, sync=True)
    assert [[image.path for image in batch] for batch in plan.batches(2)] == [["0.jpg", "1.jpg"],
                                                                               ["2.jpg", "3.jpg"], ["4.jpg"]]
    assert IndexPlan("/c", 0, [], frozenset(), [], []).batches(2) == []


async def test_planning_against_a_store_compares_only_documents_of_the_same_root(photos: Path,
                                                                                 tmp_path: Path) -> None:
    source = str(photos.resolve())
    [a, b] = [image for image in scan_collection(photos, layout=Layout.flat) if image.filename in ("a.jpg", "b.jpg")]
    vectors = unit_vectors(4)
    store = FaissStore(tmp_path / "index.npz")
    await store.open(dims=vectors.shape[1], model_version="v1")
    await store.upsert([
        make_document(a.id, vectors[0], path=a.path, source=source, size=a.size, mtime=a.mtime),
        make_document(b.id, vectors[1], path=b.path, source=source, size=b.size, mtime=0.0),
        make_document(document_id(source, "gone.jpg"), vectors[2], path="gone.jpg", source=source),
        make_document("elsewhere", vectors[3], path="gone.jpg", source="/another/root"),  # never this run's
    ])
    plan = await plan_run(photos, "train", store, layout=Layout.auto, sync=True)  # auto: a flat folder
    assert plan.source == source
    assert [image.filename for image in plan.to_embed] == ["b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    assert plan.replacing == {b.id}
    assert plan.to_delete == [document_id(source, "gone.jpg")]


# --- read ---------------------------------------------------------------------------------------------


def test_read_decodes_a_batch_as_the_bundle_says_and_lists_what_it_cannot(photos: Path) -> None:
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    images = {image.filename: image for image in scan_collection(photos, layout=Layout.flat)}
    batch = [images["a.jpg"], images["broken.jpg"], images["c.jpg"]]
    os.remove(photos / "c.jpg")  # removed after the plan listed it

    decoded = read_batch(photos, batch, size=40, resample="nearest")
    assert decoded.images == [images["a.jpg"]]
    expected = decode_image((photos / "a.jpg").read_bytes(), size=40, resample="nearest")
    assert decoded.pixels is not None and decoded.pixels.shape == (1, 40, 40, 3) and decoded.pixels.dtype == np.uint8
    np.testing.assert_array_equal(decoded.pixels[0], expected)
    assert [path for path, _ in decoded.failed] == ["broken.jpg", "c.jpg"]
    assert all(reason for _, reason in decoded.failed)


def test_read_keeps_the_batch_order_and_gives_no_pixels_when_nothing_decodes(photos: Path) -> None:
    images = scan_collection(photos, layout=Layout.flat)
    decoded = read_batch(photos, images[::-1], size=32, resample="lanczos")
    assert [image.filename for image in decoded.images] == ["e.jpg", "d.jpg", "c.jpg", "b.jpg", "a.jpg"]
    np.testing.assert_array_equal(decoded.pixels[0], decode_image((photos / "e.jpg").read_bytes(), size=32,
                                                                resample="lanczos"))
    (photos / "empty.png").write_bytes(b"")
    [empty] = [image for image in scan_collection(photos, layout=Layout.flat) if image.filename == "empty.png"]
    nothing = read_batch(photos, [empty], size=32, resample="bilinear")
    assert (nothing.images, nothing.pixels, [path for path, _ in nothing.failed]) == ([], None, ["empty.png"])


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
async def test_a_batch_read_in_threads_is_the_batch_read_in_one(photos: Path, threads: int) -> None:
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    images = scan_collection(photos, layout=Layout.flat)[::-1]  # e, d, c, broken, b, a: order is the batch's
    whole = read_batch(photos, images, size=32, resample="lanczos")
    split = await read_in_threads(photos, images, size=32, resample="lanczos", threads=threads)
    assert split.images == whole.images and split.failed == whole.failed == [("broken.jpg", split.failed[0][1])]
    assert split.pixels is not None and whole.pixels is not None
    np.testing.assert_array_equal(split.pixels, whole.pixels)
    empty = await read_in_threads(photos, [], size=32, resample="lanczos", threads=threads)
    assert (empty.images, empty.pixels, empty.failed) == ([], None, [])


# --- embed --------------------------------------------------------------------------------------------


class RecordingEmbedder(FixedEmbedder):
    """A `FixedEmbedder` that keeps every call's images and purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[np.ndarray, str]] = []

    async def embed(self, images: np.ndarray, *, purpose: str = "query") -> list:
        self.calls.append((images, purpose))
        return await super().embed(images, purpose=purpose)


async def test_embed_makes_each_decoded_image_a_document_with_the_index_side_vector(photos: Path) -> None:
    images = scan_collection(photos, layout=Layout.flat)[:2]
    decoded = read_batch(photos, images, size=32, resample="lanczos")
    embedder = RecordingEmbedder()
    documents = await embed_batch(embedder, decoded, model_version="m-7")
    [(pixels, purpose)] = embedder.calls
    assert pixels is decoded.pixels and purpose == "index"
    assert [(d.id, d.path, d.source, d.label, d.size, d.mtime) for d in documents] == [
        (i.id, i.path, i.source, i.label, i.size, i.mtime) for i in images]
    assert {(d.predicted_label, d.confidence, d.model_version) for d in documents} == {("cat", 1.0, "m-7")}
    np.testing.assert_array_equal(documents[1].vector, embedder.vector)


async def test_embed_does_not_call_the_embedder_for_a_batch_without_pixels() -> None:
    embedder = RecordingEmbedder()
    assert await embed_batch(embedder, DecodedBatch([], None, [("x.jpg", "empty")]), model_version="m") == []
    assert embedder.calls == []


# --- write --------------------------------------------------------------------------------------------


class RecordingStore:
    """The writes a `StoreWriter` makes, in order; `gate`, when set, holds every upsert until it opens."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.gate = gate
        self.entered = asyncio.Event()  # an upsert has begun
        self.upserting = 0
        self.most_at_once = 0

    async def upsert(self, documents: Sequence[ImageDocument]) -> None:
        self.upserting += 1
        self.most_at_once = max(self.most_at_once, self.upserting)
        self.calls.append(("upsert", len(documents)))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.upserting -= 1

    async def flush(self) -> None:
        self.calls.append(("flush", 0))

    async def delete(self, ids: Sequence[str]) -> int:
        self.calls.append(("delete", len(ids)))
        return len(ids) - 1  # one of them was gone already


def documents(count: int, *, prefix: str = "doc") -> list[ImageDocument]:
    return [make_document(f"{prefix}-{i}", vector) for i, vector in enumerate(unit_vectors(count))]


async def test_write_saves_every_few_batches_and_counts_added_and_replaced() -> None:
    store = RecordingStore()
    writer = StoreWriter(store, flush_every=2, replacing=frozenset({"b-0", "c-1"}))
    for prefix in "abc":
        await writer.write(documents(2, prefix=prefix))
    assert store.calls == [("upsert", 2), ("upsert", 2), ("flush", 0), ("upsert", 2)]
    assert (writer.added, writer.updated) == (4, 2)
    assert await writer.delete([]) == 0 and store.calls[-1] == ("upsert", 2)  # nothing to delete: no call
    assert await writer.delete(["x", "y"]) == 1
    await writer.flush()
    assert store.calls[-2:] == [("delete", 2), ("flush", 0)]


async def test_batches_in_flight_reach_the_store_one_at_a_time() -> None:
    gate = asyncio.Event()
    store = RecordingStore(gate)
    writer = StoreWriter(store, flush_every=10)
    writes = [asyncio.ensure_future(writer.write(documents(1, prefix=p))) for p in "abc"]
    # The three writes start together; by the time the first is in the store (held at the gate), the
    # others have run up to where they wait: for the writer, not inside the store.
    await asyncio.wait_for(store.entered.wait(), 10)
    assert store.calls == [("upsert", 1)]
    gate.set()
    await asyncio.gather(*writes)
    assert (store.calls, store.most_at_once, writer.added) == ([("upsert", 1)] * 3, 1, 3)


async def test_what_a_writer_saved_survives_a_crash_and_the_rest_is_in_the_store_log(tmp_path: Path) -> None:
    """A run killed after three batches with saves every two: the index file holds the first two, and the
    FAISS store's write log the third (written, not fsynced: a process killed keeps it, a power cut may not)."""
    path = tmp_path / "index.npz"
    store = FaissStore(path)
    await store.open(dims=16, model_version="v1")
    writer = StoreWriter(store, flush_every=2)
    batches = [documents(3, prefix=prefix) for prefix in "abc"]
    for batch in batches:
        await writer.write(batch)
    saved = {document.id for batch in batches[:2] for document in batch}
    assert set(load_index(path).table.ids()) == saved
    survivor = FaissStore(path)  # what a new process finds on disk now
    await survivor.open(dims=16, model_version="v1", create=False)
    assert await survivor.existing_ids([d.id for batch in batches for d in batch]) == {
        d.id for batch in batches for d in batch}

    await writer.flush()
    reopened = FaissStore(path)
    await reopened.open(dims=16, model_version="v1", create=False)
    assert await reopened.count() == 9
