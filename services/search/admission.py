"""Admission control: at most `capacity` searches run at once, and one that cannot start within `max_wait_s`
is refused (`OverloadedError`: 503 + Retry-After) instead of queueing behind the others for seconds.

    limiter = AdmissionLimiter(capacity=32, max_wait_s=0.25)
    async with limiter.admit():   # raises OverloadedError when no slot frees within the wait
        ...                       # decode, embed, search

Past its capacity a server gains no throughput, only latency: every request admitted beyond it waits in the
micro-batcher's and the query batcher's queues instead, where nothing can refuse it any more. Here a waiting
request either starts within the stated wait or is told at once to come back later, so an overloaded server
answers the requests it takes within a bounded time and refuses the rest quickly. Waiting requests start in
arrival order; one whose client went away leaves the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Counter, Gauge

from services.common.errors import OverloadedError

ADMISSION_REFUSED = Counter("cbir_admission_refused_total", "searches refused with 503 (no slot within the wait)",
                            ["reason"])
ADMISSION_IN_FLIGHT = Gauge("cbir_admission_in_flight", "searches running (holding a slot)")
ADMISSION_WAITING = Gauge("cbir_admission_waiting", "searches waiting for a slot")


class AdmissionLimiter:
    """Slots for `capacity` concurrent requests; a request waits at most `max_wait_s` for one, in arrival order,
    and at most `max_waiting` requests wait at once (more are refused without waiting).

    Single event loop, no threads: every method runs on the loop that serves the requests.
    """

    def __init__(self, capacity: int, *, max_wait_s: float, max_waiting: int | None = None,
                 retry_after_s: int = 1) -> None:
        if capacity < 1 or max_wait_s < 0:
            raise ValueError(f"capacity must be ≥ 1 and max_wait_s ≥ 0, got {capacity} and {max_wait_s}")
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self.max_waiting = 4 * capacity if max_waiting is None else max_waiting
        self.retry_after_s = retry_after_s
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a slot for the body of the `async with`; `OverloadedError` if none frees within the wait."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._in_flight < self.capacity:  # then nobody waits: a freed slot goes to a waiting request first
            self._take()
            return
        if len(self._waiters) >= self.max_waiting or self.max_wait_s == 0:
            self._refuse("line full" if self.max_wait_s else "no wait")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        ADMISSION_WAITING.inc()
        try:
            async with asyncio.timeout(self.max_wait_s):
                await waiter
        except TimeoutError:
            if not waiter.cancelled():  # handed a slot at the very moment the wait ran out: keep it
                return
            self._refuse("waited too long")
        except asyncio.CancelledError:  # the client went away: a slot handed over meanwhile goes to the next
            if waiter.done() and not waiter.cancelled():
                self._release()
            raise
        finally:
            ADMISSION_WAITING.dec()
            if not waiter.done():
                waiter.cancel()
            self._forget(waiter)

    def _take(self) -> None:
        self._in_flight += 1
        ADMISSION_IN_FLIGHT.inc()

    def _release(self) -> None:
        """Give the slot to the first request still waiting, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: in flight stays the same
                return
        self._in_flight -= 1
        ADMISSION_IN_FLIGHT.dec()

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):  # already taken off the line by `_release`
            self._waiters.remove(waiter)

    def _refuse(self, reason: str) -> None:
        ADMISSION_REFUSED.labels(reason).inc()
        raise OverloadedError(f"the server is at capacity ({self.capacity} searches running); retry shortly",
                              retry_after=max(1, math.ceil(self.retry_after_s)))
