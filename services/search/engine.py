"""What a search does: embed the decoded upload, ask the store, shape the hits; and whether it can yet.

Readiness is one status (`services.common.status.Status`): `indexing` while a background run fills
the index, `empty` without documents, `failed` when indexing failed or a dependency is down, `ready`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from prometheus_client import Histogram

from services.common.collection import resolve_inside
from services.common.embedding import Embedding, EmbeddingService
from services.common.errors import CbirError, IndexNotReadyError, StoreError
from services.common.status import IndexProgress, Status
from services.common.stores.base import StoreHit, StoreQuery, VectorStore

logger = logging.getLogger(__name__)

SEARCH_BATCH_QUERIES = Histogram("cbir_search_batch_queries", "queries per store call of the query batcher",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


# A background job: fills `store` with `embedder`'s vectors, keeping the progress up to date.
IndexingJob = Callable[[EmbeddingService, VectorStore, IndexProgress], Awaitable[object]]


class SearchEngine:
    """Joins an embedding service and a store; ready once both agree on the model version.

    Readiness is re-checked on every call until it succeeds, so the gateway recovers by itself
    when the embedder or the store comes back, and becomes ready by itself when indexing ends.
    """

    def __init__(self, embedder: EmbeddingService, store: VectorStore, *, data_dir: Path | None) -> None:
        self.embedder = embedder
        self.store = store
        self.data_dir = data_dir
        self.model_version: str | None = None
        self._readiness: asyncio.Task[str] | None = None
        self._indexing: IndexProgress | None = None  # set while a background run goes
        self._indexing_failure: str | None = None
        self._queries = QueryBatcher(store)

    def start_indexing(self, job: IndexingJob) -> asyncio.Task[None]:
        """Run `job` in the background; until it ends, searches and `/healthz` answer 503 `indexing`.

        The caller owns the task (the gateway's lifespan cancels it on shutdown). A failed run leaves
        the engine `failed` with the reason, and the process up.
        """
        progress = IndexProgress()
        self._indexing, self._indexing_failure, self.model_version = progress, None, None
        return asyncio.create_task(self._run_indexing(job, progress), name="indexing")

    async def _run_indexing(self, job: IndexingJob, progress: IndexProgress) -> None:
        try:
            await job(self.embedder, self.store, progress)
        except CbirError as exc:
            self._indexing_failure = f"indexing failed: {exc.message}"
            logger.error("%s", self._indexing_failure)
        except Exception as exc:  # a bug: keep serving, say so in /healthz, keep the traceback in the log
            self._indexing_failure = f"indexing failed: {type(exc).__name__}: {exc}"
            logger.exception("indexing failed")
        finally:
            self._indexing = None
        if self._indexing_failure is None:
            try:
                await self.ensure_ready()
            except CbirError as exc:
                logger.warning("indexing finished, but search is not ready: %s", exc.message)

    async def ensure_ready(self) -> str:
        """The model version searched; raises the reason (503 or 409) while search cannot answer."""
        if self._indexing is not None:
            progress = self._indexing
            raise IndexNotReadyError(progress.describe(), status=Status.indexing,
                                     progress={"indexed": progress.indexed, "total": progress.total})
        if self._indexing_failure is not None:
            raise IndexNotReadyError(self._indexing_failure, status=Status.failed)
        if self.model_version is not None:
            return self.model_version
        # Requests arriving while a check runs share its outcome instead of queueing for checks of
        # their own, so with the embedder down each still gets its 503 within one embedder timeout.
        if self._readiness is None or self._readiness.done():
            self._readiness = asyncio.create_task(self._check_ready())
            self._readiness.add_done_callback(_consume_exception)
        return await asyncio.shield(self._readiness)

    async def _check_ready(self) -> str:
        info = await self.embedder.info()
        # Missing or unreadable: IndexNotReadyError (503); another model's: 409; unreachable: 503; refused
        # credentials: StoreAuthError, naming the settings to fix.
        await self.store.open(dims=info.dims, model_version=info.model_version, create=False)
        if await self.store.count() == 0:
            raise IndexNotReadyError("the index is empty; build it with `cbir index`")
        self.model_version = info.model_version
        logger.info("search ready: model %s, %s store", info.model_version, self.store.name)
        return self.model_version

    async def search(self, image: np.ndarray, k: int) -> tuple[Embedding, list[StoreHit]]:
        """The query's embedding and its `k` nearest indexed images, best first.

        Concurrent searches share work twice: the micro-batcher embeds them in one forward pass, and
        the query batcher sends the vectors that come out of it to the store in one `search_many`.
        """
        await self.ensure_ready()
        [embedding] = await self.embedder.embed(image[np.newaxis])
        return embedding, await self._queries.search(StoreQuery(vector=embedding.vector, k=k))

    async def image_path(self, id: str) -> Path | None:
        """The file of an indexed image, never a path outside the collection."""
        if self.data_dir is None:
            return None
        document = await self.store.get(id)
        if document is None:
            return None
        try:
            return resolve_inside(self.data_dir, document.path)
        except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, name too long, symlink loop
            logger.warning("image %s has an unusable stored path %r: %s", id, document.path[:200], exc)
            return None


class QueryBatcher:
    """Sends the store the queries that arrive together in one `search_many` call.

    At most one call is in flight; the queries that arrive meanwhile wait and go together in the
    next one, so batches grow with the load instead of the calls piling up (as the embedder's
    micro-batcher does for forward passes).
    """

    def __init__(self, store: VectorStore, *, max_batch: int = 256) -> None:
        self.store = store
        self.max_batch = max_batch
        self._waiting: list[tuple[StoreQuery, asyncio.Future[list[StoreHit]]]] = []
        self._running: asyncio.Task[None] | None = None

    async def search(self, query: StoreQuery) -> list[StoreHit]:
        future: asyncio.Future[list[StoreHit]] = asyncio.get_running_loop().create_future()
        self._waiting.append((query, future))
        if self._running is None:
            # Started on the next turn of the loop, so that requests resumed by the same forward pass
            # (their futures resolve in one turn) are all waiting by then.
            self._running = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)
            while self._waiting:
                batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
                live = [(query, future) for query, future in batch if not future.done()]  # callers gone
                if live:
                    await self._answer(live)
        finally:
            for _, future in self._waiting:  # only when cancelled (shutdown): nobody is left to answer them
                future.cancel()
            self._waiting, self._running = [], None

    async def _answer(self, batch: list[tuple[StoreQuery, asyncio.Future[list[StoreHit]]]]) -> None:
        SEARCH_BATCH_QUERIES.observe(len(batch))
        try:
            results = await self.store.search_many([query for query, _ in batch])
            if len(results) != len(batch):
                raise StoreError(f"the store answered {len(results)} of {len(batch)} queries")
        except Exception as exc:  # noqa: BLE001 - every query of the batch gets the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled (shutdown): the callers are not left waiting
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), hits in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(hits)


def _consume_exception(task: asyncio.Task) -> None:
    # Every waiting request re-raises the failure; this only keeps asyncio from reporting it as
    # "never retrieved" when all of them went away first.
    if not task.cancelled():
        task.exception()
