"""`cbir index`: a collection indexed into the configured store, and on one machine recorded as what is served."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from pathlib import Path

from services.common.settings import Backend
from services.indexer.pipeline import IndexOptions, IndexReport, index_collection
from services.indexer.serving import served_index
from services.indexer.settings import IndexerSettings
from services.serve.rollover import rebuild_beside, record_served
from services.wiring import build_elasticsearch_store, build_embedding_service, build_store

logger = logging.getLogger(__name__)


def indexing_model(settings: IndexerSettings) -> IndexerSettings:
    """The settings `cbir index` runs the model with: with `CBIR_COMPILE=auto` it loads the compiled packages already
    in the compile cache (`cached`: a `cbir serve` with the same state dir built them) and builds none (`on` builds).

    A package runs about 1.45 × the eager forward pass at batch 64 on two cores, but building one takes about 25 s of
    both cores: a one-off run of 50,000 images would lose more than it gains, and the build would share the cores
    with the forward pass that indexes meanwhile (docs/performance.md#indexing)."""
    return settings.model_copy(update={"compile": "cached"}) if settings.compile == "auto" else settings


async def index_into_store(settings: IndexerSettings, data_dir: Path, split: str, options: IndexOptions) -> IndexReport:
    """Index `data_dir` into the store the settings name. With `options.rebuild`, a model other than the served
    one builds its index beside it (one machine: `rebuild_beside`; Elasticsearch: the index of its version, served
    after `cbir promote`). One machine's in-process model is then recorded as served (`record_served`), so that a
    running `cbir serve` swaps to it."""
    async with AsyncExitStack() as resources:
        service = await asyncio.to_thread(build_embedding_service, indexing_model(settings))
        resources.push_async_callback(service.close)
        model = await service.info()
        if settings.backend is Backend.elasticsearch:
            versioned = options.rebuild  # the alias moves with `cbir promote`
            store = build_elasticsearch_store(settings, versioned=versioned)
            resources.push_async_callback(store.close)
            report = await index_collection(data_dir, split, service, store, options)
            if versioned and await store.served_index() != store.index:
                logger.info("built %s beside the served index; serve it with `cbir promote %s`", store.index,
                            model.model_version)
            return report
        beside = rebuild_beside(settings, model) if options.rebuild else None
        if beside is not None:
            logger.info("building the new model's index in %s; the served one stays until it is done", beside)
        path = beside or served_index(settings.state_dir)
        faiss_store = build_store(settings, faiss_path=path)
        resources.push_async_callback(faiss_store.close)
        report = await index_collection(data_dir, split, service, faiss_store, options)
        if settings.embedder_url is None:  # one machine's own model: what it serves from now on
            from services.embedder.bundle import DEFAULT_BUNDLE_DIR  # torch: only where the model runs here

            record_served(settings.state_dir, model, bundle_dir=settings.model_dir or DEFAULT_BUNDLE_DIR,
                          index=path.name)
        return report
