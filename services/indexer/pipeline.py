"""Indexing as three stages, as in clip-retrieval: reader (list + decode) → mapper (embed) → writer.

Document ids are derived from the collection root and the image's path, so a re-run overwrites rather
than duplicates. A re-run embeds only what changed: files the store does not hold yet (added), files
whose size or mtime differ from the stored ones (updated); the rest is unchanged and skipped, so an
interrupted run resumes where it stopped. With `sync`, documents of the same root whose file is gone
are removed (never uploads, never other roots). The store is flushed every few batches, so a crash
loses at most those.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from services.common.collection import CollectionImage, Layout, scan_collection
from services.common.documents import ImageDocument, StoredImage
from services.common.embedding import EmbedderInfo, EmbeddingService
from services.common.errors import ImageError, StoreMismatchError
from services.common.images import decode_image
from services.common.status import IndexProgress
from services.common.stores.base import VectorStore

logger = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What an indexing run did; `failed` lists each skipped (undecodable) file with the reason."""

    total: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "embed": 0.0, "write": 0.0})
    documents: int = 0

    @property
    def indexed(self) -> int:
        """Images embedded and written by this run."""
        return self.added + self.updated

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds else 0.0

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


def _changed(image: CollectionImage, stored: StoredImage) -> bool:
    return stored.size != image.size or stored.mtime != image.mtime


async def index_collection(root: Path, split: str, embedder: EmbeddingService, store: VectorStore,
                           options: IndexOptions, *, progress: IndexProgress | None = None) -> IndexReport:
    """Bring the store up to date with the collection at `root` (its `split`, in the split layout).

    `progress`, when given, is kept up to date for whoever reports on the run (the gateway's `/healthz`).
    """
    started = time.perf_counter()
    report = IndexReport()
    progress = progress if progress is not None else IndexProgress()
    info = await open_store_for(embedder, store, rebuild=options.rebuild)
    images = await asyncio.to_thread(scan_collection, root, layout=options.layout, split=split)
    source = str(root.resolve())
    stored = {doc.id: doc async for doc in store.iter_documents(source=source)}
    unreadable = [image for image in images if image.size is None]
    report.failed += [(image.path, "the file cannot be read (a dangling link, or removed meanwhile)")
                      for image in unreadable]
    todo = [image for image in images if image.size is not None
            and (image.id not in stored or _changed(image, stored[image.id]))]
    report.total = len(images)
    report.unchanged = len(images) - len(todo) - len(unreadable)
    gone = sorted(set(stored) - {image.id for image in images}) if options.sync else []
    progress.indexed, progress.total = report.unchanged + len(unreadable), report.total
    logger.info("%s (%s): %d images, %d unchanged, %d new or changed%s", source, options.layout.value, len(images),
                report.unchanged, len(todo), f", {len(gone)} gone" if options.sync else "")

    batches = [todo[i:i + options.batch_size] for i in range(0, len(todo), options.batch_size)]
    bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not options.progress_bar)
    slots = asyncio.Semaphore(options.concurrency)
    write_lock = asyncio.Lock()
    written_batches = 0

    async def run_batch(batch: list[CollectionImage]) -> None:
        nonlocal written_batches
        async with slots:
            t0 = time.perf_counter()
            decoded, failed = await asyncio.to_thread(_read_batch, root, batch, info)
            t1 = time.perf_counter()
            report.failed += failed
            pixels = np.stack([image for _, image in decoded]) if decoded else None
            embeddings = await embedder.embed(pixels, purpose="index") if decoded else []
            t2 = time.perf_counter()
            documents = [
                ImageDocument(id=image.id, filename=image.filename, path=image.path, source=image.source,
                              label=image.label, predicted_label=embedding.label, confidence=embedding.confidence,
                              size=image.size or 0, mtime=image.mtime or 0.0, model_version=info.model_version,
                              vector=embedding.vector)
                for (image, _), embedding in zip(decoded, embeddings, strict=True)
            ]
            async with write_lock:
                await store.upsert(documents)
                written_batches += 1
                if written_batches % options.flush_every == 0:
                    await store.flush()
            t3 = time.perf_counter()
            updates = sum(doc.id in stored for doc in documents)
            report.updated += updates
            report.added += len(documents) - updates
            for stage, seconds in zip(("read", "embed", "write"), (t1 - t0, t2 - t1, t3 - t2), strict=True):
                report.stage_seconds[stage] += seconds
            progress.indexed += len(batch)
            bar.update(len(batch))
            if report.failed:
                bar.set_postfix(skipped=len(report.failed))

    try:
        await _gather_all([run_batch(batch) for batch in batches])
        if gone:
            report.removed = await store.delete(gone)
    finally:
        bar.close()
        await store.flush()  # keep what was written, also when a batch failed
    report.documents = await store.count()
    report.seconds = time.perf_counter() - started
    for path, reason in report.failed:
        logger.warning("skipped %s: %s", path, reason)
    return report


async def _gather_all(coroutines: Sequence) -> None:
    """Run all; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _read_batch(root: Path, batch: list[CollectionImage], model: EmbedderInfo
                ) -> tuple[list[tuple[CollectionImage, np.ndarray]], list[tuple[str, str]]]:
    """Decode a batch as the model's bundle says; undecodable files are listed with the reason."""
    decoded, failed = [], []
    for image in batch:
        try:
            pixels = decode_image((root / image.path).read_bytes(), size=model.image_size, resample=model.resize)
            decoded.append((image, pixels))
        except (ImageError, OSError) as exc:
            failed.append((image.path, getattr(exc, "message", str(exc))))
    return decoded, failed
