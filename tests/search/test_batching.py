"""The query batcher: searches that arrive together reach the store in one call; the first call is held at a
gate while the next ones arrive."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest
from factories import make_document
from fakes import settle

from services.common.documents import StoreHit
from services.common.errors import OverloadedError, StoreUnavailableError
from services.common.stores.base import StoreQuery
from services.search.batching import QueryBatcher

pytestmark = pytest.mark.anyio


class CountingStore:
    """Answers each query with `k` hits named after its first vector component; records every call's size.
    Each call sets `called` and waits for `gate` (open at first); with `fail`, it raises."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.called = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = fail

    async def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        self.calls.append(len(queries))
        self.called.set()
        await self.gate.wait()
        if self.fail:
            raise StoreUnavailableError("the store went away")
        return [[StoreHit(make_document(f"hit-{q.vector[0]:g}", q.vector).stored(), 1.0)] * q.k for q in queries]


def query(value: float, k: int = 1) -> StoreQuery:
    return StoreQuery(vector=np.array([value, 1.0], dtype=np.float32), k=k)


async def busy(store: CountingStore, batcher: QueryBatcher) -> asyncio.Future[list[StoreHit]]:
    """A first search, in flight at the store's closed gate."""
    store.gate.clear()
    first = asyncio.ensure_future(batcher.search(query(0)))
    await store.called.wait()
    store.called.clear()
    return first


async def queued(batcher: QueryBatcher, *values: float) -> list[asyncio.Future[list[StoreHit]]]:
    """Searches that have reached the batcher and wait for their answer."""
    searches = [asyncio.ensure_future(batcher.search(query(value))) for value in values]
    await settle()
    return searches


async def test_queries_that_arrive_together_share_one_store_call() -> None:
    store = CountingStore()
    batcher = QueryBatcher(store)
    results = await asyncio.gather(*(batcher.search(query(i, k=i % 3 + 1)) for i in range(12)))
    assert store.calls == [12]
    assert [r[0].id for r in results] == [f"hit-{i}" for i in range(12)]  # each caller gets its own answer
    assert [len(r) for r in results] == [i % 3 + 1 for i in range(12)]


async def test_queries_arriving_during_a_call_go_together_in_the_next() -> None:
    store = CountingStore()
    batcher = QueryBatcher(store)
    first = await busy(store, batcher)
    later = await queued(batcher, *range(1, 6))
    assert store.calls == [1] and not store.called.is_set()  # nothing more while one call runs
    store.gate.set()
    results = await asyncio.gather(first, *later)
    assert store.calls == [1, 5]
    assert [r[0].id for r in results] == [f"hit-{i}" for i in range(6)]


async def test_a_batch_holds_at_most_max_batch_queries() -> None:
    store = CountingStore()
    batcher = QueryBatcher(store, max_batch=2)
    first = await busy(store, batcher)
    later = await queued(batcher, *range(1, 6))
    store.gate.set()
    await asyncio.gather(first, *later)
    assert store.calls == [1, 2, 2, 1]


async def test_a_failed_store_call_fails_each_of_its_queries_and_the_next_batch_runs() -> None:
    store = CountingStore(fail=True)
    batcher = QueryBatcher(store)
    outcomes = await asyncio.gather(*(batcher.search(query(i)) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, StoreUnavailableError) for o in outcomes)
    store.fail = False
    assert (await batcher.search(query(7)))[0].id == "hit-7"
    assert store.calls == [3, 1]


async def test_a_caller_that_goes_away_does_not_break_the_batch() -> None:
    store = CountingStore()
    batcher = QueryBatcher(store)
    blocker = await busy(store, batcher)
    gone, kept = await queued(batcher, 1, 2)
    gone.cancel()
    store.gate.set()
    assert (await kept)[0].id == "hit-2" and (await blocker)[0].id == "hit-0"
    assert store.calls == [1, 1]  # the cancelled query was not sent



async def test_past_max_waiting_a_query_is_refused_at_once_and_the_waiting_ones_are_answered() -> None:
    store = CountingStore()
    batcher = QueryBatcher(store, max_waiting=3)
    first = await busy(store, batcher)
    later = await queued(batcher, 1, 2, 3)
    with pytest.raises(OverloadedError) as refused:
        await batcher.search(query(4))
    assert refused.value.status_code == 503 and refused.value.retry_after >= 1
    store.gate.set()
    results = await asyncio.gather(first, *later)
    assert [r[0].id for r in results] == [f"hit-{i}" for i in range(4)] and store.calls == [1, 3]
    assert (await batcher.search(query(5)))[0].id == "hit-5"  # room again once the line has gone
