"""Indexing a collection as four stages, after clip-retrieval's reader → mapper → writer: plan (scan the
collection, compare it with the store) → read (load and decode a batch) → embed → write (`stages` has each).

Document ids are derived from the collection root and the image's path, so a re-run overwrites rather
than duplicates. A re-run embeds only what changed: files the store does not hold yet (added), files
whose size or mtime differ from the stored ones (updated); the rest is unchanged and skipped, so an
interrupted run resumes where it stopped. With `sync`, documents of the same root whose file is gone
are removed (never uploads, never other roots). The store is flushed every few batches, so a crash
loses at most those. How many batches are in flight, and why one beside the model here: `index_batches`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from services.common.collection import CollectionImage, Layout
from services.common.documents import ImageDocument
from services.common.embedding import EmbedderInfo, EmbeddingService
from services.common.errors import StoreMismatchError
from services.common.status import IndexProgress
from services.common.stores.base import VectorStore
from services.indexer.stages import DecodedBatch, StoreWriter, embed_batch, plan_run, read_in_threads

logger = logging.getLogger(__name__)
STAGES = ("plan", "read", "embed", "write")


@dataclass
class IndexReport:
    """What an indexing run did; `failed` lists each skipped (undecodable) file with the reason.

    `stage_seconds` sums each stage's time over the batches: with several batches in flight their sum
    can exceed `seconds`, the run's wall-clock time.
    """

    total: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    documents: int = 0

    @property
    def indexed(self) -> int:
        """Images embedded and written by this run."""
        return self.added + self.updated

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds else 0.0

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the time spent in the `with` block to `stage_seconds[stage]` (also when it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] += time.perf_counter() - started

    def counts(self) -> dict[str, int]:
        """The machine-readable summary (`cbir index --json`)."""
        return {"total": self.total, "added": self.added, "updated": self.updated, "unchanged": self.unchanged,
                "removed": self.removed, "skipped": len(self.failed), "documents": self.documents}

    def summary(self) -> str:
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.stage_seconds.items())
        return (f"{self.total} images: indexed {self.indexed} (added {self.added}, updated {self.updated}), "
                f"unchanged {self.unchanged}, removed {self.removed}, skipped {len(self.failed)} undecodable, "
                f"{self.documents} documents in the store; "
                f"{self.seconds:.1f} s, {self.images_per_second:.0f} images/s ({stages})")


@dataclass(frozen=True, kw_only=True)
class IndexOptions:
    """How a run batches and reports; `services.wiring.index_options` builds it from the settings."""

    batch_size: int
    concurrency: int
    rebuild: bool  # drop an index built by another model instead of refusing
    progress_bar: bool  # a tqdm bar on the terminal
    layout: Layout = Layout.auto
    sync: bool = False  # remove the documents of this root whose file is gone
    flush_every: int = 20  # batches between saves: what a crash can lose at most


async def open_store_for(embedder: EmbeddingService, store: VectorStore, *, rebuild: bool) -> EmbedderInfo:
    """Open (or create) the store for the embedder's vectors; returns what the embedder said of its model."""
    info = await embedder.info()
    try:
        await store.open(dims=info.dims, model_version=info.model_version, create=True)
    except StoreMismatchError as exc:
        if not rebuild:
            raise
        logger.warning("%s; rebuilding the index", exc.message)
        await store.reset()
        await store.open(dims=info.dims, model_version=info.model_version, create=True)
    return info


async def index_collection(root: Path, split: str, embedder: EmbeddingService, store: VectorStore,
                           options: IndexOptions, *, progress: IndexProgress | None = None) -> IndexReport:
    """Bring the store up to date with the collection at `root` (its `split`, in the split layout).

    `progress`, when given, is kept up to date for whoever reports on the run (the gateway's `/healthz`).
    """
    started = time.perf_counter()
    report = IndexReport()
    progress = progress if progress is not None else IndexProgress()
    info = await open_store_for(embedder, store, rebuild=options.rebuild)
    with report.timed("plan"):
        plan = await plan_run(root, split, store, layout=options.layout, sync=options.sync)
    report.total, report.unchanged = plan.total, plan.unchanged
    report.failed += plan.unreadable
    progress.indexed, progress.total = plan.unchanged + len(plan.unreadable), plan.total
    logger.info("%s (%s): %d images, %d unchanged, %d new or changed%s", plan.source, options.layout.value,
                plan.total, plan.unchanged, len(plan.to_embed),
                f", {len(plan.to_delete)} gone" if options.sync else "")

    writer = StoreWriter(store, flush_every=options.flush_every, replacing=plan.replacing)
    bar = tqdm(total=len(plan.to_embed), desc="indexing", unit="img", disable=not options.progress_bar)

    def batch_done(images: int) -> None:
        progress.indexed += images
        bar.update(images)
        if report.failed:
            bar.set_postfix(skipped=len(report.failed))

    try:
        await index_batches(
            plan.batches(options.batch_size), report, concurrency=options.concurrency, done=batch_done,
            read=lambda batch: read_in_threads(root, batch, size=info.image_size, resample=info.resize,
                                               threads=read_threads(options.concurrency)),
            embed=lambda decoded: embed_batch(embedder, decoded, model_version=info.model_version),
            write=writer.write)
        with report.timed("write"):
            report.removed = await writer.delete(plan.to_delete)
    finally:
        bar.close()
        with report.timed("write"):
            await writer.flush()  # keep what was written, also when a batch failed
    report.added, report.updated = writer.added, writer.updated
    report.documents = await store.count()
    report.seconds = time.perf_counter() - started
    for path, reason in report.failed:
        logger.warning("skipped %s: %s", path, reason)
    return report


def read_threads(concurrency: int) -> int:
    """Threads that read one batch: every core when one batch is in flight (nothing runs beside its reading: the
    forward pass waits for it), one when batches overlap (their reading shares the cores with an embedding)."""
    return (os.cpu_count() or 1) if concurrency == 1 else 1


async def index_batches(batches: Sequence[list[CollectionImage]], report: IndexReport, *, concurrency: int,
                        read: Callable[[list[CollectionImage]], Awaitable[DecodedBatch]],
                        embed: Callable[[DecodedBatch], Awaitable[list[ImageDocument]]],
                        write: Callable[[list[ImageDocument]], Awaitable[None]],
                        done: Callable[[int], None]) -> None:
    """Each batch through read → embed → write, with up to `concurrency` batches in flight (the next one
    reading while one embeds); each stage's time goes into `report`, each undecodable file
    into `report.failed`, and `done` hears how many images each finished batch took care of. On the first
    failure the other batches are cancelled and it is raised. `index_collection` passes the stages: read in
    worker threads (`read_threads`), embed through the embedding service, write through a `StoreWriter`.

    With the model in this process one batch is in flight (`services.wiring.build_index_options`): on two
    cores an OpenMP forward pass waits for its slowest thread, so a decoder running beside it slows it more
    than the decoding costs when it runs alone, between two forward passes."""
    slots = asyncio.Semaphore(concurrency)

    async def index_batch(batch: list[CollectionImage]) -> None:
        async with slots:
            with report.timed("read"):
                decoded = await read(batch)
            report.failed += decoded.failed
            with report.timed("embed"):
                documents = await embed(decoded)
            with report.timed("write"):
                await write(documents)
            done(len(batch))

    await _gather_all([index_batch(batch) for batch in batches])


async def _gather_all(coroutines: Sequence[Awaitable[None]]) -> None:
    """Run all; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
