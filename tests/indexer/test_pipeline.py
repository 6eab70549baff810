"""The indexer: every image once, resumable, idempotent, changed files re-embedded, vanished ones removed with
sync (of its own root only), every layout, corrupt files skipped and listed."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from fakes import FixedEmbedder

from services.common.collection import CollectionImage, Layout, iter_images
from services.common.embedding import HttpEmbeddingClient
from services.common.errors import StoreMismatchError
from services.common.images import decode_image
from services.common.stores.faiss import FaissStore
from services.embedder.runtime import Embedder, LocalEmbeddingService
from services.indexer.pipeline import IndexOptions, IndexReport, index_batches, index_collection, read_threads
from services.indexer.stages import DecodedBatch

pytestmark = pytest.mark.anyio
OPTIONS = IndexOptions(batch_size=64, concurrency=2, flush_every=2, rebuild=False, progress_bar=False)


@pytest.fixture(scope="module")
def local_service(tiny_bundle) -> LocalEmbeddingService:
    service = LocalEmbeddingService(Embedder(tiny_bundle))
    service.start()
    yield service
    service.batcher.stop()


@pytest.fixture
def collection(tmp_path: Path, mini_collection: Path) -> Path:
    root = tmp_path / "collection"
    shutil.copytree(mini_collection / "train", root / "train")
    return root


async def test_indexes_every_image_once_and_reruns_add_nothing(collection: Path, tmp_path: Path,
                                                                local_service: LocalEmbeddingService) -> None:
    store = FaissStore(tmp_path / "index.npz")
    report = await index_collection(collection, "train", local_service, store, OPTIONS)
    assert (report.added, report.unchanged, report.failed) == (500, 0, [])
    again = await index_collection(collection, "train", local_service, FaissStore(tmp_path / "index.npz"), OPTIONS)
    assert again.counts() == {"total": 500, "added": 0, "updated": 0, "unchanged": 500, "removed": 0, "skipped": 0,
                              "documents": 500}
    document = await store.get(next(iter_images(collection, "train")).id)
    assert document is not None and document.source == str(collection.resolve()) and document.label == "airplane"
    assert document.predicted_label in (await local_service.info()).classes and 0 < document.confidence <= 1
    assert document.size == (collection / document.path).stat().st_size


async def test_a_rerun_re_embeds_changed_files_and_sync_removes_vanished_ones(
        collection: Path, tmp_path: Path, local_service: LocalEmbeddingService) -> None:
    await index_collection(collection, "train", local_service, FaissStore(tmp_path / "index.npz"), OPTIONS)
    cats = sorted((collection / "train" / "cat").iterdir())
    cats[0].write_bytes((collection / "train" / "dog" / sorted(os.listdir(collection / "train" / "dog"))[0])
                        .read_bytes())  # another image under the same name: size and mtime change
    cats[1].unlink()
    (collection / "train" / "cat" / "zz-new.jpg").write_bytes(cats[2].read_bytes())
    store = FaissStore(tmp_path / "index.npz")
    report = await index_collection(collection, "train", local_service, store, OPTIONS)
    assert (report.added, report.updated, report.unchanged, report.removed) == (1, 1, 498, 0)
    assert report.documents == 501  # without --sync the vanished file's document stays
    await store.close()
    synced = await index_collection(collection, "train", local_service, FaissStore(tmp_path / "index.npz"),
                                    IndexOptions(**{**OPTIONS.__dict__, "sync": True}))
    assert (synced.added, synced.updated, synced.unchanged, synced.removed, synced.documents) == (0, 0, 500, 1, 500)


async def test_sync_removes_only_documents_of_its_own_root(collection: Path, tmp_path: Path,
                                                           local_service: LocalEmbeddingService) -> None:
    other = tmp_path / "other"
    shutil.copytree(collection / "train" / "cat", other / "cat")
    path = tmp_path / "index.npz"
    await index_collection(collection, "train", local_service, FaissStore(path), OPTIONS)
    await index_collection(other, "train", local_service, FaissStore(path), OPTIONS)  # class layout: 50 cats
    shutil.rmtree(collection / "train" / "dog")
    store = FaissStore(path)
    report = await index_collection(collection, "train", local_service, store,
                                    IndexOptions(**{**OPTIONS.__dict__, "sync": True}))
    assert (report.removed, report.documents) == (50, 500)  # 450 of the collection + the other root's 50
    sources = (await store.stats()).sources
    assert sources == {str(collection.resolve()): 450, str(other.resolve()): 50}


@pytest.mark.parametrize("layout", [Layout.flat, Layout.auto])
async def test_a_flat_folder_is_indexed_recursively_without_labels(tmp_path: Path, mini_collection: Path,
                                                                   local_service: LocalEmbeddingService,
                                                                   layout: Layout) -> None:
    photos = tmp_path / "photos"
    (photos / "2024" / "summer").mkdir(parents=True)
    for i, image in enumerate(sorted((mini_collection / "train" / "cat").iterdir())[:6]):
        shutil.copyfile(image, (photos if i % 2 else photos / "2024" / "summer") / f"p{i}.jpg")
    store = FaissStore(tmp_path / "index.npz")
    report = await index_collection(photos, "train", local_service, store,
                                    IndexOptions(**{**OPTIONS.__dict__, "layout": layout}))
    assert report.added == 6
    documents = [doc async for doc in store.iter_documents()]
    assert {doc.label for doc in documents} == {None}
    assert sorted(doc.path for doc in documents) == ["2024/summer/p0.jpg", "2024/summer/p2.jpg", "2024/summer/p4.jpg",
                                                     "p1.jpg", "p3.jpg", "p5.jpg"]
    assert (await store.stats()).unlabelled == 6


async def test_the_class_layout_labels_by_top_folder(tmp_path: Path, mini_collection: Path,
                                                     local_service: LocalEmbeddingService) -> None:
    root = tmp_path / "pets"
    shutil.copytree(mini_collection / "train" / "cat", root / "cat" / "indoor")
    shutil.copytree(mini_collection / "train" / "dog", root / "dog")
    store = FaissStore(tmp_path / "index.npz")
    await index_collection(root, "train", local_service, store, OPTIONS)  # auto: only folders in the root → class
    assert (await store.stats()).labels == {"cat": 50, "dog": 50}


async def test_resumes_where_an_interrupted_run_stopped(collection: Path, tmp_path: Path,
                                                        local_service: LocalEmbeddingService) -> None:
    # An earlier run that got through two classes only (the others were not there yet).
    later = tmp_path / "later"
    later.mkdir()
    for label in os.listdir(collection / "train"):
        if label not in ("airplane", "automobile"):
            shutil.move(collection / "train" / label, later / label)
    await index_collection(collection, "train", local_service, FaissStore(tmp_path / "index.npz"), OPTIONS)
    for label in os.listdir(later):
        shutil.move(later / label, collection / "train" / label)
    store = FaissStore(tmp_path / "index.npz")
    report = await index_collection(collection, "train", local_service, store, OPTIONS)
    assert (report.unchanged, report.added, report.documents) == (100, 400, 500)
    ids = {image.id for image in iter_images(collection, "train")}
    assert await store.existing_ids(sorted(ids)) == ids


async def test_corrupt_files_are_skipped_and_listed(collection: Path, tmp_path: Path,
                                                    local_service: LocalEmbeddingService) -> None:
    (collection / "train" / "cat" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (collection / "train" / "dog" / "zz-empty.png").write_bytes(b"")
    report = await index_collection(collection, "train", local_service, FaissStore(tmp_path / "i.npz"), OPTIONS)
    assert report.indexed == 500
    assert sorted(path for path, _ in report.failed) == ["train/cat/zz-broken.jpg", "train/dog/zz-empty.png"]
    assert "skipped 2 undecodable" in report.summary()


async def test_indexes_through_the_embedder_service_over_http(collection: Path, tmp_path: Path, cbir_env: Path,
                                                              local_service: LocalEmbeddingService) -> None:
    from services.embedder.app import create_app
    from services.embedder.settings import EmbedderSettings
    from services.wiring import build_local_embedding_service

    local_store = FaissStore(tmp_path / "local.npz")
    await index_collection(collection, "train", local_service, local_store, OPTIONS)
    probe = next(iter_images(collection, "train"))
    [embedding] = await local_service.embed(decode_image((collection / probe.path).read_bytes())[None])
    settings = EmbedderSettings.load()  # its own model, loaded from CBIR_MODEL_DIR (the same tiny bundle)
    app = create_app(settings, service_factory=lambda: build_local_embedding_service(settings))
    async with app.router.lifespan_context(app):
        client = HttpEmbeddingClient("http://embedder", transport=httpx.ASGITransport(app=app))
        store = FaissStore(tmp_path / "http.npz")
        report = await index_collection(collection, "train", client, store, OPTIONS)
        await client.close()
    assert report.indexed == 500
    # The same vectors as in-process: the query image finds itself first with score 2.
    http_hits, local_hits = await store.search(embedding.vector, 5), await local_store.search(embedding.vector, 5)
    assert [h.id for h in http_hits] == [h.id for h in local_hits]
    assert http_hits[0].id == probe.id and http_hits[0].score == pytest.approx(2.0, abs=1e-4)


async def test_an_index_of_another_model_is_refused_or_rebuilt(collection: Path, tmp_path: Path, tiny_bundle,
                                                               local_service: LocalEmbeddingService) -> None:
    path = tmp_path / "index.npz"
    await index_collection(collection, "train", local_service, FaissStore(path), OPTIONS)
    other = LocalEmbeddingService(Embedder(tiny_bundle, pca_dims=8))  # other dims, other model version
    other.start()
    try:
        with pytest.raises(StoreMismatchError, match="--rebuild"):
            await index_collection(collection, "train", other, FaissStore(path), OPTIONS)
        rebuilt = await index_collection(collection, "train", other, FaissStore(path),
                                         IndexOptions(**{**OPTIONS.__dict__, "rebuild": True}))
    finally:
        other.batcher.stop()
    assert (rebuilt.indexed, rebuilt.documents) == (500, 500)
    reopened = FaissStore(path)
    await reopened.open(dims=18, model_version=(await other.info()).model_version, create=False)
    assert await reopened.count() == 500


async def test_indexed_images_get_the_bundles_index_side_views(collection: Path, tmp_path: Path, tiny_bundle_dir,
                                                               ) -> None:
    """A bundle with flip TTA for queries but not for the index: the index holds single-view vectors, in
    the same vector space (one model version), over HTTP as in-process."""
    from factories import copy_bundle

    from services.embedder.app import create_app
    from services.embedder.bundle import load_bundle
    from services.embedder.settings import EmbedderSettings

    def queries_only(metadata: dict) -> None:
        metadata["preprocessing"].update(flip_tta=True, index_flip_tta=False)

    bundle = load_bundle(copy_bundle(tiny_bundle_dir, tmp_path / "bundle", queries_only))
    embedder = Embedder(bundle)
    service = LocalEmbeddingService(embedder)
    service.start()
    try:
        store = FaissStore(tmp_path / "index.npz")
        await index_collection(collection, "train", service, store, OPTIONS)
    finally:
        service.batcher.stop()
    probe = next(iter_images(collection, "train"))
    pixels = decode_image((collection / probe.path).read_bytes())[None]
    [single], [mirrored] = embedder.embed_batch(pixels, purpose="index"), embedder.embed_batch(pixels)
    assert np.abs(single.vector - mirrored.vector).max() > 1e-3  # the views do differ for this image
    [hit] = await store.search(single.vector, 1)
    assert hit.id == probe.id and hit.score == pytest.approx(2.0, abs=1e-5)  # stored: the single view
    assert (await store.info()).model_version == embedder.model_version  # queries (flip) may search it

    app = create_app(EmbedderSettings(), service_factory=lambda: _started(LocalEmbeddingService(Embedder(bundle))))
    async with app.router.lifespan_context(app):
        client = HttpEmbeddingClient("http://embedder", transport=httpx.ASGITransport(app=app))
        [over_http] = await client.embed(pixels, purpose="index")
        [query_over_http] = await client.embed(pixels)
        await client.close()
    assert over_http.vector == pytest.approx(single.vector, abs=1e-5)
    assert query_over_http.vector == pytest.approx(mirrored.vector, abs=1e-5)


def _started(service: LocalEmbeddingService) -> LocalEmbeddingService:
    service.start()
    return service


async def test_every_stage_is_timed_and_the_summary_names_them(collection: Path, tmp_path: Path) -> None:
    report = await index_collection(collection, "train", FixedEmbedder(), FaissStore(tmp_path / "index.npz"),
                                    OPTIONS)
    assert report.indexed == 500
    assert list(report.stage_seconds) == ["plan", "read", "embed", "write"]
    assert all(seconds > 0 for seconds in report.stage_seconds.values()), report.stage_seconds
    assert report.summary().endswith(", ".join(f"{stage} {seconds:.1f} s"
                                               for stage, seconds in report.stage_seconds.items()) + ")")


class FailingEmbedder(FixedEmbedder):
    """Embeds `good` batches, then fails: a run that stops half-way (the embedder went away, Ctrl-C)."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    async def embed(self, images: np.ndarray, *, purpose: str = "query") -> list:
        if self.good == 0:
            raise RuntimeError("the embedder went away")
        self.good -= 1
        return await super().embed(images, purpose=purpose)


async def test_a_failed_run_keeps_what_it_wrote_and_the_next_run_resumes(collection: Path, tmp_path: Path) -> None:
    options = IndexOptions(**{**OPTIONS.__dict__, "batch_size": 100, "concurrency": 1, "flush_every": 20})
    with pytest.raises(RuntimeError, match="went away"):
        await index_collection(collection, "train", FailingEmbedder(good=2), FaissStore(tmp_path / "index.npz"),
                               options)
    resumed = await index_collection(collection, "train", FixedEmbedder(), FaissStore(tmp_path / "index.npz"), options)
    assert (resumed.unchanged, resumed.added, resumed.documents) == (200, 300, 500)


async def test_batches_in_flight_never_exceed_the_concurrency() -> None:
    """Batches 0 and 1 read and wait in embed; batch 2 reads only once one of them has been written."""
    images = [CollectionImage.from_relative("/c", f"{i}.jpg", None, size=1, mtime=0.0) for i in range(4)]
    read, written = [], []
    released = {i: asyncio.Event() for i in range(4)}
    both_embedding, third_read = asyncio.Event(), asyncio.Event()
    embedding = 0

    async def read_stage(batch: list[CollectionImage]) -> DecodedBatch:
        read.append(batch[0].path)
        if len(read) == 3:
            third_read.set()
        return DecodedBatch(images=batch, pixels=np.zeros((1, 2, 2, 3), np.uint8), failed=[])

    async def embed_stage(decoded: DecodedBatch) -> list:
        nonlocal embedding
        embedding += 1
        if embedding == 2:
            both_embedding.set()
        await released[int(decoded.images[0].path[0])].wait()
        embedding -= 1
        return []

    async def write_stage(documents: list) -> None:
        written.append(len(documents))

    run = asyncio.ensure_future(index_batches([[image] for image in images], IndexReport(), concurrency=2,
                                              read=read_stage, embed=embed_stage, write=write_stage,
                                              done=lambda count: None))
    await asyncio.wait_for(both_embedding.wait(), 10)
    assert read == ["0.jpg", "1.jpg"]  # the other two wait for a slot
    released[1].set()
    await asyncio.wait_for(third_read.wait(), 10)
    assert read == ["0.jpg", "1.jpg", "2.jpg"] and written == [0]
    for event in released.values():
        event.set()
    await asyncio.wait_for(run, 10)
    assert read == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"] and len(written) == 4


def test_one_batch_in_flight_reads_on_every_core_and_overlapping_batches_on_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert (read_threads(1), read_threads(2), read_threads(3)) == (4, 1, 1)
