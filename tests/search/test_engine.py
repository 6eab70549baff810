"""The search engine on fakes (a controlled embedder, a store in memory): searches, adds and deletes, background
runs and what search answers meanwhile, and the swap to a new model and its index."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from factories import make_document
from fakes import ControlledEmbedder, FixedEmbedder, MemoryStore, settle

from services.common.documents import UPLOAD_SOURCE, ImageDocument, content_id
from services.common.embedding import EmbeddingService
from services.common.errors import (
    DocumentNotFoundError,
    EmbedderUnavailableError,
    IndexNotReadyError,
    InvalidQueryError,
    StoreMismatchError,
    StoreUnavailableError,
)
from services.common.status import IndexProgress, Status
from services.common.stores.base import VectorStore
from services.common.stores.faiss import FaissStore
from services.embedder.vectors import PcaProjection, build_vectors
from services.search import engine as engine_module
from services.search.engine import SearchEngine, SearchOptions
from services.search.uploads import UploadFolder

pytestmark = pytest.mark.anyio
DIMS = 16


def documents(count: int = 4, *, model_version: str = "v1", source: str = "/collection") -> list[ImageDocument]:
    """Document i lies along axis i (the query image of value i finds it first), a cat when i is even."""
    axes = np.eye(DIMS, dtype=np.float32)
    return [make_document(f"doc-{i}", axes[i], model_version=model_version, source=source,
                          label="cat" if i % 2 == 0 else "dog", predicted_label="cat" if i % 2 == 0 else "dog",
                          path=f"train/{i}.jpg")
            for i in range(count)]


def unit(*components: float) -> np.ndarray:
    """The unit vector along (components..., 0, ...)."""
    vector = np.zeros(DIMS, dtype=np.float32)
    vector[:len(components)] = components
    return vector / np.linalg.norm(vector)


def image(value: int) -> np.ndarray:
    """A query image that `ControlledEmbedder` embeds along axis `value`."""
    return np.full((4, 4, 3), value, dtype=np.uint8)


def make_engine(tmp_path: Path, store: MemoryStore | None = None,
                embedder: ControlledEmbedder | None = None) -> tuple[SearchEngine, ControlledEmbedder, MemoryStore]:
    embedder = embedder or ControlledEmbedder(dims=DIMS, model_version="v1")
    store = store if store is not None else MemoryStore(documents())
    return SearchEngine(embedder, store, uploads=UploadFolder(tmp_path / "uploads", max_bytes=2**20)), embedder, store


async def eventually(condition: Callable[[], bool], *, within_s: float = 5.0) -> None:
    """Poll `condition` on every turn of the loop until it holds, failing after `within_s`."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0)


# -- readiness, as /healthz reports it -------------------------------------------------------------


async def test_an_index_of_the_embedders_model_is_ready(tmp_path: Path) -> None:
    engine, embedder, _ = make_engine(tmp_path)
    assert engine.model_version is None  # not checked yet
    assert await engine.status() == (Status.ready, None)
    assert engine.model_version == "v1" and await engine.servable()
    embedder.warming_up = True
    assert await engine.status() == (Status.warming_up, None)


@pytest.mark.parametrize(("store", "status", "reason"), [
    (MemoryStore(), Status.empty, "empty"),
    (MemoryStore(exists=False), Status.empty, "no index"),
    (MemoryStore(documents(model_version="v0")), Status.failed, "model version 'v0'"),
])
async def test_an_index_search_cannot_use_says_why(tmp_path: Path, store: MemoryStore, status: Status,
                                                   reason: str) -> None:
    engine, _, _ = make_engine(tmp_path, store)
    got, problem = await engine.status()
    assert got == status and problem is not None and reason in problem.message
    assert not await engine.servable() and engine.model_version is None


async def test_a_down_embedder_is_failed_and_search_recovers_by_itself(tmp_path: Path) -> None:
    engine, embedder, _ = make_engine(tmp_path)
    embedder.failure = EmbedderUnavailableError("the embedder is unreachable")
    status, problem = await engine.status()
    assert status == Status.failed and problem is not None and "unreachable" in problem.message
    with pytest.raises(EmbedderUnavailableError):
        await engine.search_images(image(1)[np.newaxis], SearchOptions(k=1))
    embedder.failure = None
    [answer] = await engine.search_images(image(1)[np.newaxis], SearchOptions(k=1))
    assert answer.hits[0].id == "doc-1"


async def test_a_store_that_moved_to_another_model_refuses_searches(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _, store = make_engine(tmp_path)
    await engine.ensure_ready()
    monkeypatch.setattr(engine_module, "VERIFY_EVERY_S", 0.0)
    store.moved_to = "v2"
    with pytest.raises(StoreMismatchError, match="v2"):
        await engine.search_images(image(1)[np.newaxis], SearchOptions(k=1))
    assert engine.model_version is None


# -- searches ------------------------------------------------------------------------------------


async def test_each_image_gets_its_own_hits_best_first_in_one_store_call(tmp_path: Path) -> None:
    engine, embedder, store = make_engine(tmp_path)
    answers = await engine.search_images(np.stack([image(2), image(3)]), SearchOptions(k=2))
    assert [[hit.id for hit in answer.hits] for answer in answers] == [["doc-2", "doc-0"], ["doc-3", "doc-0"]]
    assert answers[0].hits[0].score == pytest.approx(2.0) and answers[0].hits[1].score == pytest.approx(1.0)
    assert all(answer.model_version == "v1" and answer.embedding is not None for answer in answers)
    # The readiness check's probe (what the store sets up for searching is paid before the first request),
    # then both images in one call.
    assert store.searches == [1, 2] and embedder.embedded == [(2, "query")]


async def test_options_page_and_filter_the_hits(tmp_path: Path) -> None:
    engine, _, _ = make_engine(tmp_path, MemoryStore(documents(6)))
    [page] = await engine.search_images(image(4)[np.newaxis], SearchOptions(k=2, offset=1))
    assert [hit.id for hit in page.hits] == ["doc-0", "doc-1"]  # doc-4 is the first hit: skipped
    [dogs] = await engine.search_images(image(4)[np.newaxis], SearchOptions(k=6, labels=frozenset({"dog"})))
    assert {hit.id for hit in dogs.hits} == {"doc-1", "doc-3", "doc-5"}
    [same] = await engine.search_images(image(4)[np.newaxis], SearchOptions(k=6, same_class=True))
    assert {hit.id for hit in same.hits} == {"doc-0", "doc-2", "doc-4"}  # the query is predicted a cat


async def test_similar_searches_by_the_stored_vector_leaving_the_image_out(tmp_path: Path) -> None:
    engine, embedder, _ = make_engine(tmp_path)
    document, answer = await engine.similar("doc-2", SearchOptions(k=3))
    assert document.id == "doc-2" and "doc-2" not in [hit.id for hit in answer.hits]
    assert answer.model_version == "v1" and embedder.embedded == []  # nothing embedded
    with pytest.raises(DocumentNotFoundError, match="'doc-9'"):
        await engine.similar("doc-9", SearchOptions())


async def test_examples_make_the_normalised_mean_of_positives_minus_beta_negatives(tmp_path: Path) -> None:
    between = unit(0.6, 0.8, 0.3)
    engine, _, _ = make_engine(tmp_path, MemoryStore([*documents(4), make_document("between", between)]))
    answer = await engine.search_examples(["doc-0", "doc-1"], ["doc-2"], beta=0.5, options=SearchOptions(k=1))
    assert [hit.id for hit in answer.hits] == ["between"]  # the examples themselves are left out
    query = unit(1.0, 1.0, -1.0)  # (e0 + e1) / 2 - 0.5 e2, normalised
    assert answer.hits[0].score == pytest.approx(1.0 + float(query @ between), abs=1e-5)
    with pytest.raises(DocumentNotFoundError, match="'nope'"):
        await engine.search_examples(["doc-0", "nope"], [], beta=0.5, options=SearchOptions())
    with pytest.raises(InvalidQueryError, match="cancel out"):
        await engine.search_examples(["doc-0"], ["doc-0"], beta=1.0, options=SearchOptions())


# -- adds and deletes ----------------------------------------------------------------------------


def decoder(value: int, calls: list[int]) -> Callable[[], Awaitable[tuple[np.ndarray, bytes, str]]]:
    async def decode() -> tuple[np.ndarray, bytes, str]:
        calls.append(value)
        return image(value), b"re-encoded %d" % value, "png"
    return decode


async def test_an_upload_is_stored_once_with_its_file(tmp_path: Path) -> None:
    engine, embedder, store = make_engine(tmp_path)
    decoded: list[int] = []
    document, added = await engine.add_image(b"bytes of five", decoder(5, decoded), label="cat")
    assert added and document.id == content_id(b"bytes of five") and document.source == UPLOAD_SOURCE
    assert (document.model_version, document.predicted_label, document.label) == ("v1", "cat", "cat")
    assert (tmp_path / "uploads" / document.path).read_bytes() == b"re-encoded 5"
    assert embedder.embedded == [(1, "index")]
    [answer] = await engine.search_images(image(5)[np.newaxis], SearchOptions(k=1))
    assert answer.hits[0].id == document.id  # searchable on return
    again, added = await engine.add_image(b"bytes of five", decoder(5, decoded), label=None)
    assert not added and again == document and decoded == [5]  # the same bytes: nothing decoded again
    assert await store.count() == 5


async def test_an_upload_the_store_refuses_leaves_no_file(tmp_path: Path) -> None:
    class RefusingStore(MemoryStore):
        async def add(self, document: ImageDocument) -> bool:
            raise StoreUnavailableError("the store is read-only")

    engine, _, _ = make_engine(tmp_path, RefusingStore(documents()))
    with pytest.raises(StoreUnavailableError):
        await engine.add_image(b"refused", decoder(5, []), label=None)
    assert not any((tmp_path / "uploads").iterdir())


async def test_a_deleted_upload_loses_its_file_and_is_not_found_again(tmp_path: Path) -> None:
    engine, _, store = make_engine(tmp_path)
    upload, _ = await engine.add_image(b"upload", decoder(5, []), label=None)
    assert (await engine.remove_image(upload.id)).id == upload.id
    assert not (tmp_path / "uploads" / upload.path).exists() and await store.get(upload.id) is None
    assert (await engine.remove_image("doc-1")).source == "/collection"
    with pytest.raises(DocumentNotFoundError):
        await engine.remove_image("doc-1")
    with pytest.raises(DocumentNotFoundError):
        await engine.document("doc-1")
    assert (await engine.collection()).documents == 3


async def test_an_image_path_never_leaves_its_collection_or_the_uploads(tmp_path: Path) -> None:
    collection = tmp_path / "collection"
    (collection / "train").mkdir(parents=True)
    (collection / "train" / "0.jpg").write_bytes(b"jpeg")
    escaping = make_document("escaping", unit(0.0, 1.0), source=str(collection),
                             path="../../etc/passwd")
    engine, _, _ = make_engine(tmp_path, MemoryStore([*documents(1, source=str(collection)), escaping]))
    upload, _ = await engine.add_image(b"upload", decoder(5, []), label=None)
    assert await engine.image_path("doc-0") == collection / "train" / "0.jpg"
    assert await engine.image_path(upload.id) == tmp_path / "uploads" / upload.path
    assert await engine.image_path("escaping") is None and await engine.image_path("unknown") is None


# -- background runs -----------------------------------------------------------------------------


async def test_a_run_that_blocks_search_answers_indexing_until_it_ends(tmp_path: Path) -> None:
    engine, _, store = make_engine(tmp_path, MemoryStore())
    release = asyncio.Event()

    async def job(engine: SearchEngine, progress: IndexProgress) -> None:
        progress.total = 4
        await release.wait()
        await store.open(dims=DIMS, model_version="v1")
        await store.upsert(documents())
        progress.indexed = 4

    task = engine.start_indexing(job)
    await settle()
    status, problem = await engine.status()
    assert status == Status.indexing and problem is not None and problem.progress == {"indexed": 0, "total": 4}
    assert engine.progress is not None and engine.progress.total == 4
    with pytest.raises(IndexNotReadyError, match="indexing"):
        await engine.search_images(image(1)[np.newaxis], SearchOptions())
    release.set()
    await task
    assert await engine.status() == (Status.ready, None)
    assert engine.progress is None and engine.last_failure is None and engine.model_version == "v1"


@pytest.mark.parametrize(("failure", "reason"), [
    (StoreUnavailableError("the store went away"), "indexing failed: the store went away"),
    (ValueError("a bug"), "indexing failed: ValueError: a bug"),
])
@pytest.mark.parametrize("serving", [False, True])
async def test_a_failed_run_leaves_search_failed_unless_it_went_on_meanwhile(
        tmp_path: Path, failure: Exception, reason: str, serving: bool) -> None:
    engine, _, _ = make_engine(tmp_path)

    async def job(engine: SearchEngine, progress: IndexProgress) -> None:
        raise failure

    await engine.start_indexing(job, serving=serving)  # the task ends normally: the process stays up
    assert engine.last_failure == reason and engine.progress is None
    status, problem = await engine.status()
    if serving:
        assert status == Status.ready and problem is None
    else:
        assert status == Status.failed and problem is not None and problem.message == reason


async def test_a_cancelled_run_stops_without_a_failure(tmp_path: Path) -> None:
    engine, _, _ = make_engine(tmp_path)
    task = engine.start_indexing(lambda engine, progress: asyncio.Event().wait())
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.progress is None and engine.last_failure is None
    assert await engine.status() == (Status.ready, None)


# -- the swap to a new model ---------------------------------------------------------------------


class HeldCarryOver:
    """A `CarryOver` that records its arguments and holds until `release` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[VectorStore, VectorStore, EmbeddingService, frozenset[str]]] = []
        self.started, self.release = asyncio.Event(), asyncio.Event()

    @classmethod
    def released(cls) -> HeldCarryOver:
        """One that does not hold."""
        carry_over = cls()
        carry_over.release.set()
        return carry_over

    async def __call__(self, served: VectorStore, successor: VectorStore, embedder: EmbeddingService,
                       deleted: frozenset[str]) -> None:
        self.calls.append((served, successor, embedder, deleted))
        self.started.set()
        await self.release.wait()


def next_pair() -> tuple[ControlledEmbedder, MemoryStore]:
    return ControlledEmbedder(dims=DIMS, model_version="v2"), MemoryStore(documents(model_version="v2"))


async def test_a_swap_carries_over_under_the_write_lock_then_serves_the_new_pair(tmp_path: Path) -> None:
    engine, embedder, store = make_engine(tmp_path)
    engine.start_indexing(lambda engine, progress: asyncio.Event().wait(), serving=await engine.servable())
    await engine.remove_image("doc-3")  # during the run: the new index must lose it too
    new_embedder, new_store = next_pair()
    carry_over = HeldCarryOver()
    swap = asyncio.ensure_future(engine.swap(new_embedder, new_store, carry_over=carry_over))
    await carry_over.started.wait()
    assert carry_over.calls == [(store, new_store, new_embedder, frozenset({"doc-3"}))]
    removal = asyncio.ensure_future(engine.remove_image("doc-2"))
    await settle()
    assert not removal.done() and "doc-2" in store.documents  # deletes wait for the swap
    carry_over.release.set()
    await swap
    assert (await removal).model_version == "v2"  # then go to the new index
    assert "doc-2" not in new_store.documents and "doc-2" in store.documents
    assert engine.model_version == "v2" and engine.store is new_store and engine.embedder is new_embedder
    [answer] = await engine.search_images(image(1)[np.newaxis], SearchOptions(k=1))
    assert answer.model_version == "v2" and answer.hits[0].image.model_version == "v2"
    assert store.closed and embedder.closed and not new_store.closed


async def test_the_old_pair_closes_after_its_last_request(tmp_path: Path) -> None:
    engine, embedder, store = make_engine(tmp_path)
    await engine.ensure_ready()  # its probe search set `searching`
    store.searching.clear()
    store.search_gate.clear()
    held = asyncio.ensure_future(engine.search_images(image(1)[np.newaxis], SearchOptions(k=1)))
    await store.searching.wait()
    new_embedder, new_store = next_pair()
    swap = asyncio.ensure_future(engine.swap(new_embedder, new_store, carry_over=HeldCarryOver.released()))
    await eventually(lambda: engine.model_version == "v2")
    [answer] = await engine.search_images(image(1)[np.newaxis], SearchOptions(k=1))
    assert answer.model_version == "v2"  # new requests use the new pair at once
    await settle()
    assert not swap.done() and not store.closed and not embedder.closed  # the held one still uses the old
    store.search_gate.set()
    [old_answer] = await held
    assert old_answer.model_version == "v1" and old_answer.hits[0].image.model_version == "v1"
    await swap
    assert store.closed and embedder.closed


@pytest.mark.parametrize("failing", ["carry_over", "new_index"])
async def test_a_failed_swap_closes_the_new_pair_and_the_old_serves_on(tmp_path: Path, failing: str) -> None:
    engine, embedder, store = make_engine(tmp_path)
    await engine.ensure_ready()
    new_embedder, new_store = next_pair()

    async def carry_over(*args: object) -> None:
        raise StoreUnavailableError("the new index went away")

    if failing == "new_index":
        new_store = MemoryStore(documents(model_version="v0"))  # not the new embedder's
    with pytest.raises((StoreUnavailableError, StoreMismatchError)):
        await engine.swap(new_embedder, new_store, carry_over=carry_over if failing == "carry_over"
                          else HeldCarryOver.released())
    assert new_store.closed and new_embedder.closed and not store.closed and not embedder.closed
    assert engine.model_version == "v1" and engine.store is store
    [answer] = await engine.search_images(image(1)[np.newaxis], SearchOptions(k=1))
    assert answer.model_version == "v1" and answer.hits[0].id == "doc-1"


async def test_close_closes_the_embedder_and_the_store(tmp_path: Path) -> None:
    engine, embedder, store = make_engine(tmp_path)
    await engine.close()
    assert embedder.closed and store.closed


# -- the similarity a person reads -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["faiss", "elasticsearch-exact", "elasticsearch-knn"])
async def test_every_search_gives_each_hit_the_cosine_of_the_visual_parts(
        tmp_path: Path, make_es_store: Callable[..., VectorStore], backend: str) -> None:
    """On both stores, each kind of search: the similarity is the cosine of the stored vectors' visual parts."""
    visual_dims, classes = 8, ["cat", "dog"]  # FixedEmbedder(dims=10)'s layout: 8 visual dims, 2 classes, w = 2
    rng = np.random.default_rng(3)
    predicted = rng.integers(0, 2, size=60)
    vectors = build_vectors(rng.normal(size=(60, visual_dims)).astype(np.float32), predicted,
                            projection=PcaProjection(np.zeros(visual_dims, np.float32), np.eye(visual_dims,
                                                                                                dtype=np.float32)),
                            pca_dims=visual_dims, onehot_weight=2.0, num_classes=2)
    docs = [make_document(f"doc-{i}", vector, predicted_label=classes[c], label=classes[c])
            for i, (vector, c) in enumerate(zip(vectors, predicted, strict=True))]
    store = FaissStore(tmp_path / "index.npz") if backend == "faiss" else make_es_store(
        es_search_mode=backend.split("-")[1])
    await store.open(dims=10, model_version="v1")
    await store.upsert(docs)
    await store.flush()
    embedder = FixedEmbedder(dims=10, model_version="v1")
    embedder.vector = vectors[0]
    engine = SearchEngine(embedder, store, uploads=UploadFolder(tmp_path / "uploads", max_bytes=2**20))
    options = SearchOptions(k=20)
    answers = [*(await engine.search_images(image(0)[np.newaxis], options)),
               (await engine.similar("doc-1", options))[1],
               await engine.search_examples(["doc-2", "doc-3"], ["doc-4"], beta=0.5, options=options)]
    stored = {doc.id: doc.vector for doc in docs}
    rocchio = (stored["doc-2"] + stored["doc-3"]) / 2 - 0.5 * stored["doc-4"]
    for answer, query in zip(answers, [vectors[0], stored["doc-1"], rocchio], strict=True):
        assert len(answer.similarities) == len(answer.hits) == 20
        for hit, similarity in zip(answer.hits, answer.similarities, strict=True):
            visual, asked = stored[hit.id][:visual_dims], query[:visual_dims]
            expected = float(asked @ visual / np.linalg.norm(asked) / np.linalg.norm(visual))
            assert similarity == pytest.approx(expected, abs=1e-5)
    image_hits = answers[0]
    same_class = [s for hit, s in zip(image_hits.hits, image_hits.similarities, strict=True)
                  if hit.image.predicted_label == classes[predicted[0]]]
    assert len(same_class) > 5 and len({round(s, 3) for s in same_class}) == len(same_class)  # told apart
    await engine.close()
