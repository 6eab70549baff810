"""Admission control: searches within capacity run, the next ones wait their turn in order, and one that cannot
start within the wait gets 503 + Retry-After at once; no slot is ever lost. Held requests wait on events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from factories import make_document
from fakes import ControlledEmbedder, MemoryStore, settle
from sample_images import encode, sample_image
from servers import asgi_client

from services.common.errors import OverloadedError
from services.search.admission import AdmissionLimiter
from services.search.app import create_app
from services.search.settings import SearchSettings

pytestmark = pytest.mark.anyio


class Holders:
    """Requests that enter the limiter and stay inside until `release` is set; `entered` in order of entry."""

    def __init__(self, limiter: AdmissionLimiter) -> None:
        self.limiter = limiter
        self.release = asyncio.Event()
        self.entered: list[str] = []

    async def hold(self, name: str) -> str:
        async with self.limiter.admit():
            self.entered.append(name)
            await self.release.wait()
        return name

    async def start(self, *names: str) -> list[asyncio.Task[str]]:
        tasks = [asyncio.create_task(self.hold(name)) for name in names]
        await settle()
        return tasks


async def test_requests_within_capacity_start_at_once_and_free_their_slots() -> None:
    holders = Holders(AdmissionLimiter(3, max_wait_s=0))
    tasks = await holders.start("a", "b", "c")
    assert holders.entered == ["a", "b", "c"] and holders.limiter.in_flight == 3
    holders.release.set()
    assert await asyncio.gather(*tasks) == ["a", "b", "c"]
    assert holders.limiter.in_flight == 0 and holders.limiter.waiting == 0


async def test_beyond_capacity_without_a_wait_is_refused_at_once_with_retry_after() -> None:
    holders = Holders(AdmissionLimiter(1, max_wait_s=0, retry_after_s=2))
    await holders.start("a")
    with pytest.raises(OverloadedError) as refused:
        await holders.hold("b")
    assert refused.value.status_code == 503 and refused.value.retry_after == 2
    assert holders.entered == ["a"] and holders.limiter.in_flight == 1


async def test_waiting_requests_start_in_arrival_order_as_slots_free() -> None:
    holders = Holders(AdmissionLimiter(1, max_wait_s=60))
    tasks = await holders.start("a", "b", "c")
    assert holders.entered == ["a"] and holders.limiter.waiting == 2
    holders.release.set()  # each, once in, leaves at once: the slot passes down the line
    assert await asyncio.gather(*tasks) == ["a", "b", "c"]
    assert holders.entered == ["a", "b", "c"] and holders.limiter.in_flight == 0


async def test_a_request_that_cannot_start_within_the_wait_is_refused_after_it() -> None:
    holders = Holders(AdmissionLimiter(1, max_wait_s=0.05))
    [first] = await holders.start("a")
    started = time.perf_counter()
    with pytest.raises(OverloadedError):
        await holders.hold("b")
    assert time.perf_counter() - started < 2  # the wait (50 ms), not the held request's time
    assert holders.limiter.waiting == 0 and holders.limiter.in_flight == 1
    holders.release.set()
    assert await first == "a" and holders.limiter.in_flight == 0


async def test_a_full_line_refuses_without_waiting() -> None:
    holders = Holders(AdmissionLimiter(1, max_wait_s=60, max_waiting=1))
    tasks = await holders.start("a", "b")
    with pytest.raises(OverloadedError):
        await holders.hold("c")  # would wait a minute if it were let into the line
    holders.release.set()
    assert await asyncio.gather(*tasks) == ["a", "b"]


async def test_a_waiting_request_whose_client_left_frees_its_place_and_loses_no_slot() -> None:
    holders = Holders(AdmissionLimiter(1, max_wait_s=60))
    first, gone, last = await holders.start("a", "b", "c")
    gone.cancel()
    await settle()
    assert holders.limiter.waiting == 1
    holders.release.set()
    assert await first == "a" and await last == "c" and gone.cancelled()
    assert holders.entered == ["a", "c"] and holders.limiter.in_flight == 0


# -- the gateway ------------------------------------------------------------------------------------


@pytest.fixture
async def gated_gateway(tmp_path) -> AsyncIterator[tuple[httpx.AsyncClient, MemoryStore]]:
    """The gateway admitting one search at a time and refusing the next at once; its store holds searches at
    `search_gate`."""
    embedder = ControlledEmbedder(dims=4, model_version="v1")
    store = MemoryStore([make_document("only", np.eye(4, dtype=np.float32)[0], model_version="v1")])
    settings = SearchSettings(_env_file=None, state_dir=tmp_path / "state", max_concurrent_searches=1,
                              max_search_wait_ms=0)  # type: ignore[call-arg]
    app = create_app(settings, embedder_factory=lambda: embedder, store_factory=lambda: store)
    async with asgi_client(app, base_url="http://search") as client:
        yield client, store


async def test_the_gateway_answers_503_with_retry_after_beyond_capacity_and_serves_the_admitted(
        gated_gateway: tuple[httpx.AsyncClient, MemoryStore]) -> None:
    client, store = gated_gateway
    image = encode(sample_image(), "PNG")

    async def search() -> httpx.Response:
        return await client.post("/search", files={"file": ("q.png", image, "image/png")})

    store.searching.clear()  # set by the gateway's readiness check, which searched once as it started
    store.search_gate.clear()
    admitted = asyncio.create_task(search())
    await store.searching.wait()  # the first search holds the only slot, at the store
    refused = await asyncio.wait_for(search(), 10)  # without admission control it would wait at the gate
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "capacity" in refused.json()["detail"]
    store.search_gate.set()
    answered = await admitted
    assert answered.status_code == 200 and [hit["id"] for hit in answered.json()["hits"]] == ["only"]
    again = await search()  # the slot came back
    assert again.status_code == 200
