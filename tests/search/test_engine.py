"""The search engine's query batcher: searches that arrive together reach the store in one call."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest
from factories import make_document

from services.common.documents import StoreHit
from services.common.errors import StoreUnavailableError
from services.common.stores.base import StoreQuery
from services.search.engine import QueryBatcher

pytestmark = pytest.mark.anyio


class CountingStore:
    """Answers each query with one hit named after its first vector component; records every call."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = fail

    async def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        self.calls.append(len(queries))
        await self.gate.wait()
        if self.fail:
            raise StoreUnavailableError("the store went away")
        return [[StoreHit(make_document(f"hit-{q.vector[0]:g}", q.vector).stored(), 1.0)] * q.k for q in queries]


def query(value: float, k: int = 1) -> StoreQuery:
    return StoreQuery(vector=np.array([value, 1.0], dtype=np.float32), k=k)


async def test_queries_that_arrive_together_share_one_store_call() -> None:
    store = CountingStore()
    batcher = QueryBatcher(store)
    results = await asyncio.gather(*(batcher.search(query(i, k=i % 3 + 1)) for i in range(12)))
    assert store.calls == [12]
    assert [r[0].id for r in results] == [f"hit-{i}" for i in range(12)]  # each caller gets its own answer
    assert [len(r) for r in results] == [i % 3 + 1 for i in range(12)]


async def test_queries_arriving_during_a_call_go_together_in_the_next() -> None:
    store = CountingStore()
    store.gate.clear()
    batcher = QueryBatcher(store)
    first = asyncio.ensure_future(batcher.search(query(0)))
    await asyncio.sleep(0.01)  # the first call is in flight
    later = [asyncio.ensure_future(batcher.search(query(i))) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    assert store.calls == [1]  # nothing more while one call runs
    store.gate.set()
    await asyncio.gather(first, *later)
    assert store.calls == [1, 5]


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
    store.gate.clear()
    batcher = QueryBatcher(store)
    blocker = asyncio.ensure_future(batcher.search(query(0)))
    await asyncio.sleep(0.01)
    gone, kept = asyncio.ensure_future(batcher.search(query(1))), asyncio.ensure_future(batcher.search(query(2)))
    await asyncio.sleep(0)
    gone.cancel()
    store.gate.set()
    assert (await kept)[0].id == "hit-2" and (await blocker)[0].id == "hit-0"
    assert store.calls == [1, 1]  # the cancelled query was not sent
