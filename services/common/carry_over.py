"""Carrying what the API changed in a served index over to its successor, built meanwhile by another model.

A rebuild lists the collection, so collection images are the new index's own business; what only the API
knows are uploads (added while the rebuild ran) and deletions. One machine replays them when it swaps
(`SearchEngine.swap`), a cluster when `cbir promote` moves the alias.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from services.common.collection import resolve_inside
from services.common.documents import UPLOAD_SOURCE, ImageDocument
from services.common.embedding import EmbeddingService
from services.common.images import decode_image
from services.common.stores.base import VectorStore

logger = logging.getLogger(__name__)


async def carry_over_uploads(served: VectorStore, successor: VectorStore, embedder: EmbeddingService,
                             uploads_dir: Path, *, deleted: Iterable[str] = ()) -> tuple[int, int]:
    """Make `successor` (open, `embedder`'s vectors) hold the uploads `served` holds: those only `served` holds
    are embedded from their files in `uploads_dir` with `embedder` and added, those only `successor` holds
    (deleted meanwhile) removed, and so are the `deleted` ids. Returns how many were added and removed."""
    theirs = {doc.id: doc async for doc in served.iter_documents(source=UPLOAD_SOURCE)}
    ours = {doc.id async for doc in successor.iter_documents(source=UPLOAD_SOURCE)}
    info = await embedder.info()
    added = 0
    for doc_id in sorted(set(theirs) - ours):
        document = theirs[doc_id]
        path = resolve_inside(uploads_dir, document.path) if uploads_dir.is_dir() else None
        if path is None:
            logger.warning("upload %s has no file under %s; not carried over to model %s", doc_id, uploads_dir,
                           info.model_version)
            continue
        pixels = await asyncio.to_thread(decode_image, path.read_bytes(), size=info.image_size, resample=info.resize)
        [embedding] = await embedder.embed(pixels[np.newaxis], purpose="index")
        added += await successor.add(ImageDocument.of(document, vector=embedding.vector,
                                                      predicted_label=embedding.label,
                                                      confidence=embedding.confidence,
                                                      model_version=info.model_version))
    doomed = sorted((ours - set(theirs)) | set(deleted))
    removed = 0
    for doc_id in doomed:
        removed += await successor.remove(doc_id)
    logger.info("carried %d uploads and %d deletions over to model %s", added, removed, info.model_version)
    return added, removed
