"""Where settings become the system's parts: what each `CBIR_*` setting builds, in one file.

    build_embedding_service(settings)        CBIR_EMBEDDER_URL set: the embedder over HTTP; unset: the model here
    build_local_embedding_service(settings)  the model in this process (the embedder service, one machine)
    compile_cache_root(settings)             where its compiled code is kept (CBIR_COMPILE_CACHE_DIR)
    build_store(settings)                    the store named by CBIR_BACKEND: FAISS file or Elasticsearch
    build_elasticsearch_store(settings)      the Elasticsearch store itself (its alias, for a rollover)
    build_index_options(settings, ...)       how the indexer batches (CBIR_INDEX_BATCH_SIZE, CBIR_INDEX_CONCURRENCY)
    build_watch_options(settings)            how a watched folder batches changes and retries (CBIR_WATCH_*)

The entry points (`services.serve`, `services.cli`, `services.evaluation`) call these and hand the parts to the
apps; no app imports this module. Heavy parts (torch, the Elasticsearch client) are imported only when the
settings ask for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from services.common.allocator import reuse_freed_memory
from services.common.collection import Layout
from services.common.cores import faiss_threads, single_threaded_blas, torch_threads
from services.common.embedding import EmbeddingService, HttpEmbeddingClient
from services.common.settings import (
    Backend,
    EmbedderClientSettings,
    EmbeddingSettings,
    IndexingSettings,
    ModelSettings,
    StoreSettings,
    WatchSettings,
)
from services.common.stores.base import VectorStore

if TYPE_CHECKING:
    from services.common.stores.elasticsearch import ElasticsearchStore
    from services.embedder.runtime import LocalEmbeddingService
    from services.indexer.pipeline import IndexOptions
    from services.indexer.watch import WatchOptions


def build_local_embedding_service(settings: ModelSettings) -> LocalEmbeddingService:
    """Load the bundle (`CBIR_MODEL_DIR`, else the shipped one), warm the model up and start its
    micro-batcher (and `CBIR_COMPILE`'s compilation, in the background); `BundleError` if the bundle is
    missing or corrupt. Blocking: seconds."""
    import torch

    from services.embedder.bundle import DEFAULT_BUNDLE_DIR, load_bundle
    from services.embedder.inference import compile_wanted, pick_device
    from services.embedder.runtime import Embedder, LocalEmbeddingService

    torch.set_num_threads(torch_threads(settings.torch_threads))  # process-wide: CBIR_TORCH_THREADS or the cores
    prepare_process_for_the_model()
    bundle = load_bundle(settings.model_dir or DEFAULT_BUNDLE_DIR)
    embedder = Embedder(bundle, device=settings.device, pca_dims=settings.pca_dims,
                        onehot_weight=settings.onehot_weight, max_batch=settings.max_batch,
                        compile=compile_wanted(settings.compile, pick_device(settings.device)),
                        compile_cache=compile_cache_root(settings), build=settings.compile != "cached")
    service = LocalEmbeddingService(embedder, max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue)
    service.start()
    return service


def prepare_process_for_the_model() -> None:
    """What a process that runs the model sets for itself (the benches' yardsticks too): BLAS on one thread (numpy's
    idle threads would spin beside the forward pass) and an allocator that keeps activations for reuse instead of
    mapping them afresh for each forward pass (docs/performance.md#blas-threads-and-the-allocator)."""
    single_threaded_blas()
    reuse_freed_memory()


def compile_cache_root(settings: ModelSettings) -> Path | None:
    """`CBIR_COMPILE_CACHE_DIR`, else `<CBIR_STATE_DIR>/compile-cache` for a service with a state dir (`cbir
    serve`, `cbir index`), else None: torch's own folder (`cbir embedder`)."""
    if settings.compile_cache_dir is not None:
        return settings.compile_cache_dir
    return settings.state_dir / "compile-cache" if isinstance(settings, StoreSettings) else None


def build_embedding_service(settings: EmbeddingSettings) -> EmbeddingService:
    """The embedder named by `CBIR_EMBEDDER_URL`, or the model in this process (blocking while it loads)."""
    if settings.embedder_url is None:
        return build_local_embedding_service(settings)
    api_key = settings.embedder_api_key.get_secret_value() if settings.embedder_api_key else None
    return HttpEmbeddingClient(str(settings.embedder_url), timeout_s=settings.embedder_timeout_s,
                               retries=settings.embedder_retries, api_key=api_key)


def build_store(settings: StoreSettings, *, faiss_path: Path | None = None, versioned: bool = False) -> VectorStore:
    """The store named by `CBIR_BACKEND`; nothing is opened or created until `open()`. The FAISS file is
    `faiss_path`, else the index one machine serves (`<state dir>/serving.json`, else `<state dir>/index.npz`);
    Elasticsearch's index is the one behind the `CBIR_ES_INDEX` alias, or with `versioned` the index of the
    model version it is opened with (a rebuild beside the served one)."""
    if settings.backend is Backend.elasticsearch:
        return build_elasticsearch_store(settings, versioned=versioned)
    import faiss

    from services.common.stores.faiss import FaissStore
    from services.indexer.serving import served_index

    faiss.omp_set_num_threads(faiss_threads(settings.faiss_threads))  # process-wide: beside the model's threads
    single_threaded_blas()  # FAISS's and numpy's, loaded by now
    return FaissStore(faiss_path or served_index(settings.state_dir), index=settings.faiss_index,
                      fold_records=settings.faiss_log_fold_records, fold_bytes=settings.faiss_log_fold_bytes)


def build_elasticsearch_store(settings: StoreSettings, *, versioned: bool = False) -> ElasticsearchStore:
    """The Elasticsearch store of `CBIR_ES_*` (`build_store`'s, as its own type: what a rollover needs)."""
    from services.common.stores.elasticsearch import ElasticsearchStore

    return ElasticsearchStore.from_settings(settings, versioned=versioned)


def build_index_options(settings: IndexingSettings, *, rebuild: bool, progress_bar: bool = True,
                        batch_size: int | None = None, concurrency: int | None = None, layout: Layout = Layout.auto,
                        sync: bool = False) -> IndexOptions:
    """The indexer's options from `CBIR_INDEX_*`; explicit arguments (command-line flags) win. Without either, one
    batch is in flight with the model in this process (its forward pass runs alone on the cores) and two through
    `CBIR_EMBEDDER_URL` (the next batch decodes while the embedder works)."""
    from services.indexer.pipeline import IndexOptions

    remote = isinstance(settings, EmbedderClientSettings) and settings.embedder_url is not None
    return IndexOptions(batch_size=batch_size or settings.index_batch_size,
                        concurrency=concurrency or settings.index_concurrency or (2 if remote else 1),
                        rebuild=rebuild, progress_bar=progress_bar, layout=layout, sync=sync)


def build_watch_options(settings: WatchSettings) -> WatchOptions:
    """How a watched folder batches its changes and retries a half-written file, from `CBIR_WATCH_*`."""
    from services.indexer.watch import WatchOptions

    return WatchOptions(settle_ms=settings.watch_settle_ms, max_batch_ms=settings.watch_max_batch_ms,
                        retries=settings.watch_retries, retry_ms=settings.watch_retry_ms)
