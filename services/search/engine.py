"""What a search does: embed the query image (or read an indexed one's vector), ask the store, shape the
hits; what adding and deleting an image does; and swapping to a new model and its index.

Whether any of it can run yet is `services.search.readiness`, reported as one status
(`services.common.status.Status`): `indexing` while a background run fills the index, `empty` without
documents, `failed` when indexing failed or a dependency is down, `ready`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import Gauge, Histogram

from services.common.collection import resolve_inside
from services.common.documents import UPLOAD_SOURCE, ImageDocument, StoredImage, content_id
from services.common.embedding import Embedding, EmbeddingService
from services.common.errors import CbirError, DocumentNotFoundError, IndexNotReadyError, InvalidQueryError
from services.common.scoring import visual_similarities
from services.common.status import IndexProgress, Status
from services.common.stores.base import CollectionStats, StoreHit, StoreQuery, VectorStore
from services.search.batching import QueryBatcher
from services.search.readiness import Readiness
from services.search.uploads import UploadFolder

logger = logging.getLogger(__name__)

STAGE_SECONDS = Histogram("cbir_stage_seconds", "seconds a request spends in each stage: decode, embed, search",
                          ["stage"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
DOCUMENTS = Gauge("cbir_documents", "documents in the index, as of the last readiness check or write")
VERIFY_EVERY_S = 5.0  # how often a ready engine checks that its index is still the served one
MODEL_VERSION = Gauge("cbir_model_version_info", "the model version searched (1 for the current one)",
                      ["model_version"])


# A background job of the gateway's lifespan (`cbir serve`): indexes into the engine's store, or builds a new
# generation (`SearchEngine.swap`), keeping the progress up to date.
IndexingJob = Callable[["SearchEngine", IndexProgress], Awaitable[object]]

# What a swap replays onto the new index (`carry_over(served, successor, embedder, deleted_ids)`): the uploads
# added and the ids deleted while it was built. The composition root knows how (the uploads folder, the
# rollover); the engine only knows when: under the write lock, before the new pair serves.
CarryOver = Callable[[VectorStore, VectorStore, EmbeddingService, frozenset[str]], Awaitable[object]]


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """What every search takes besides its query: the page (hits `offset` to `offset + k`) and the filters
    (ground-truth `labels`; `same_class`: only documents whose stored prediction is the query's class)."""

    k: int = 10
    offset: int = 0
    labels: frozenset[str] | None = None
    same_class: bool = False

    def query(self, vector: np.ndarray, *, predicted_label: str | None,
              exclude: frozenset[str] = frozenset()) -> StoreQuery:
        if self.same_class and predicted_label is None:
            raise InvalidQueryError("same_class needs one query image, whose predicted class it keeps; "
                                    "restrict a query by several examples with label= instead")
        return StoreQuery(vector=vector, k=self.k, offset=self.offset, labels=self.labels,
                          predicted_labels=frozenset({predicted_label}) if self.same_class else None,
                          exclude_ids=exclude)


@dataclass(frozen=True)
class Answer:
    """The hits of one query and the model version of every vector behind them (the query's and the hits'), with
    each hit's `similarities`: the cosine of the visual parts alone (`visual_similarities`), None where undefined."""

    hits: list[StoreHit]
    model_version: str
    embedding: Embedding | None = None  # the query image's, when it was embedded
    similarities: list[float | None] = field(default_factory=list)


class Generation:
    """A model and the index its vectors fill: what one request uses from start to end, so a swap to a new
    model (`SearchEngine.swap`) never mixes two vector spaces in one answer."""

    def __init__(self, embedder: EmbeddingService, store: VectorStore, *, model_version: str | None = None) -> None:
        self.embedder = embedder
        self.store = store
        self.model_version = model_version  # set once embedder and store agree
        self.queries = QueryBatcher(store)
        self._users = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def used(self) -> Iterator[Generation]:
        self._users += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._users -= 1
            if not self._users:
                self._idle.set()

    async def answer(self, query: np.ndarray, hits: list[StoreHit], *, embedding: Embedding | None = None) -> Answer:
        """The answer of `hits` found for the `query` vector, with each hit's visual similarity (read off its
        score, the model's vector layout and the hit's predicted class: `visual_similarities`)."""
        info = await self.embedder.info()
        classes = {name: index for index, name in enumerate(info.classes)}
        similarities = visual_similarities([hit.score for hit in hits],
                                           [classes.get(hit.image.predicted_label) for hit in hits],
                                           query=query, visual_dims=info.pca_dims, onehot_weight=info.onehot_weight)
        return Answer(hits, self.model_version or "", embedding, similarities)

    async def close(self, *, wait_s: float = 60.0) -> None:
        """Close embedder and store once the requests still using them are done (at most `wait_s`)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._idle.wait()
        await self.store.close()
        await self.embedder.close()


class SearchEngine:
    """Joins an embedding service, a store and the uploads folder; ready once embedder and store agree
    on the model version.

    Readiness is re-checked on every call until it succeeds, so the gateway recovers by itself
    when the embedder or the store comes back, and becomes ready by itself when indexing ends. The engine
    owns embedder and store (`close`); `swap` replaces both at once by a new generation.
    """

    def __init__(self, embedder: EmbeddingService, store: VectorStore, *, uploads: UploadFolder) -> None:
        self._active = Generation(embedder, store)
        self.uploads = uploads
        self._readiness = Readiness(check=lambda: self._check_ready(self._active),
                                    verify=lambda model_version: self._active.store.verify(model_version))
        self._writes = asyncio.Lock()  # adds and deletes, against a swap
        self._revision = 0  # counts the changes this engine makes or sees end: adds, deletes, runs, swaps

    @property
    def embedder(self) -> EmbeddingService:
        return self._active.embedder

    @property
    def store(self) -> VectorStore:
        return self._active.store

    @property
    def model_version(self) -> str | None:
        """The model version searched; None while search is not ready (a run that blocks search goes, or the
        index is unchecked)."""
        return self._readiness.model_version

    @property
    def revision(self) -> tuple[int, int]:
        """Changes when the collection does through this engine (an add, a delete, a background run's end, a swap to
        a new index): what is computed from the whole collection (near-duplicate groups) is kept until it changes."""
        return id(self._active), self._revision

    @property
    def last_failure(self) -> str | None:
        """Why the last background run failed (None: it did not), for `/collection`."""
        return self._readiness.last_failure

    @property
    def progress(self) -> IndexProgress | None:
        """The running background job's progress (blocking search or not), for `/collection`."""
        return self._readiness.progress

    async def close(self) -> None:
        await self._active.close(wait_s=0)

    async def servable(self) -> bool:
        """Whether the index can be searched as it is (its model is the embedder's, and it holds documents)."""
        try:
            await self.ensure_ready()
        except CbirError:
            return False
        return True

    def start_indexing(self, job: IndexingJob, *, serving: bool = False) -> asyncio.Task[None]:
        """Run `job` in the background. With `serving`, search goes on meanwhile (the index is usable as it
        is: the job updates it, or builds the next generation); without, searches and `/healthz` answer 503
        `indexing` until it ends.

        The caller owns the task (the gateway's lifespan cancels it on shutdown). A failed run leaves
        the engine `failed` with the reason (with `serving`, only `last_failure` says it), and the process up.
        """
        progress = IndexProgress()
        self._readiness.start_indexing(progress, serving=serving)
        return asyncio.create_task(self._run_indexing(job, progress), name="indexing")

    async def _run_indexing(self, job: IndexingJob, progress: IndexProgress) -> None:
        try:
            await job(self, progress)
        except CbirError as exc:
            failure: str | None = f"indexing failed: {exc.message}"
            logger.error("%s", failure)
        except Exception as exc:  # a bug: keep serving, say so in /healthz, keep the traceback in the log
            failure = f"indexing failed: {type(exc).__name__}: {exc}"
            logger.exception("indexing failed")
        except BaseException:  # cancelled (shutdown): no outcome to report
            self._readiness.indexing_cancelled()
            raise
        else:
            failure = None
        self._revision += 1
        if failure is not None:
            self._readiness.indexing_failed(failure)  # /collection says it, also when search went on meanwhile
            return
        self._readiness.indexing_finished()
        try:
            await self.ensure_ready()
        except CbirError as exc:
            logger.warning("indexing finished, but search is not ready: %s", exc.message)

    async def ensure_ready(self) -> str:
        """The model version searched; raises the reason (503 or 409) while search cannot answer. Requests
        arriving while a check runs share its outcome; a ready index is verified every `VERIFY_EVERY_S`."""
        return await self._readiness.ensure(verify_every_s=VERIFY_EVERY_S)

    async def _check_ready(self, generation: Generation) -> str:
        info = await generation.embedder.info()
        # Missing or unreadable: IndexNotReadyError (503); another model's: 409; unreachable: 503; refused
        # credentials: StoreAuthError, naming the settings to fix.
        await generation.store.open(dims=info.dims, model_version=info.model_version, create=False)
        documents = await generation.store.count()
        if documents == 0:
            raise IndexNotReadyError("the index is empty; build it with `cbir index`")
        # One search before the first request's: what a store sets up for searching (FAISS: its copy of the table,
        # 10 ms at 50,000 documents; Elasticsearch: what the first kNN query loads) is paid here, not by a user.
        await generation.store.search_many([StoreQuery(np.eye(1, info.dims, dtype=np.float32)[0], k=1)])
        generation.model_version = info.model_version
        _publish(info.model_version, documents)
        logger.info("search ready: model %s, %s store", info.model_version, generation.store.name)
        return info.model_version

    @contextlib.asynccontextmanager
    async def _ready_generation(self) -> AsyncIterator[Generation]:
        """The generation a request uses from start to end: ready, and not closed under it by a swap."""
        await self.ensure_ready()
        with self._active.used() as generation:
            yield generation

    async def swap(self, embedder: EmbeddingService, store: VectorStore, *, carry_over: CarryOver) -> None:
        """Serve `embedder` and `store` (a complete index of that embedder's vectors) from now on, both at once;
        the old generation closes when its last request is done. `carry_over` first replays the uploads added
        and the images deleted since the background run began onto the new index, with adds and deletes held
        meanwhile. The engine owns both from the call on: if the swap fails, it closes them and the old
        generation serves on."""
        try:
            info = await embedder.info()
            await store.open(dims=info.dims, model_version=info.model_version, create=False)
            async with self._writes:
                old = self._active
                await carry_over(old.store, store, embedder, self._readiness.deleted_meanwhile)
                documents = await store.count()
                self._active = Generation(embedder, store, model_version=info.model_version)
                self._revision += 1
                self._readiness.swapped(info.model_version)
        except BaseException:
            await Generation(embedder, store).close(wait_s=0)
            raise
        _publish(info.model_version, documents)
        logger.info("now serving model %s (%d documents); closing model %s", info.model_version, documents,
                    old.model_version)
        await old.close()

    async def status(self) -> tuple[Status, IndexNotReadyError | None]:
        """The status `/healthz` and `/collection` report, and the reason when it is not ready."""
        try:
            await self.ensure_ready()
        except IndexNotReadyError as exc:
            return Status(exc.status), exc
        except CbirError as exc:  # an unavailable embedder or store is `failed`
            return Status.failed, IndexNotReadyError(exc.message, status=Status.failed)
        return (Status.warming_up if self.embedder.warming_up else Status.ready), None

    # -- searches -------------------------------------------------------------------------------

    async def search_images(self, images: np.ndarray, options: SearchOptions) -> list[Answer]:
        """Each image's hits, best first, with its embedding.

        Concurrent searches share work twice: the micro-batcher embeds them in one forward pass, and
        the query batcher sends the vectors that come out of it to the store in one `search_many`; the
        images of one call (a batch request) are one micro-batch and one `search_many`.
        """
        async with self._ready_generation() as generation:
            with STAGE_SECONDS.labels(stage="embed").time():
                embeddings = await generation.embedder.embed(images)
            queries = [options.query(e.vector, predicted_label=e.label) for e in embeddings]
            with STAGE_SECONDS.labels(stage="search").time():
                results = await asyncio.gather(*(generation.queries.search(query) for query in queries))
            return [await generation.answer(query.vector, hits, embedding=embedding)
                    for query, embedding, hits in zip(queries, embeddings, results, strict=True)]

    async def similar(self, id: str, options: SearchOptions) -> tuple[StoredImage, Answer]:
        """The images most similar to an indexed one (by its stored vector), itself left out."""
        async with self._ready_generation() as generation:
            document = await self._document(generation, id)
            vectors = await generation.store.vectors([id])
            if id not in vectors:  # deleted in between
                raise DocumentNotFoundError(f"no indexed image with id {id!r}")
            query = options.query(vectors[id], predicted_label=document.predicted_label, exclude=frozenset({id}))
            with STAGE_SECONDS.labels(stage="search").time():
                hits = await generation.queries.search(query)
            return document, await generation.answer(query.vector, hits)

    async def search_examples(self, positive: Sequence[str], negative: Sequence[str], *, beta: float,
                              options: SearchOptions) -> Answer:
        """"More like these, less like those" (Rocchio): the query is the L2-normalised mean of the
        positives' vectors minus `beta` times the mean of the negatives'; the examples are left out."""
        async with self._ready_generation() as generation:
            ids = list(dict.fromkeys([*positive, *negative]))
            vectors = await generation.store.vectors(ids)
            missing = [i for i in ids if i not in vectors]
            if missing:
                shown = ", ".join(repr(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise DocumentNotFoundError(f"no indexed image with id {shown}")
            query = np.mean([vectors[i] for i in positive], axis=0)
            if negative:
                query = query - beta * np.mean([vectors[i] for i in negative], axis=0)
            norm = float(np.linalg.norm(query))
            if norm < 1e-6:
                raise InvalidQueryError("the examples cancel out (the positives' mean minus beta times the "
                                        "negatives' is zero); use fewer negatives or a smaller beta")
            store_query = options.query((query / norm).astype(np.float32), predicted_label=None,
                                        exclude=frozenset(ids))
            with STAGE_SECONDS.labels(stage="search").time():
                hits = await generation.queries.search(store_query)
            return await generation.answer(store_query.vector, hits)

    # -- documents ------------------------------------------------------------------------------

    async def document(self, id: str) -> StoredImage:
        return await self._document(self._active, id)

    @staticmethod
    async def _document(generation: Generation, id: str) -> StoredImage:
        document = await generation.store.get(id)
        if document is None:
            raise DocumentNotFoundError(f"no indexed image with id {id!r}")
        return document

    async def add_image(self, data: bytes, decode: Callable[[], Awaitable[tuple[np.ndarray, bytes, str]]], *,
                        label: str | None) -> tuple[StoredImage, bool]:
        """Store an upload as a document whose id is the hash of `data`; returns it and whether it is new (False:
        those bytes were added before, and nothing changed). `decode()` gives the model's pixels, the re-encoded
        file and its extension; it is called only for bytes not stored yet. On return the file is on disk and
        the document durable and searchable."""
        id = content_id(data)
        existing = await self.store.get(id)
        if existing is not None:  # the same bytes again: nothing to decode
            return existing, False
        pixels, encoded, extension = await decode()
        async with self._writes, self._ready_generation() as generation:
            existing = await generation.store.get(id)  # a concurrent upload of the same bytes may have won
            if existing is not None:
                return existing, False
            with STAGE_SECONDS.labels(stage="embed").time():
                [embedding] = await generation.embedder.embed(pixels[np.newaxis], purpose="index")
            relative = await self.uploads.save(id, encoded, extension)
            document = ImageDocument(id=id, filename=relative, path=relative, source=UPLOAD_SOURCE, label=label,
                                     predicted_label=embedding.label, confidence=embedding.confidence,
                                     size=len(encoded), mtime=time.time(), model_version=generation.model_version,
                                     vector=embedding.vector)
            try:
                added = await generation.store.add(document)
            except BaseException:
                if await generation.store.get(id) is None:  # no document refers to the file: do not leave it
                    await self.uploads.delete(relative)
                raise
            DOCUMENTS.inc(added)
            self._revision += added
            return (document.stored() if added else await self._document(generation, id)), added

    async def remove_image(self, id: str) -> StoredImage:
        """Delete a document (and, for an upload, its file); on return no search finds it."""
        async with self._writes, self._ready_generation() as generation:
            document = await self._document(generation, id)
            if not await generation.store.remove(id):
                raise DocumentNotFoundError(f"no indexed image with id {id!r}")
            self._readiness.deleted(id)
            self._revision += 1
            DOCUMENTS.dec()
            if document.source == UPLOAD_SOURCE:
                await self.uploads.delete(document.path)
            return document

    async def collection(self) -> CollectionStats:
        return await self.store.stats()

    async def image_path(self, id: str) -> Path | None:
        """The file of an indexed image, never a path outside its collection root or the uploads folder."""
        document = await self.store.get(id)
        return None if document is None else self.document_path(document)

    def document_path(self, document: StoredImage) -> Path | None:
        """The file of a document, in the uploads folder or inside its collection root; None when it is gone or
        its path leaves them."""
        if document.source == UPLOAD_SOURCE:
            return self.uploads.path_of(document.path)
        return resolve_inside(Path(document.source), document.path)


def _publish(model_version: str, documents: int) -> None:
    """The gauges of what is searched now."""
    DOCUMENTS.set(documents)
    MODEL_VERSION.clear()
    MODEL_VERSION.labels(model_version=model_version).set(1)


