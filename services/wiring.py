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

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.collection import Layout, find_data_dir
from services.common.embedding import EmbeddingService, HttpEmbeddingClient
from services.common.errors import CbirError
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
    from services.indexer.serving import ServingRecord
    from services.indexer.settings import IndexerSettings
    from services.search.engine import SearchEngine

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


def build_store(settings: StoreSettings, *, faiss_path: Path | None = None, versioned: bool = False) -> VectorStore:
    """The store named by `CBIR_BACKEND`; nothing is opened or created until `open()`. The FAISS file is
    `faiss_path`, else the index one machine serves (`<state dir>/serving.json`), else `<state dir>/index.npz`;
    Elasticsearch's index is the one behind the `CBIR_ES_INDEX` alias, or with `versioned` the index of the
    model version it is opened with (a rebuild beside the served one)."""
    if settings.backend is Backend.elasticsearch:
        from services.common.stores.elasticsearch import ElasticsearchStore

        return ElasticsearchStore.from_settings(settings, versioned=versioned)
    import faiss

    from services.common.stores.faiss import FaissStore

    faiss.omp_set_num_threads(settings.faiss_threads)  # process-wide: searches run beside the model's threads
    return FaissStore(faiss_path or served_faiss_path(settings), index=settings.faiss_index)


def served_faiss_path(settings: StoreSettings) -> Path:
    """The FAISS file one machine serves: the one `<state dir>/serving.json` records, else `index.npz`."""
    from services.indexer.serving import read_record

    record = read_record(settings.state_dir)
    return settings.state_dir / record.index if record is not None else settings.faiss_path


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


class OneMachine:
    """What `cbir serve` serves and builds (FAISS, the model in this process).

    The served pair is the one `<state dir>/serving.json` records (`services.indexer.serving`). When the
    configured model is another one, the recorded model goes on serving its index while the background
    run builds the configured model's index beside it; then the engine swaps both at once and the new pair
    is recorded. Without a record (or with its bundle gone) the configured model indexes in place, as on a
    first start: search answers 503 `indexing` until it is done.
    """

    def __init__(self, settings: OneMachineSettings) -> None:
        from services.indexer.serving import read_record

        self.settings = settings
        self.record = read_record(settings.state_dir) if settings.backend is Backend.faiss else None
        self.next: LocalEmbeddingService | None = None  # the configured model, while another one serves

    def embedder(self) -> EmbeddingService:
        """The served model: the recorded one when the configured one differs (blocking: loads models)."""
        from services.common.errors import BundleError

        configured = build_embedding_service(self.settings)
        record = self.record
        if record is None or self.settings.embedder_url is not None or \
                record.model_version == configured.embedder.model_version:  # type: ignore[union-attr]
            return configured
        try:
            served = build_local_embedding_service(record.model_settings(self.settings.state_dir, self.settings))
        except BundleError as exc:
            logger.warning("the served model %s cannot be loaded (%s); indexing with the configured one instead",
                           record.model_version, exc.message)
            self.record = None
            return configured
        logger.info("serving model %s while the index of the configured model %s is built",
                    record.model_version, configured.embedder.model_version)  # type: ignore[union-attr]
        self.next = configured  # type: ignore[assignment]
        return served

    def store(self) -> VectorStore:
        return build_store(self.settings)

    async def background(self, engine: SearchEngine, progress: IndexProgress) -> None:
        from services.indexer.serving import index_file_for

        state = self.settings.state_dir
        if self.next is None:  # index in place: the first build, or an update of the served index
            await index_configured_collection(self.settings, engine.embedder, engine.store, progress)
            if self.settings.backend is Backend.faiss and self.settings.embedder_url is None:
                self.record = record_served(self.settings, engine.embedder, engine.store.path.name)  # type: ignore
            return
        assert self.record is not None
        next_embedder, self.next = self.next, None
        store = build_store(self.settings, faiss_path=state / index_file_for(next_embedder.embedder.model_version))
        try:
            await index_configured_collection(self.settings, next_embedder, store, progress)
        except BaseException:
            await store.close()
            await next_embedder.close()
            raise
        await engine.swap(next_embedder, store)  # which closes both if it fails
        self.record = record_served(self.settings, next_embedder, store.path.name)  # type: ignore[attr-defined]

    async def watch(self, engine: SearchEngine, *, every_s: float = 2.0) -> None:
        """Swap to the pair `serving.json` names when another process (`cbir index --rebuild`) records a new one."""
        from services.indexer.serving import read_record

        if self.settings.backend is not Backend.faiss or self.settings.embedder_url is not None:
            return
        while True:
            await asyncio.sleep(every_s)
            record = read_record(self.settings.state_dir)
            if (record is None or engine.model_version in (None, record.model_version)
                    or engine.progress is not None):  # nothing new, not serving yet, or our own run goes on
                continue
            logger.info("serving.json names model %s: loading it", record.model_version)
            try:
                embedder = await asyncio.to_thread(build_local_embedding_service,
                                                   record.model_settings(self.settings.state_dir, self.settings))
            except CbirError as exc:
                logger.error("cannot serve the recorded model %s: %s", record.model_version, exc.message)
                continue
            await engine.swap(embedder, build_store(self.settings, faiss_path=self.settings.state_dir / record.index))
            self.record = record


def record_served(settings: OneMachineSettings | IndexerSettings, service: EmbeddingService,
                  index: str) -> ServingRecord:
    """Record `service`'s model (its bundle kept under the state dir) and the `index` file as what one machine
    serves, and remove the index and bundle copy of the pair recorded before, when it was another."""
    from services.embedder.bundle import DEFAULT_BUNDLE_DIR
    from services.indexer.serving import DEFAULT_INDEX, ServingRecord, forget, keep_bundle, read_record, write_record

    state = settings.state_dir
    embedder = service.embedder  # type: ignore[attr-defined]
    record = ServingRecord(model_version=embedder.model_version, index=index,
                           model_dir=keep_bundle(state, Path(settings.model_dir or DEFAULT_BUNDLE_DIR),
                                                 embedder.bundle.version),
                           pca_dims=embedder.pca_dims, onehot_weight=embedder.onehot_weight)
    before = read_record(state)
    write_record(state, record)
    if before is not None:
        forget(state, before, keep=record)
    elif index != DEFAULT_INDEX:  # the index of a state dir from before the record existed
        (state / DEFAULT_INDEX).unlink(missing_ok=True)
    return record


async def rebuild_path(settings: StoreSettings, service: EmbeddingService) -> Path | None:
    """Where `cbir index --rebuild` builds the index of `service`'s model on one machine: beside the served
    index when that one holds another model's vectors (so a running `cbir serve` goes on serving it until the
    new pair is recorded, then swaps); None to index in place."""
    from services.common.errors import StoreMismatchError
    from services.common.stores.faiss import FaissStore
    from services.indexer.serving import index_file_for, read_record

    if settings.backend is not Backend.faiss or not hasattr(service, "embedder"):
        return None
    info = await service.info()
    record = read_record(settings.state_dir)
    if record is not None:
        return None if record.model_version == info.model_version else settings.state_dir / index_file_for(
            info.model_version)
    if not settings.faiss_path.exists():
        return None
    probe = FaissStore(settings.faiss_path)  # an index from before the record existed: whose is it?
    try:
        await probe.open(dims=info.dims, model_version=info.model_version, create=False)
    except StoreMismatchError:
        return settings.state_dir / index_file_for(info.model_version)
    except CbirError:
        return None
    finally:
        await probe.close()
    return None


def create_one_machine_app(settings: OneMachineSettings, *, index: bool = True) -> FastAPI:
    """The gateway with the model in this process; with `index`, its lifespan brings the index up to date in
    the background (the first build, new files, or the index of a new model, built while the old one serves)
    while `/healthz` and `/collection` report the progress."""
    from services.search.app import create_app

    one_machine = OneMachine(settings)
    return create_app(settings, embedder_factory=one_machine.embedder, store_factory=one_machine.store,
                      background=one_machine.background if index else None, watch=one_machine.watch)
