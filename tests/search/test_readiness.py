"""The readiness state machine, transition by transition, with a fake check and verify and a clock the test
moves: no model, no store."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import (
    EmbedderUnavailableError,
    IndexNotReadyError,
    StoreMismatchError,
    StoreUnavailableError,
)
from services.common.status import IndexProgress, Status
from services.search.readiness import Checking, Failed, Indexing, Readiness, Ready, Unchecked

pytestmark = pytest.mark.anyio
EVERY_S = 5.0


class FakeIndex:
    """What `Readiness` asks: `check()` waits for `gate`, then answers `model_version` or raises `failure`;
    `verify()` raises `verify_failure` when set. Counts both, sets `checking` when a check begins; `now` is
    the clock."""

    def __init__(self) -> None:
        self.model_version = "v1"
        self.failure: Exception | None = None
        self.verify_failure: Exception | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.checking = asyncio.Event()
        self.checks = self.verifies = 0
        self.now = 100.0

    async def check(self) -> str:
        self.checks += 1
        self.checking.set()
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return self.model_version

    async def verify(self, model_version: str) -> None:
        self.verifies += 1
        if self.verify_failure is not None:
            raise self.verify_failure

    def readiness(self) -> Readiness:
        return Readiness(check=self.check, verify=self.verify, clock=lambda: self.now)


@pytest.fixture
def index() -> FakeIndex:
    return FakeIndex()


async def ready(index: FakeIndex) -> Readiness:
    readiness = index.readiness()
    assert await readiness.ensure(verify_every_s=EVERY_S) == "v1"
    return readiness


async def refusal_of(readiness: Readiness) -> IndexNotReadyError:
    with pytest.raises(IndexNotReadyError) as refused:
        await readiness.ensure(verify_every_s=EVERY_S)
    return refused.value


# -- checking ------------------------------------------------------------------------------------


async def test_it_starts_unchecked_and_the_first_request_checks(index: FakeIndex) -> None:
    readiness = index.readiness()
    assert readiness.state == Unchecked() and readiness.model_version is None and readiness.refusal() is None
    assert await readiness.ensure(verify_every_s=EVERY_S) == "v1"
    assert readiness.state == Ready("v1") and readiness.model_version == "v1" and index.checks == 1
    assert await readiness.ensure(verify_every_s=EVERY_S) == "v1" and index.checks == 1  # ready: not again


async def test_requests_arriving_while_a_check_runs_share_its_outcome(index: FakeIndex) -> None:
    readiness = index.readiness()
    index.gate.clear()
    waiting = [asyncio.ensure_future(readiness.ensure(verify_every_s=EVERY_S)) for _ in range(5)]
    await index.checking.wait()  # each has asked by then: they were scheduled first
    assert isinstance(readiness.state, Checking) and index.checks == 1
    index.gate.set()
    assert await asyncio.gather(*waiting) == ["v1"] * 5
    assert index.checks == 1 and readiness.state == Ready("v1")


async def test_a_request_that_goes_away_does_not_cancel_the_shared_check(index: FakeIndex) -> None:
    readiness = index.readiness()
    index.gate.clear()
    gone, kept = (asyncio.ensure_future(readiness.ensure(verify_every_s=EVERY_S)) for _ in range(2))
    await index.checking.wait()
    gone.cancel()
    index.gate.set()
    assert await kept == "v1" and gone.cancelled()
    assert readiness.state == Ready("v1") and index.checks == 1


async def test_a_failed_check_fails_every_waiting_request_and_the_next_one_checks_again(index: FakeIndex) -> None:
    readiness = index.readiness()
    index.gate.clear()
    index.failure = EmbedderUnavailableError("the embedder is down")
    waiting = [asyncio.ensure_future(readiness.ensure(verify_every_s=EVERY_S)) for _ in range(3)]
    await index.checking.wait()
    index.gate.set()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(outcome, EmbedderUnavailableError) for outcome in outcomes) and index.checks == 1
    assert readiness.state == Unchecked()
    index.failure = None  # the embedder is back: search recovers by itself
    assert await readiness.ensure(verify_every_s=EVERY_S) == "v1" and index.checks == 2


async def test_a_check_that_ends_after_a_run_began_is_ignored(index: FakeIndex) -> None:
    readiness = index.readiness()
    index.gate.clear()
    asked = asyncio.ensure_future(readiness.ensure(verify_every_s=EVERY_S))
    await index.checking.wait()
    progress = IndexProgress()
    readiness.start_indexing(progress, serving=False)
    index.gate.set()
    assert await asked == "v1"  # the request that asked gets the check's answer
    assert readiness.state == Indexing(progress)  # but the run decides what search does now


# -- verifying a ready index ---------------------------------------------------------------------


async def test_a_ready_index_is_verified_at_most_every_verify_every_s(index: FakeIndex) -> None:
    readiness = await ready(index)
    index.now += EVERY_S  # not more than EVERY_S since the engine began
    await readiness.ensure(verify_every_s=EVERY_S)
    assert index.verifies == 0
    index.now += 0.1
    await readiness.ensure(verify_every_s=EVERY_S)
    await readiness.ensure(verify_every_s=EVERY_S)
    assert index.verifies == 1
    index.now += EVERY_S + 0.1
    await readiness.ensure(verify_every_s=EVERY_S)
    assert index.verifies == 2 and readiness.state == Ready("v1")


async def test_an_index_that_moved_is_no_longer_ready_and_the_next_request_checks(index: FakeIndex) -> None:
    readiness = await ready(index)
    index.verify_failure = StoreMismatchError("the alias moved to v2's index")
    index.now += EVERY_S + 1
    with pytest.raises(StoreMismatchError):
        await readiness.ensure(verify_every_s=EVERY_S)
    assert readiness.state == Unchecked() and readiness.model_version is None
    index.failure = StoreMismatchError("the index was built by v2")
    with pytest.raises(StoreMismatchError, match="v2"):  # the check says why from now on (409)
        await readiness.ensure(verify_every_s=EVERY_S)
    assert index.checks == 2


async def test_a_verification_that_cannot_reach_the_store_keeps_it_ready(index: FakeIndex) -> None:
    readiness = await ready(index)
    index.verify_failure = StoreUnavailableError("the store timed out")
    index.now += EVERY_S + 1
    with pytest.raises(StoreUnavailableError):
        await readiness.ensure(verify_every_s=EVERY_S)
    assert readiness.state == Ready("v1")
    assert await readiness.ensure(verify_every_s=EVERY_S) == "v1"  # verified just now: not again yet


def test_a_mismatch_of_another_version_than_the_one_searched_changes_nothing(index: FakeIndex) -> None:
    readiness = index.readiness()
    readiness.swapped("v2")
    readiness.verified_mismatch("v1")  # a verification of the pair swapped out
    assert readiness.state == Ready("v2")
    readiness.verified_mismatch("v2")
    assert readiness.state == Unchecked()


# -- background runs -----------------------------------------------------------------------------


async def test_a_run_that_blocks_search_answers_indexing_with_its_progress(index: FakeIndex) -> None:
    readiness = await ready(index)
    progress = IndexProgress()
    readiness.start_indexing(progress, serving=False)
    assert readiness.state == Indexing(progress) and readiness.progress is progress
    assert readiness.model_version is None
    progress.total, progress.indexed = 40, 10
    refused = await refusal_of(readiness)
    assert refused.status == Status.indexing and refused.progress == {"indexed": 10, "total": 40}
    assert "10 of 40" in refused.message and index.checks == 1  # nothing asked of embedder or store


async def test_a_finished_run_leaves_search_unchecked_and_forgets_the_last_failure(index: FakeIndex) -> None:
    readiness = await ready(index)
    readiness.start_indexing(IndexProgress(), serving=True)
    readiness.indexing_failed("indexing failed: the disk is full")
    readiness.start_indexing(IndexProgress(), serving=False)
    assert readiness.last_failure == "indexing failed: the disk is full"  # until this run says otherwise
    readiness.indexing_finished()
    assert readiness.state == Unchecked() and readiness.progress is None and readiness.last_failure is None
    assert await readiness.ensure(verify_every_s=EVERY_S) == "v1" and index.checks == 2


async def test_a_failed_run_that_blocked_search_leaves_it_failed_until_another_run(index: FakeIndex) -> None:
    readiness = await ready(index)
    readiness.start_indexing(IndexProgress(), serving=False)
    readiness.indexing_failed("indexing failed: the collection is gone")
    assert readiness.state == Failed("indexing failed: the collection is gone") and readiness.progress is None
    assert readiness.last_failure == "indexing failed: the collection is gone"
    for _ in range(2):
        refused = await refusal_of(readiness)
        assert refused.status == Status.failed and refused.message == "indexing failed: the collection is gone"
    assert index.checks == 1
    readiness.start_indexing(IndexProgress(), serving=True)  # another run, search as it is meanwhile
    assert readiness.state == Unchecked()
    assert await readiness.ensure(verify_every_s=EVERY_S) == "v1"


async def test_a_failed_run_that_did_not_block_search_is_only_reported(index: FakeIndex) -> None:
    readiness = await ready(index)
    progress = IndexProgress()
    readiness.start_indexing(progress, serving=True)
    assert readiness.state == Ready("v1") and readiness.progress is progress
    assert await readiness.ensure(verify_every_s=EVERY_S) == "v1"
    readiness.indexing_failed("indexing failed: boom")
    assert readiness.state == Ready("v1") and readiness.progress is None
    assert readiness.last_failure == "indexing failed: boom"


def test_a_cancelled_run_is_as_if_it_had_finished_but_keeps_the_last_failure(index: FakeIndex) -> None:
    readiness = index.readiness()
    readiness.start_indexing(IndexProgress(), serving=True)
    readiness.indexing_failed("indexing failed: once")
    readiness.start_indexing(IndexProgress(), serving=False)
    readiness.indexing_cancelled()
    assert readiness.state == Unchecked() and readiness.progress is None
    assert readiness.last_failure == "indexing failed: once"


def test_a_run_that_blocks_search_forgets_a_failure_and_a_version(index: FakeIndex) -> None:
    readiness = index.readiness()
    readiness.start_indexing(IndexProgress(), serving=False)
    readiness.swapped("v2")
    readiness.indexing_failed("indexing failed: after the swap")
    progress = IndexProgress()
    readiness.start_indexing(progress, serving=False)
    assert readiness.state == Indexing(progress) and readiness.model_version is None


# -- swaps and deletions -------------------------------------------------------------------------


@pytest.mark.parametrize("before", ["unchecked", "ready", "checking"])
async def test_a_swap_makes_search_ready_with_the_new_version(index: FakeIndex, before: str) -> None:
    readiness = await ready(index) if before == "ready" else index.readiness()
    if before == "checking":
        index.gate.clear()
        asked = asyncio.ensure_future(readiness.ensure(verify_every_s=EVERY_S))
        await index.checking.wait()
    readiness.swapped("v2")
    assert readiness.state == Ready("v2") and readiness.model_version == "v2"
    if before == "checking":  # the check of the old pair ends after the swap: it changes nothing
        index.gate.set()
        assert await asked == "v1"
        assert readiness.state == Ready("v2")
    assert await readiness.ensure(verify_every_s=EVERY_S) == "v2"


async def test_a_swap_while_a_run_blocks_search_serves_its_version_when_the_run_ends(index: FakeIndex) -> None:
    readiness = index.readiness()
    progress = IndexProgress()
    readiness.start_indexing(progress, serving=False)
    readiness.swapped("v2")
    assert readiness.state == Indexing(progress, "v2") and readiness.model_version == "v2"
    assert (await refusal_of(readiness)).status == Status.indexing
    readiness.indexing_finished()
    assert readiness.state == Ready("v2") and index.checks == 0


async def test_a_swap_then_a_failure_keeps_the_version_for_the_next_serving_run(index: FakeIndex) -> None:
    readiness = index.readiness()
    readiness.start_indexing(IndexProgress(), serving=False)
    readiness.swapped("v2")
    readiness.indexing_failed("indexing failed: after the swap")
    assert readiness.state == Failed("indexing failed: after the swap", "v2") and readiness.model_version == "v2"
    readiness.swapped("v3")
    assert readiness.state == Failed("indexing failed: after the swap", "v3")
    assert (await refusal_of(readiness)).status == Status.failed
    readiness.start_indexing(IndexProgress(), serving=True)
    assert readiness.state == Ready("v3")


def test_deletions_are_remembered_while_a_run_goes_until_the_next_one_starts(index: FakeIndex) -> None:
    readiness = index.readiness()
    readiness.deleted("before")  # no run: nothing to replay
    assert readiness.deleted_meanwhile == frozenset()
    readiness.start_indexing(IndexProgress(), serving=True)
    readiness.deleted("a")
    readiness.deleted("b")
    assert readiness.deleted_meanwhile == {"a", "b"}
    readiness.indexing_finished()
    readiness.deleted("after")  # the run is over: a swap of its index still replays a and b
    assert readiness.deleted_meanwhile == {"a", "b"}
    readiness.start_indexing(IndexProgress(), serving=False)
    assert readiness.deleted_meanwhile == frozenset()
    readiness.deleted("c")
    assert readiness.deleted_meanwhile == {"c"}
