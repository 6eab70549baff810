"""Where settings become the system's parts: what each `CBIR_*` setting builds, in one file.

    build_embedding_service(settings)        CBIR_EMBEDDER_URL set: the embedder over HTTP; unset: the model here
    build_local_embedding_service(settings)  the model in this process (the embedder service, one machine)
    build_store(settings)                    the store named by CBIR_BACKEND: FAISS file or Elasticsearch
    index_options(settings, ...)             how the indexer batches (CBIR_INDEX_BATCH_SIZE, CBIR_INDEX_CONCURRENCY)
    create_one_machine_app(settings)         `cbir serve`: the gateway, the model in-process, indexing in the
                                             background of the gateway's lifespan

Services import this module, never each other's app modules; nothing in `services.common` imports it.
Heavy parts (torch, the Elasticsearch client) are imported only when the settings ask for them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from services.common.collection import Layout, find_data_dir
from services.common.embedding import EmbeddingService, HttpEmbeddingClient
from services.common.settings import (
    Backend,
    EmbeddingSettings,
    IndexingSettings,
    ModelSettings,
    StoreSettings,
)
from services.common.status import IndexProgress
from services.common.stores.base import VectorStore
from services.search.settings import SearchSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from services.embedder.runtime import LocalEmbeddingService
    from services.indexer.pipeline import IndexOptions, IndexReport

logger = logging.getLogger(__name__)


def build_local_embedding_service(settings: ModelSettings) -> LocalEmbeddingService:
    """Load the bundle (`CBIR_MODEL_DIR`, else the shipped one), warm the model up and start its
    micro-batcher (and `CBIR_COMPILE`'s compilation, in the background); `BundleError` if the bundle is
    missing or corrupt. Blocking: seconds."""
    from services.embedder.bundle import DEFAULT_BUNDLE_DIR, load_bundle
    from services.embedder.inference import compile_wanted, pick_device
    from services.embedder.runtime import Embedder, LocalEmbeddingService

    bundle = load_bundle(settings.model_dir or DEFAULT_BUNDLE_DIR)
    embedder = Embedder(bundle, device=settings.device, pca_dims=settings.pca_dims,
                        onehot_weight=settings.onehot_weight, max_batch=settings.max_batch,
                        compile=compile_wanted(settings.compile, pick_device(settings.device)))
    service = LocalEmbeddingService(embedder, max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue)
    service.start()
    return service


def build_embedding_service(settings: EmbeddingSettings) -> EmbeddingService:
    """The embedder named by `CBIR_EMBEDDER_URL`, or the model in this process (blocking while it loads)."""
    if settings.embedder_url is None:
        return build_local_embedding_service(settings)
    api_key = settings.embedder_api_key.get_secret_value() if settings.embedder_api_key else None
    return HttpEmbeddingClient(str(settings.embedder_url), timeout_s=settings.embedder_timeout_s,
                               retries=settings.embedder_retries, api_key=api_key)


def build_store(settings: StoreSettings) -> VectorStore:
    """The store named by `CBIR_BACKEND`; nothing is opened or created until `open()`."""
    if settings.backend is Backend.elasticsearch:
        from services.common.stores.elasticsearch_store import ElasticsearchStore

        return ElasticsearchStore.from_settings(settings)
    import faiss

    from services.common.stores.faiss_store import FaissStore

    faiss.omp_set_num_threads(settings.faiss_threads)  # process-wide: searches run beside the model's threads
    return FaissStore(settings.faiss_path)


def index_options(settings: IndexingSettings, *, rebuild: bool, progress_bar: bool = True,
                  batch_size: int | None = None, concurrency: int | None = None, layout: Layout = Layout.auto,
                  sync: bool = False) -> IndexOptions:
    """The indexer's options from `CBIR_INDEX_*`; explicit arguments (command-line flags) win."""
    from services.indexer.pipeline import IndexOptions

    return IndexOptions(batch_size=batch_size or settings.index_batch_size,
                        concurrency=concurrency or settings.index_concurrency,
                        rebuild=rebuild, progress_bar=progress_bar, layout=layout, sync=sync)


class OneMachineSettings(SearchSettings, IndexingSettings):
    """`cbir serve`: the gateway's settings plus how its background indexing batches."""


async def index_configured_collection(settings: OneMachineSettings, embedder: EmbeddingService,
                                      store: VectorStore, progress: IndexProgress) -> IndexReport:
    """Index `CBIR_DATA_DIR`/`CBIR_INDEX_SPLIT` into `store`, rebuilding an index of another model version."""
    from services.indexer.pipeline import index_collection

    data_dir = find_data_dir(settings.data_dir)
    report = await index_collection(data_dir, settings.index_split, embedder, store,
                                    index_options(settings, rebuild=True), progress=progress)
    logger.info("index: %s", report.summary())
    return report


def create_one_machine_app(settings: OneMachineSettings, *, index: bool = True) -> FastAPI:
    """The gateway with the model in this process; with `index`, its lifespan indexes the collection in
    the background (first start, or a new model version) while `/healthz` reports the progress."""
    from services.search.app import create_app

    async def background(embedder: EmbeddingService, store: VectorStore, progress: IndexProgress) -> None:
        await index_configured_collection(settings, embedder, store, progress)

    return create_app(settings, background=background if index else None)
