"""The query batcher: the searches that arrive together reach the store in one `search_many` call."""

from __future__ import annotations

import asyncio

from prometheus_client import Histogram

from services.common.documents import StoreHit
from services.common.errors import OverloadedError, StoreError
from services.common.stores.base import StoreQuery, VectorStore

SEARCH_BATCH_QUERIES = Histogram("cbir_search_batch_queries", "queries per store call of the query batcher",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


class QueryBatcher:
    """Sends the store the queries that arrive together in one `search_many` call.

    At most one call is in flight; the queries that arrive meanwhile wait and go together in the
    next one, so batches grow with the load instead of the calls piling up (as the embedder's
    micro-batcher does for forward passes). At most `max_waiting` queries wait: one more is refused
    at once with `OverloadedError` (503 + Retry-After) rather than queued behind seconds of store calls.
    """

    def __init__(self, store: VectorStore, *, max_batch: int = 256, max_waiting: int = 1024) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._waiting: list[tuple[StoreQuery, asyncio.Future[list[StoreHit]]]] = []
        self._running: asyncio.Task[None] | None = None

    async def search(self, query: StoreQuery) -> list[StoreHit]:
        """The query's hits, searched together with the queries waiting beside it."""
        if len(self._waiting) >= self.max_waiting:
            raise OverloadedError(f"{len(self._waiting)} searches are waiting for the store; retry shortly")
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

