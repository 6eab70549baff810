"""The micro-batcher: concurrent requests share forward passes, and a full queue answers 503 at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest

from services.common.embedding import Embedding
from services.common.errors import EmbedderUnavailableError
from services.embedder.runtime import MicroBatcher

pytestmark = pytest.mark.anyio


class GatedEmbedder:
    """Stands in for `Embedder`: records the size of every forward pass; the first one waits for `gate`."""

    compile_sizes: tuple[int, ...] = ()
    warming_up = False

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.purposes: list[str] = []
        self.gate = threading.Event()
        self.first_started = threading.Event()

    def warm_up(self) -> None:
        self.warmed_in = threading.current_thread().name

    def embed_batch(self, images: np.ndarray, *, purpose: str = "query") -> list[Embedding]:
        if not self.batches:
            self.first_started.set()
            self.gate.wait(timeout=30)
        self.batches.append(len(images))
        self.purposes.append(purpose)
        return [Embedding(vector=np.full(4, float(image[0, 0, 0]), dtype=np.float32), label="cat", confidence=1.0)
                for image in images]


def images(value: int, count: int = 1) -> np.ndarray:
    return np.full((count, 32, 32, 3), value, dtype=np.uint8)


@asynccontextmanager
async def busy_batcher(**options: int) -> AsyncIterator[tuple[GatedEmbedder, MicroBatcher, asyncio.Future]]:
    """A started `MicroBatcher` whose worker is busy with a first request until `model.gate` is set;
    stopped on the way out."""
    model = GatedEmbedder()
    batcher = MicroBatcher(model, **options)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.embed(images(1)))
        await asyncio.to_thread(model.first_started.wait, 10)
        yield model, batcher, first
    finally:
        batcher.stop()


def test_the_model_is_warmed_up_in_the_worker_thread_before_start_returns() -> None:
    """The first forward passes of a thread set up its OpenMP team and kernels: done where requests will run."""
    model = GatedEmbedder()
    batcher = MicroBatcher(model)
    batcher.start()
    try:
        assert model.warmed_in == "embedder-batcher"
    finally:
        batcher.stop()


async def until_queued(batcher: MicroBatcher, count: int) -> None:
    """Returns once `count` requests wait in the batcher's queue behind its busy worker (10 s at most)."""
    async with asyncio.timeout(10):
        while batcher._queue.qsize() < count:
            await asyncio.sleep(0.001)


async def test_concurrent_requests_share_one_forward_pass() -> None:
    async with busy_batcher(max_batch=64, max_wait_ms=20, max_queue=64) as (model, batcher, first):
        waiting = [asyncio.ensure_future(batcher.embed(images(10 + i, count=2))) for i in range(8)]
        await until_queued(batcher, 8)  # all eight behind the first
        model.gate.set()
        results = await asyncio.gather(first, *waiting)
    assert model.batches == [1, 16]  # two forward passes for nine requests
    # Each caller gets its own images' embeddings back, in order.
    assert [r[0].vector[0] for r in results] == [1.0, *[10.0 + i for i in range(8)]]
    assert all(len(r) == 2 for r in results[1:])


async def test_queries_and_indexing_share_a_batch_but_not_a_forward_pass() -> None:
    # Their views differ (flip TTA for queries only, say): one pass per purpose, each caller its own answer.
    async with busy_batcher(max_batch=64, max_wait_ms=20, max_queue=64) as (model, batcher, first):
        mixed = [asyncio.ensure_future(batcher.embed(images(20 + i), purpose="index" if i % 2 else "query"))
                 for i in range(6)]
        await until_queued(batcher, 6)
        model.gate.set()
        results = await asyncio.gather(first, *mixed)
    assert list(zip(model.batches, model.purposes, strict=True)) == [(1, "query"), (3, "query"), (3, "index")]
    assert [r[0].vector[0] for r in results[1:]] == [20.0 + i for i in range(6)]


async def test_a_full_queue_is_refused_at_once_with_503() -> None:
    async with busy_batcher(max_batch=1, max_wait_ms=0, max_queue=2) as (model, batcher, busy):
        queued = [asyncio.ensure_future(batcher.embed(images(2))) for _ in range(2)]
        await until_queued(batcher, 2)  # the queue is full
        with pytest.raises(EmbedderUnavailableError, match="overloaded") as refused:
            await batcher.embed(images(3))
        assert refused.value.status_code == 503 and refused.value.retry_after == 1
        model.gate.set()
        await asyncio.gather(busy, *queued)
    assert model.batches == [1, 1, 1]  # the refused request never reached the model


# --- compiled ahead of time (services/embedder/aot.py) ---------------------------------------------


@pytest.mark.slow
def test_the_compiled_model_answers_as_the_eager_one_for_padded_batches(tiny_bundle, mini_collection,
                                                                        tmp_path) -> None:
    from services.common.images import decode_image
    from services.embedder.runtime import Embedder

    files = sorted((mini_collection / "test").glob("*/*.jpg"))[:7]
    batch = np.stack([decode_image(path.read_bytes()) for path in files])
    eager = Embedder(tiny_bundle, max_batch=4).embed_batch(batch)
    compiled = Embedder(tiny_bundle, max_batch=4, compile=True, compile_cache=tmp_path)
    assert compiled.compile_sizes == (1, 4) and compiled.warming_up
    before = compiled.embed_batch(batch)  # nothing compiled yet: the eager path
    compiled.compile_model()
    assert not compiled.warming_up and sorted(compiled._compiled) == [1, 4] and compiled.warm_up_progress == (2, 2)
    seen: list[int] = []

    class Recording:  # a compiled network, counting the batch sizes it is called with
        def __init__(self, module) -> None:
            self.module = module

        def eval(self) -> Recording:
            return self

        def __call__(self, inputs):
            seen.append(len(inputs))
            return self.module(inputs)

    compiled._compiled = {size: Recording(network) for size, network in compiled._compiled.items()}
    after = compiled.embed_batch(batch)  # chunks of 4 and 3, the second padded to 4
    views = 2 if tiny_bundle.preprocessing.flip_tta else 1  # the mirror is a second pass
    assert seen == [4] * 2 * views
    assert [e.label for e in after] == [e.label for e in eager] == [e.label for e in before]
    for ours, reference in zip(after, eager, strict=True):
        # bf16 kernels fused differently: close, not bit-identical
        assert np.abs(ours.vector - reference.vector).max() < 2e-2
        assert ours.confidence == pytest.approx(reference.confidence, abs=2e-2)


@pytest.mark.slow
def test_a_restart_loads_the_compiled_packages_without_compiling(tiny_bundle, tmp_path, monkeypatch) -> None:
    from services.embedder import runtime
    from services.embedder.runtime import Embedder

    first = Embedder(tiny_bundle, max_batch=2, compile=True, compile_cache=tmp_path)
    first.compile_model()
    assert sorted(path.name for path in first.compile_cache.glob("*.pt2")) == ["network-b1-s32.pt2",
                                                                               "network-b2-s32.pt2"]

    def no_compiler(*args, **kwargs) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(runtime, "ChildBuilds", no_compiler)
    restarted = Embedder(tiny_bundle, max_batch=2, compile=True, compile_cache=tmp_path)
    restarted.compile_model()
    assert sorted(restarted._compiled) == [1, 2] and not restarted.warming_up
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    for count in (1, 2):
        for purpose in ("query", "index"):
            assert len(restarted.embed_batch(images[:count], purpose=purpose)) == count
    # told to build none (`CBIR_COMPILE=cached`), it takes only the sizes whose package is there
    (first.compile_cache / "network-b1-s32.pt2").unlink()
    cached_only = Embedder(tiny_bundle, max_batch=2, compile=True, compile_cache=tmp_path, build=False)
    assert cached_only.compile_sizes == (2,)
    cached_only.compile_model()
    assert sorted(cached_only._compiled) == [2] and cached_only.warm_up_progress == (1, 1)
    assert not (first.compile_cache / "network-b1-s32.pt2").exists()


def test_told_to_build_none_with_an_empty_cache_it_runs_eagerly(tiny_bundle, tmp_path, monkeypatch) -> None:
    from services.embedder import runtime
    from services.embedder.runtime import Embedder

    def no_compiler(*args, **kwargs) -> None:
        raise AssertionError("built a package")

    monkeypatch.setattr(runtime, "ChildBuilds", no_compiler)
    embedder = Embedder(tiny_bundle, max_batch=2, compile=True, compile_cache=tmp_path, build=False)
    assert embedder.compile_sizes == () and embedder.compile_next() is False
    assert embedder.warm_up_progress is None and not embedder.warming_up
    assert len(embedder.embed_batch(np.zeros((3, 32, 32, 3), dtype=np.uint8))) == 3


def test_a_failed_compilation_leaves_the_model_serving_eagerly(tiny_bundle, tmp_path, monkeypatch) -> None:
    from services.embedder import runtime
    from services.embedder.runtime import Embedder

    def failing(*args, **kwargs) -> None:
        raise RuntimeError("compiling for batches of 1 failed (1): no compiler")

    monkeypatch.setattr(runtime, "ChildBuilds", failing)
    embedder = Embedder(tiny_bundle, max_batch=2, compile=True, compile_cache=tmp_path)
    assert embedder.compile_next() is False
    assert embedder.warm_up_progress is None and not embedder.warming_up  # nothing left to wait for
    assert len(embedder.embed_batch(np.zeros((3, 32, 32, 3), dtype=np.uint8))) == 3


def test_no_parameter_requires_grad_so_autocast_caches_no_weight_casts(tiny_bundle) -> None:
    """autocast caches the bf16 casts of weights that require grad, behind one process-wide mutex; a forward
    pass freeing its casts held that mutex while waiting for the GIL, which an in-process compilation held while
    it waited for the mutex (py-spy of a `cbir serve` stalled in its warm-up, 2026-12-04)."""
    from services.embedder.runtime import Embedder

    embedder = Embedder(tiny_bundle, max_batch=2, compile=True)
    assert not any(parameter.requires_grad for parameter in embedder.model.parameters())


@pytest.mark.slow
async def test_the_service_compiles_in_the_background_while_it_answers(tiny_bundle, mini_collection,
                                                                       tmp_path) -> None:
    """A steady stream of requests is answered throughout (none waits for a compilation: they run eagerly
    meanwhile), every size gets compiled smallest first, and the progress says how far it is."""
    from services.common.images import decode_image
    from services.embedder.runtime import Embedder, LocalEmbeddingService

    files = sorted((mini_collection / "test").glob("*/*.jpg"))[:3]
    batch = np.stack([decode_image(path.read_bytes()) for path in files])
    expected = [e.label for e in Embedder(tiny_bundle, max_batch=2).embed_batch(batch)]
    service = LocalEmbeddingService(Embedder(tiny_bundle, max_batch=2, compile=True, compile_cache=tmp_path))
    assert service.warm_up_progress == (0, 2) and service.warming_up
    service.start()
    seen, answered = {service.warm_up_progress}, 0
    try:
        async with asyncio.timeout(300):
            while service.warming_up or answered < 3:  # back to back: the queue is never idle for long
                embeddings = await service.embed(batch[answered % 3:][:2])
                assert [e.label for e in embeddings] == expected[answered % 3:][:2]
                answered += 1
                seen.add(service.warm_up_progress)
        for count in (1, 2):
            assert len(await service.embed(batch[:count])) == count
    finally:
        await service.close()
    assert sorted(service.embedder._compiled) == [1, 2] and service.warm_up_progress == (2, 2)
    assert seen >= {(0, 2), (2, 2)} and answered >= 3
    assert len(list(service.embedder.compile_cache.glob("*.pt2"))) == 2  # kept for the next start


def test_a_model_that_is_not_compiled_reports_no_warm_up(tiny_bundle) -> None:
    from services.embedder.runtime import Embedder

    embedder = Embedder(tiny_bundle, max_batch=4)
    assert embedder.warm_up_progress is None and not embedder.warming_up


@pytest.mark.slow
def test_searches_beside_the_warm_up_never_stall(tiny_bundle, tmp_path) -> None:
    """Eager forward passes in one thread while every size compiles in another: both finish. (With the compiler
    in this process and the weights requiring grad, this stalled here within seconds, 2026-12-04; a stall holds the
    GIL, so the suite's per-test timeout, pyproject's `timeout`, is what ends it.)"""
    from services.embedder.runtime import Embedder

    embedder = Embedder(tiny_bundle, max_batch=8, compile=True, compile_cache=tmp_path)
    images = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    compiled, stop, searches = threading.Event(), threading.Event(), [0]

    def search() -> None:
        while not stop.is_set():
            embedder.embed_batch(images)
            searches[0] += 1

    def compile_all() -> None:
        embedder.compile_model()
        compiled.set()

    threads = [threading.Thread(target=search, daemon=True), threading.Thread(target=compile_all, daemon=True)]
    for thread in threads:
        thread.start()
    assert compiled.wait(timeout=300), "the warm-up stalled beside the searches"
    stop.set()
    threads[0].join(timeout=30)
    assert not threads[0].is_alive(), "a search stalled"
    assert searches[0] > 0 and not embedder.warming_up


def test_a_forward_pass_of_one_image_runs_on_one_thread_and_puts_the_count_back(tiny_bundle) -> None:
    import torch

    from services.embedder.runtime import Embedder

    embedder, seen = Embedder(tiny_bundle, max_batch=4), []
    model = embedder.model

    class Counting(torch.nn.Module):  # the network, noting the intra-op threads of each call
        def forward(self, inputs):
            seen.append((len(inputs), torch.get_num_threads()))
            return model(inputs)

    embedder.model = Counting()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        embedder.embed_batch(np.zeros((1, 32, 32, 3), dtype=np.uint8))
        embedder.embed_batch(np.zeros((3, 32, 32, 3), dtype=np.uint8))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert sorted(set(seen)) == [(1, 1), (3, 2)]  # each view of each chunk (the mirror is a second call)


async def test_closing_the_service_abandons_a_compilation_under_way(tiny_bundle, tmp_path) -> None:
    from services.embedder.runtime import Embedder, LocalEmbeddingService

    service = LocalEmbeddingService(Embedder(tiny_bundle, max_batch=2, compile=True, compile_cache=tmp_path))
    service.start()  # the warm-up thread starts the child that builds both sizes
    deadline = time.monotonic() + 30
    while (builds := service.embedder._builds) is None or builds._child is None:
        assert time.monotonic() < deadline, "no child started"
        await asyncio.sleep(0.01)
    await service.close()
    assert service.embedder.stop_compiling.is_set() and builds._child.poll() is not None  # killed, not left running
    assert not list(service.embedder.compile_cache.glob("*.pt2"))
