"""The indexer's four stages, each usable and testable on its own: plan (what to embed, what to delete),
read (load and decode a batch), embed (the embedding service), write (the store); `pipeline` runs them."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.collection import CollectionImage, Layout, scan_collection
from services.common.documents import ImageDocument, StoredImage
from services.common.embedding import EmbeddingService
from services.common.errors import ImageError
from services.common.images import decode_image
from services.common.stores.base import VectorStore

UNREADABLE = "the file cannot be read (a dangling link, or removed meanwhile)"

# --- plan ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexPlan:
    """What a run does to bring the store up to date with the collection at `source`.

    `to_embed`: the files the store does not hold yet (added) or holds with another size or mtime (re-embedded;
    their ids are `replacing`), in the collection's order; `to_delete`: with sync, the ids of this root's
    documents whose file is gone; `unreadable`: (path, reason) of files listed but not readable. The rest of
    the collection is unchanged and skipped, which is what makes an interrupted run resume where it stopped.
    """

    source: str
    total: int  # images in the collection, readable or not
    to_embed: list[CollectionImage]
    replacing: frozenset[str]
    to_delete: list[str]
    unreadable: list[tuple[str, str]]

    @property
    def unchanged(self) -> int:
        return self.total - len(self.to_embed) - len(self.unreadable)

    def batches(self, size: int) -> list[list[CollectionImage]]:
        """`to_embed` in batches of `size`, in order."""
        return [self.to_embed[i:i + size] for i in range(0, len(self.to_embed), size)]


def make_plan(source: str, images: Sequence[CollectionImage], stored: Mapping[str, StoredImage], *,
              sync: bool) -> IndexPlan:
    """The plan for `images` (the collection at `source`, as scanned) against `stored`, the store's
    documents of that source by id."""
    unreadable = [(image.path, UNREADABLE) for image in images if image.size is None]
    to_embed = [image for image in images if image.size is not None
                and (image.id not in stored or _changed(image, stored[image.id]))]
    to_delete = sorted(set(stored) - {image.id for image in images}) if sync else []
    return IndexPlan(source=source, total=len(images), to_embed=to_embed,
                     replacing=frozenset(image.id for image in to_embed if image.id in stored),
                     to_delete=to_delete, unreadable=unreadable)


async def plan_run(root: Path, split: str, store: VectorStore, *, layout: Layout, sync: bool) -> IndexPlan:
    """Scan the collection at `root` (off the event loop) and compare it with what the store holds of it."""
    images = await asyncio.to_thread(scan_collection, root, layout=layout, split=split)
    source = str(root.resolve())
    stored = {document.id: document async for document in store.iter_documents(source=source)}
    return make_plan(source, images, stored, sync=sync)


def _changed(image: CollectionImage, stored: StoredImage) -> bool:
    return stored.size != image.size or stored.mtime != image.mtime


# --- read ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A batch read from disk: its decodable images, their pixels `(N, S, S, 3)` uint8 in the same order
    (None when none decoded), and each undecodable file's (path, reason)."""

    images: list[CollectionImage]
    pixels: np.ndarray | None
    failed: list[tuple[str, str]]

    @classmethod
    def joined(cls, parts: Sequence[DecodedBatch]) -> DecodedBatch:
        """The parts of one batch as one, in their order."""
        pixels = [part.pixels for part in parts if part.pixels is not None]
        return cls(images=[image for part in parts for image in part.images],
                   pixels=np.concatenate(pixels) if pixels else None,
                   failed=[failure for part in parts for failure in part.failed])


def read_batch(root: Path, batch: Sequence[CollectionImage], *, size: int, resample: str) -> DecodedBatch:
    """Read and decode a batch as the model's bundle says (`EmbedderInfo.image_size`, `.resize`). Blocking:
    the pipeline runs it in worker threads (`read_in_threads`)."""
    images, decoded, failed = [], [], []
    for image in batch:
        try:
            decoded.append(decode_image((root / image.path).read_bytes(), size=size, resample=resample))
            images.append(image)
        except (ImageError, OSError) as exc:
            failed.append((image.path, getattr(exc, "message", str(exc))))
    return DecodedBatch(images=images, pixels=np.stack(decoded) if decoded else None, failed=failed)


async def read_in_threads(root: Path, batch: Sequence[CollectionImage], *, size: int, resample: str,
                          threads: int) -> DecodedBatch:
    """`read_batch` with the batch split over `threads` worker threads (file reads and OpenCV's decoding release
    the GIL): for a batch read while nothing else runs, so that every core reads."""
    step = -(-len(batch) // max(1, threads)) or 1
    parts = await asyncio.gather(*(asyncio.to_thread(read_batch, root, batch[start:start + step], size=size,
                                                     resample=resample)
                                   for start in range(0, len(batch), step)))
    return DecodedBatch.joined(parts)


# --- embed --------------------------------------------------------------------------------------------


async def embed_batch(embedder: EmbeddingService, batch: DecodedBatch, *, model_version: str
                      ) -> list[ImageDocument]:
    """The batch's documents: each decoded image with the vector and class the embedder gives it (purpose
    "index": the bundle's index-side views). `model_version` is the embedder's, asked once per run."""
    if batch.pixels is None:
        return []
    embeddings = await embedder.embed(batch.pixels, purpose="index")
    return [ImageDocument(id=image.id, filename=image.filename, path=image.path, source=image.source,
                          label=image.label, predicted_label=embedding.label, confidence=embedding.confidence,
                          size=image.size or 0, mtime=image.mtime or 0.0, model_version=model_version,
                          vector=embedding.vector)
            for image, embedding in zip(batch.images, embeddings, strict=True)]


# --- write --------------------------------------------------------------------------------------------


class StoreWriter:
    """The write stage: upserts each batch's documents, one batch at a time, and saves the store every
    `flush_every` batches, so that a crash or Ctrl-C loses at most those (the next run's plan embeds them
    again); counts what it added and what it replaced (`replacing`: the ids the store held before)."""

    def __init__(self, store: VectorStore, *, flush_every: int, replacing: frozenset[str] = frozenset()) -> None:
        self.store, self.flush_every, self.replacing = store, flush_every, replacing
        self.added = self.updated = 0
        self._batches = 0
        self._lock = asyncio.Lock()  # batches in flight finish embedding in any order; the store takes one

    async def write(self, documents: Sequence[ImageDocument]) -> None:
        async with self._lock:
            await self.store.upsert(documents)
            self._batches += 1
            if self._batches % self.flush_every == 0:
                await self.store.flush()
        updated = sum(document.id in self.replacing for document in documents)
        self.updated += updated
        self.added += len(documents) - updated

    async def delete(self, ids: Sequence[str]) -> int:
        """Delete documents by id (a sync's vanished files); returns how many existed."""
        return await self.store.delete(ids) if ids else 0

    async def flush(self) -> None:
        """Make every write so far durable: at the end of a run, and when it fails."""
        await self.store.flush()
