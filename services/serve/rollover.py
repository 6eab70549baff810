"""A new model without downtime: its index is built beside the served one, then served in its place.

The steps, on both stores:

    where the rebuild goes   one machine: `index-<model version>.npz` beside the served file (`rebuild_beside`);
                             Elasticsearch: the index of the model version, not behind the alias yet
    indexing                 `services.indexer.pipeline.index_collection` into it
    carry over               the uploads added and the images deleted through the API meanwhile
                             (`carry_over_uploads`): a rebuild lists the collection, so collection images are
                             the new index's own business; uploads and deletions only the API knows
    serve it                 one machine: `record_served` writes `<state dir>/serving.json`, and a running
                             `cbir serve` swaps to the new pair (`SearchEngine.swap`, which carries over first);
                             Elasticsearch: `promote` carries over, then moves the alias in one atomic call
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np

from services.common.collection import resolve_inside
from services.common.documents import UPLOAD_SOURCE, ImageDocument
from services.common.embedding import EmbedderInfo, EmbeddingService
from services.common.errors import ConfigError, IndexNotReadyError
from services.common.images import decode_image
from services.common.settings import Backend
from services.common.stores.base import VectorStore
from services.indexer.serving import ServingRecord, forget, index_file_for, keep_bundle, read_record, write_record
from services.indexer.settings import IndexerSettings
from services.wiring import build_elasticsearch_store, build_embedding_service

logger = logging.getLogger(__name__)


def rebuild_beside(settings: IndexerSettings, model: EmbedderInfo) -> Path | None:
    """Where `cbir index --rebuild` builds `model`'s index on one machine: beside the served index when that one
    holds another model's vectors (so a running `cbir serve` goes on serving it until the new pair is recorded,
    then swaps); None to index in place (nothing recorded yet, the same model, or not one machine's in-process
    model: Elasticsearch rebuilds into the index of its model version instead)."""
    if settings.backend is not Backend.faiss or settings.embedder_url is not None:
        return None
    record = read_record(settings.state_dir)
    if record is None or record.model_version == model.model_version:
        return None
    return settings.state_dir / index_file_for(model.model_version)


def record_served(state_dir: Path, model: EmbedderInfo, *, bundle_dir: Path, index: str) -> ServingRecord:
    """Record `model` (its bundle, from `bundle_dir`, kept under the state dir) and the `index` file as what one
    machine serves, and remove the index and bundle copy of the pair recorded before, when it was another."""
    record = ServingRecord(model_version=model.model_version, index=index,
                           model_dir=keep_bundle(state_dir, bundle_dir, model.bundle_version),
                           pca_dims=model.pca_dims, onehot_weight=model.onehot_weight)
    before = read_record(state_dir)
    write_record(state_dir, record)
    if before is not None:
        forget(state_dir, before, keep=record)
    return record


async def carry_over_uploads(served: VectorStore, successor: VectorStore, embedder: EmbeddingService,
                             deleted: Iterable[str] = (), *, uploads_dir: Path) -> tuple[int, int]:
    """Make `successor` (open, `embedder`'s vectors) hold the uploads `served` holds: those only `served` holds
    are embedded from their files in `uploads_dir` with `embedder` and added, those only `successor` holds
    (deleted meanwhile) removed, and so are the `deleted` ids. Returns how many were added and removed.

    Its first four arguments are those `SearchEngine.swap` passes its `carry_over`; bind `uploads_dir` first.
    """
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
    removed = 0
    for doc_id in sorted((ours - set(theirs)) | set(deleted)):
        removed += await successor.remove(doc_id)
    logger.info("carried %d uploads and %d deletions over to model %s", added, removed, info.model_version)
    return added, removed


async def promote(settings: IndexerSettings, version: str) -> str | None:
    """`cbir promote VERSION`: serve the Elasticsearch index of `version` (built by `cbir index --rebuild`),
    carrying the uploads and deletions made meanwhile over from the served index (re-embedding uploads with the
    configured model, which must be `version`'s), then moving the alias in one call that applies whole or not at
    all: of two promotes at once, the later fails (`StoreLayoutError`) and changes nothing. An index from before
    versioned indices (a concrete index named like the alias) is the served one here, and that call removes it.
    Returns the index served before."""
    if settings.backend is not Backend.elasticsearch:
        raise ConfigError("cbir promote moves an Elasticsearch alias (CBIR_BACKEND=elasticsearch); on one machine "
                          "cbir serve and cbir index --rebuild swap to the new model by themselves")
    async with AsyncExitStack() as resources:
        service = await asyncio.to_thread(build_embedding_service, settings)
        resources.push_async_callback(service.close)
        info = await service.info()
        if info.model_version != version:
            raise ConfigError(f"the configured model is {info.model_version!r}, not {version!r}: promote "
                              "re-embeds the uploads with it; configure the model of the version to promote")
        store = build_elasticsearch_store(settings, versioned=True)
        resources.push_async_callback(store.close)
        await store.open(dims=info.dims, model_version=info.model_version, create=False)
        if await store.count() == 0:
            raise IndexNotReadyError(f"{store.index} is empty; build it with `cbir index --rebuild`")
        previous = await store.promote(
            lambda served: carry_over_uploads(served, store, service, uploads_dir=settings.uploads_dir))
    logger.info("serving %s (model %s) behind %s; before: %s", store.index, version, store.alias, previous)
    return previous
