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

from services.common.collection import resolve_inside
from services.common.embedding import Embedding, EmbeddingService
from services.common.errors import CbirError, IndexNotReadyError
from services.common.status import IndexProgress, Status
from services.common.stores.base import StoreHit, VectorStore

logger = logging.getLogger(__name__)


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
        """The query's embedding and its `k` nearest indexed images, best first."""
        await self.ensure_ready()
        [embedding] = await self.embedder.embed(image[np.newaxis])
        return embedding, await self.store.search(embedding.vector, k)

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


def _consume_exception(task: asyncio.Task) -> None:
    # Every waiting request re-raises the failure; this only keeps asyncio from reporting it as
    # "never retrieved" when all of them went away first.
    if not task.cancelled():
        task.exception()
