"""The embedder at run time: pre (uint8 → tensor), core (batched forward pass), post (vectors).

`Embedder` is synchronous and thread-confined; `MicroBatcher` runs it on one worker thread fed
by a bounded queue, so the event loop never waits on the model and concurrent requests share
forward passes; `LocalEmbeddingService` is the in-process `EmbeddingService`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prometheus_client import Histogram

from services.common.embedding import EmbedderInfo, Embedding, Purpose
from services.common.errors import EmbedderUnavailableError, ModelNotLoadedError
from services.common.settings import ModelSettings, default
from services.embedder.aot import BuildCancelled, ChildBuilds, CompiledNetwork, import_loader, package_path
from services.embedder.bundle import Bundle
from services.embedder.compilation import (
    DEFAULT_COMPILE_CACHE,
    WarmUp,
    batch_buckets,
    compile_cache_dir,
    compiled_pieces,
)
from services.embedder.inference import pick_device, predict
from services.embedder.vectors import build_vectors, check_vector_config

logger = logging.getLogger(__name__)

BATCH_IMAGES = Histogram("cbir_embedder_batch_images", "images per forward pass of the micro-batcher",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
FORWARD_SECONDS = Histogram("cbir_embedder_forward_seconds", "time of one micro-batch forward pass")
COMPILE_TIMEOUT_S = 1800.0  # one size's package, from an empty cache: minutes on a small machine


class Embedder:
    """A loaded bundle that turns uint8 images into search vectors.

    >>> embedder = Embedder(load_bundle(path))
    >>> embedder.embed_batch(images)[0].label
    'cat'
    """

    def __init__(self, bundle: Bundle, *, device: str = default(ModelSettings, "device"), pca_dims: int | None = None,
                 onehot_weight: float | None = None, max_batch: int = default(ModelSettings, "max_batch"),
                 compile: bool = False, compile_cache: Path | None = None, build: bool = True) -> None:
        self.bundle = bundle
        self.device = pick_device(device)
        self.pca_dims = int(pca_dims or bundle.vector_defaults["pca_dims"])
        self.onehot_weight = float(
            bundle.vector_defaults["onehot_weight"] if onehot_weight is None else onehot_weight)
        check_vector_config(pca_dims=self.pca_dims, num_classes=len(bundle.classes),
                            max_pca_dims=bundle.projection.max_dims)
        self.max_batch = max_batch
        self.preprocessing = bundle.preprocessing
        # bf16 pays off on CUDA and on CPUs with bf16 units; float32 elsewhere would be the safe
        # choice, but every bundle is measured with bf16 inference, so keep the numbers identical.
        self.use_bf16 = True
        # A BOVW bundle's model is a `BovwModel` (descriptors and a scikit-learn classifier on the CPU):
        # nothing of it moves to a device or compiles.
        self.deep = bundle.family == "deep"
        # No parameter requires grad (inference only): autocast would cache the bf16 casts of weights that do, in one
        # process-wide cache behind one mutex (a served search and an in-process compilation once deadlocked on it).
        self.model = bundle.model.to(self.device, memory_format=torch.channels_last).eval().requires_grad_(False) \
            if self.deep else bundle.model
        # Compiled ahead of time, one package per batch size (`aot`): a chunk goes through the compiled sizes that
        # fit it (`compiled_pieces`), eagerly where none does yet. `compile_next` builds (unless `build` is False: then
        # only the packages already in the cache count) and loads the next size.
        self.compile_cache = compile_cache_dir(compile_cache or DEFAULT_COMPILE_CACHE, bundle_version=bundle.version,
                                               device=self.device)
        self.compile_sizes = batch_buckets(max_batch) if compile and self.deep else ()
        self.build = build
        if not build:  # only the sizes whose package is in the cache already (`CBIR_COMPILE=cached`)
            self.compile_sizes = tuple(size for size in self.compile_sizes if self._package(size).exists())
        self._compiled: dict[int, torch.nn.Module] = {}  # replaced whole, never changed in place: read without a lock
        self.compile_timeout_s = COMPILE_TIMEOUT_S
        self.stop_compiling = threading.Event()  # set: a compilation under way is abandoned (its child killed)
        self._builds: ChildBuilds | None = None  # the child building the sizes not in the cache, once one is needed
        if self.compile_sizes and self.device.type != "cpu":  # torch's package loader: CUDA's (`aot`)
            import_loader(self.device)

    @property
    def dims(self) -> int:
        return self.pca_dims + len(self.bundle.classes)

    @property
    def model_version(self) -> str:
        """Identifies the vector space: the bundle, its PCA dims and one-hot weight. Not the test-time views:
        an image and its mirror average to a vector of the same space, so a query with flip TTA may search
        an index built without it (`Preprocessing.index_flip_tta`)."""
        return f"{self.bundle.version}-d{self.pca_dims}-w{self.onehot_weight:g}"

    def info(self) -> EmbedderInfo:
        return EmbedderInfo(model_version=self.model_version, dims=self.dims, classes=self.bundle.classes,
                            metadata=self.bundle.metadata, bundle_version=self.bundle.version,
                            pca_dims=self.pca_dims, onehot_weight=self.onehot_weight, device=self.device.type,
                            image_size=self.preprocessing.image_size, resize=self.preprocessing.resize)

    def embed_batch(self, images: np.ndarray, *, purpose: Purpose = "query") -> list[Embedding]:
        """Vectors for `(N, S, S, 3)` uint8 images decoded as the bundle says (`info().image_size`,
        `.resize`), with the bundle's views for `purpose`, in chunks of at most `max_batch`."""
        results: list[Embedding] = []
        classes = self.bundle.classes
        flip = self.preprocessing.flip_for(purpose)
        for start in range(0, len(images), self.max_batch):
            embeddings, probabilities = self._forward(images[start:start + self.max_batch], flip=flip)
            predicted = probabilities.argmax(axis=1)
            vectors = build_vectors(embeddings, predicted, projection=self.bundle.projection,
                                    pca_dims=self.pca_dims, onehot_weight=self.onehot_weight,
                                    num_classes=len(classes))
            results += [
                Embedding(vector=vector, label=classes[label], confidence=float(probs[label]))
                for vector, label, probs in zip(vectors, predicted, probabilities, strict=True)
            ]
        return results

    def _forward(self, chunk: np.ndarray, *, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and probabilities of at most `max_batch` images: in compiled pieces where a compiled size
        fits (`compiled_pieces`), else eagerly. A BOVW model has no mirror views."""
        if not self.deep:
            return self.model.predict(chunk)
        compiled = self._compiled
        if not compiled:
            return self._predict(self.model, chunk, flip=flip)
        parts, start = [], 0
        for size, take in compiled_pieces(len(chunk), tuple(sorted(compiled))):
            piece, start = chunk[start:start + take], start + take
            if size is not None:
                piece = np.concatenate([piece, np.zeros((size - take, *piece.shape[1:]), dtype=piece.dtype)])
            embeddings, probabilities = self._predict(self.model if size is None else compiled[size], piece, flip=flip)
            parts.append((embeddings[:take], probabilities[:take]))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([e for e, _ in parts]), np.concatenate([p for _, p in parts])

    def _predict(self, model: torch.nn.Module, images: np.ndarray, *, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        with one_thread_for(len(images), device=self.device):
            return predict(model, images, flip_tta=flip, preprocessing=self.preprocessing, device=self.device,
                           bf16=self.use_bf16, batch_size=len(images))

    @property
    def warming_up(self) -> bool:
        """True while `compile_sizes` are not all compiled yet (searches run eagerly meanwhile)."""
        return len(self._compiled) < len(self.compile_sizes)

    @property
    def warm_up_progress(self) -> tuple[int, int] | None:
        """(sizes compiled, sizes to compile), or None when nothing is compiled (`CBIR_COMPILE=off`, no
        compiler, a BOVW bundle, or compilation failed)."""
        return (len(self._compiled), len(self.compile_sizes)) if self.compile_sizes else None

    def compile_next(self) -> bool:
        """Compile the network for the smallest size of `compile_sizes` not done yet (searches' sizes before the
        indexer's) and use it from now on; False when there is none left. The package is loaded from
        `compile_cache` when it is there (milliseconds), else waited for from the child process that builds every
        size missing from the cache, smallest first, at the lowest priority (`aot.ChildBuilds`: about 20 s for the
        first size on two cores, about 10 s for each of the others), then run once before any request uses it. Blocking;
        `WarmUp` calls it in its own thread, which mostly waits meanwhile.
        """
        pending = [s for s in self.compile_sizes if s not in self._compiled]
        if not pending:
            self.stop_building()
            return False
        size, started = min(pending), time.perf_counter()
        package = self._package(size)
        try:
            if not package.exists():
                if self._builds is None:
                    missing = [(s, self._package(s)) for s in sorted(pending) if not self._package(s).exists()]
                    self._builds = ChildBuilds(self.bundle.path, missing, device=self.device, stop=self.stop_compiling)
                self._builds.wait(size, timeout_s=self.compile_timeout_s)
            network = CompiledNetwork(package, device=self.device)
            # Its first forward pass sets up its kernels (oneDNN's, for each layer): 150 ms at batch 1 on two cores,
            # which the first search to use it paid for (2026-12-05). Paid here instead, in this thread.
            blank = np.zeros((size, self.preprocessing.image_size, self.preprocessing.image_size, 3), dtype=np.uint8)
            self._predict(network, blank, flip=self.preprocessing.flip_for("query"))
        except BuildCancelled:
            self.stop_building()
            return False
        except Exception:  # noqa: BLE001 - serving goes on eagerly; the log says why
            logger.exception("compiling the model for batches of %d failed; the model runs uncompiled", size)
            self._compiled, self.compile_sizes = {}, ()
            self.stop_building()
            return False
        self._compiled = {**self._compiled, size: network}
        logger.info("compiled the model for batches of %d in %.1f s (%d of %d sizes)", size,
                    time.perf_counter() - started, len(self._compiled), len(self.compile_sizes))
        return True

    def _package(self, size: int) -> Path:
        return package_path(self.compile_cache, size=size, image_size=self.preprocessing.image_size)

    def stop_building(self) -> None:
        """Kill the child that builds packages, if one runs (the service closes; nothing is left to wait for)."""
        if self._builds is not None:
            self._builds.close()
            self._builds = None

    def compile_model(self) -> None:
        """Every size of `compile_sizes`, one after another (tests, benches)."""
        while self.compile_next():
            pass

    def warm_up(self) -> None:
        """One query of one image and one of two, both views: the first forward pass of each batch size sets up
        its kernels (tens of ms), which the first search would otherwise pay for."""
        size = self.preprocessing.image_size
        for count in (1, 2):
            self.embed_batch(np.zeros((count, size, size, 3), dtype=np.uint8))


@contextlib.contextmanager
def one_thread_for(images: int, *, device: torch.device) -> Iterator[None]:
    """A CPU forward pass of one image on one intra-op thread: its operators are too small to share, and
    each parallel region of an OpenMP team woken from sleep (`OMP_WAIT_POLICY=PASSIVE` in a server, or a
    team outside the main thread) costs more than it saves. The compiled network at batch 1, both views,
    in the micro-batcher's thread: 4.7 ms on one thread against 6.9 ms on two (two cores, 2026-12-05); at
    batch 4 two threads win (14.7 against 18.4 ms). Sets the calling thread's count and puts it back."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or images > 1 or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Request:
    images: np.ndarray
    purpose: Purpose
    future: asyncio.Future[list[Embedding]]
    loop: asyncio.AbstractEventLoop


class MicroBatcher:
    """Batches concurrent `embed` calls into shared forward passes on one worker thread.

    The queue is bounded: when `max_queue` requests are already waiting, `embed` fails fast with
    `EmbedderUnavailableError` (503 + Retry-After) instead of letting latency grow without bound.
    """

    def __init__(self, embedder: Embedder, *, max_batch: int = default(ModelSettings, "max_batch"),
                 max_wait_ms: float = default(ModelSettings, "max_wait_ms"),
                 max_queue: int = default(ModelSettings, "max_queue")) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="embedder-batcher", daemon=True)
        self._warm = threading.Event()
        self._started = False

    def start(self) -> None:
        """Start the worker thread; returns once it has warmed the model up (`Embedder.warm_up`): the first
        forward passes of a thread set up its OpenMP team and kernels, which the first request paid for (the
        first search after a start took 91 ms, 5.8 × the others, 2026-12-05)."""
        if not self._started:
            self._thread.start()
            self._warm.wait()
            self._started = True

    async def embed(self, images: np.ndarray, *, purpose: Purpose = "query") -> list[Embedding]:
        if not self._started:
            raise ModelNotLoadedError("the model is not loaded yet")
        loop = asyncio.get_running_loop()
        request = _Request(images=images, purpose=purpose, future=loop.create_future(), loop=loop)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise EmbedderUnavailableError("the embedder is overloaded; retry shortly", retry_after=1) from None
        return await request.future

    def stop(self) -> None:
        if self._started:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._started = False

    def _run(self) -> None:
        # Compilation never runs here (it is `WarmUp`'s): a request waits only for the batch before it.
        try:
            self.embedder.warm_up()
        except Exception:  # noqa: BLE001 - the first request meets the error instead
            logger.exception("warming the model up failed")
        finally:
            self._warm.set()
        while (first := self._queue.get()) is not None:
            pending, size = [first], len(first.images)
            deadline = time.perf_counter() + self.max_wait
            while size < self.max_batch:
                try:
                    extra = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if extra is None:
                    self._queue.put(None)  # stop once this batch is done
                    break
                pending.append(extra)
                size += len(extra.images)
            self._process(pending)

    def _process(self, requests: list[_Request]) -> None:
        for purpose in ("query", "index"):  # their views differ: one forward pass each
            batch = [r for r in requests if r.purpose == purpose]
            if batch:
                self._embed(batch, purpose)

    def _embed(self, batch: list[_Request], purpose: Purpose) -> None:
        images = np.concatenate([r.images for r in batch])
        BATCH_IMAGES.observe(len(images))
        try:
            with FORWARD_SECONDS.time():
                embeddings = self.embedder.embed_batch(images, purpose=purpose)
        except Exception as exc:  # noqa: BLE001 - delivered to every waiting caller
            logger.exception("forward pass failed")
            for request in batch:
                request.loop.call_soon_threadsafe(_set_exception, request.future, exc)
            return
        offset = 0
        for request in batch:
            part = embeddings[offset:offset + len(request.images)]
            offset += len(request.images)
            request.loop.call_soon_threadsafe(_set_result, request.future, part)


def _set_result(future: asyncio.Future, value: list[Embedding]) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class LocalEmbeddingService:
    """The model in this process, behind the same interface as the HTTP embedder client."""

    def __init__(self, embedder: Embedder, *, max_wait_ms: float = default(ModelSettings, "max_wait_ms"),
                 max_queue: int = default(ModelSettings, "max_queue")) -> None:
        self.embedder = embedder
        self.batcher = MicroBatcher(embedder, max_batch=embedder.max_batch, max_wait_ms=max_wait_ms,
                                    max_queue=max_queue)
        self.warm_up = WarmUp(embedder.compile_next)

    def start(self) -> None:
        """Start serving once the micro-batcher's thread has warmed the model up; compilation, if asked for, goes on
        in `WarmUp`'s thread, the smallest size first, while the eager model answers. Packages that are only loaded,
        never built (`build` False), are loaded first, here: milliseconds each."""
        if self.embedder.compile_sizes and not self.embedder.build:
            self.embedder.compile_model()
        self.batcher.start()
        if self.embedder.warming_up:
            self.warm_up.start()

    @property
    def warming_up(self) -> bool:
        return self.embedder.warming_up

    @property
    def warm_up_progress(self) -> tuple[int, int] | None:
        """(batch sizes compiled, sizes to compile); None when the model is not compiled."""
        return self.embedder.warm_up_progress

    @property
    def model_info(self) -> EmbedderInfo:
        """`info()` without a loop to await it on: for the composition root, which builds services in a thread."""
        return self.embedder.info()

    async def info(self) -> EmbedderInfo:
        return self.embedder.info()

    async def embed(self, images: np.ndarray, *, purpose: Purpose = "query") -> list[Embedding]:
        return await self.batcher.embed(images, purpose=purpose)

    async def close(self) -> None:
        self.embedder.stop_compiling.set()  # no compiler outlives the service
        await asyncio.to_thread(self.warm_up.stop)
        await asyncio.to_thread(self.embedder.stop_building)  # had it stopped between two sizes
        await asyncio.to_thread(self.batcher.stop)
