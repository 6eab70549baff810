"""What each `CBIR_*` setting builds (services/wiring.py): the embedding service, the store, the indexer's options."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from services.common.collection import Layout
from services.common.embedding import HttpEmbeddingClient
from services.common.errors import BundleError
from services.common.settings import EmbeddingSettings, IndexingSettings, ModelSettings, StoreSettings
from services.common.stores.elasticsearch import ElasticsearchStore
from services.common.stores.faiss import FaissStore
from services.indexer.settings import IndexerSettings
from services.wiring import (
    build_embedding_service,
    build_index_options,
    build_local_embedding_service,
    build_store,
)


def blas_threads() -> set[int]:
    """The thread counts of the BLAS libraries with threads of their own (not OpenMP's)."""
    return {library["num_threads"] for library in threadpool_info()
            if library["user_api"] == "blas" and library.get("threading_layer") != "openmp"}

pytestmark = pytest.mark.anyio


def test_the_faiss_store_searches_with_the_configured_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = faiss.omp_get_max_threads()
    try:
        for threads in (2, 1):
            monkeypatch.setenv("CBIR_FAISS_THREADS", str(threads))
            with threadpool_limits(limits=2, user_api="blas"):  # as it was before, on the way out
                store = build_store(StoreSettings.load())
                assert isinstance(store, FaissStore) and faiss.omp_get_max_threads() == threads
                assert blas_threads() == {1}  # FAISS's BLAS and numpy's
    finally:
        faiss.omp_set_num_threads(before)


def test_the_faiss_file_is_the_recorded_one_else_index_npz(tmp_path: Path) -> None:
    settings = StoreSettings(_env_file=None, state_dir=tmp_path)  # type: ignore[call-arg]
    first = build_store(settings)
    assert isinstance(first, FaissStore) and first.path == tmp_path / "index.npz"
    (tmp_path / "serving.json").write_text(json.dumps({
        "model_version": "m-d8-w2", "index": "index-m-d8-w2.npz", "model_dir": "models/m", "pca_dims": 8,
        "onehot_weight": 2.0}))
    recorded = build_store(settings)
    assert isinstance(recorded, FaissStore) and recorded.path == tmp_path / "index-m-d8-w2.npz"
    explicit = build_store(settings, faiss_path=tmp_path / "elsewhere.npz")
    assert isinstance(explicit, FaissStore) and explicit.path == tmp_path / "elsewhere.npz"


async def test_elasticsearch_is_built_for_its_backend_and_opens_nothing_yet() -> None:
    settings = StoreSettings(_env_file=None, backend="elasticsearch", es_url="http://127.0.0.1:9",  # type: ignore[call-arg]
                             es_index="photos")
    store = build_store(settings)
    assert isinstance(store, ElasticsearchStore) and store.alias == "photos"
    await store.close()  # no request was sent: port 9 answers nothing


async def test_an_embedder_url_builds_the_http_client_with_its_timeout_and_retries() -> None:
    settings = EmbeddingSettings(_env_file=None, embedder_url="http://embedder:8001/",  # type: ignore[call-arg]
                                 embedder_timeout_s=3.5, embedder_retries=4, embedder_api_key="k-123")
    client = build_embedding_service(settings)
    try:
        assert isinstance(client, HttpEmbeddingClient)
        assert (client.base_url, client.timeout_s, client.retries) == ("http://embedder:8001", 3.5, 4)
    finally:
        await client.close()


async def test_without_an_embedder_url_the_model_runs_here_with_the_vector_settings(tiny_bundle_dir: Path) -> None:
    settings = EmbeddingSettings(_env_file=None, model_dir=tiny_bundle_dir, pca_dims=8,  # type: ignore[call-arg]
                                 onehot_weight=1.5, compile="off")
    with threadpool_limits(limits=2, user_api="blas"):  # as it was before, on the way out
        service = build_embedding_service(settings)
        assert blas_threads() == {1}  # numpy's BLAS never spins beside the forward pass
    try:
        info = await service.info()
        assert (info.pca_dims, info.onehot_weight, info.dims) == (8, 1.5, 8 + len(info.classes))
        assert info.model_version == f"{info.bundle_version}-d8-w1.5"
    finally:
        await service.close()


def test_a_missing_bundle_is_a_bundle_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=str(tmp_path / "nothing")):
        build_local_embedding_service(ModelSettings(_env_file=None, model_dir=tmp_path / "nothing"))  # type: ignore[call-arg]


def test_one_batch_is_in_flight_beside_the_model_here_and_two_through_an_embedder_url() -> None:
    here = IndexerSettings(_env_file=None)  # type: ignore[call-arg]
    remote = IndexerSettings(_env_file=None, embedder_url="http://embedder:8001")  # type: ignore[call-arg]
    assert build_index_options(here, rebuild=False).concurrency == 1
    assert build_index_options(remote, rebuild=False).concurrency == 2
    pinned = IndexerSettings(_env_file=None, index_concurrency=4)  # type: ignore[call-arg]
    assert build_index_options(pinned, rebuild=False).concurrency == 4


def test_index_options_come_from_the_settings_and_flags_win() -> None:
    settings = IndexingSettings(_env_file=None, index_batch_size=128, index_concurrency=3)  # type: ignore[call-arg]
    configured = build_index_options(settings, rebuild=False)
    assert (configured.batch_size, configured.concurrency, configured.rebuild) == (128, 3, False)
    flagged = build_index_options(settings, rebuild=True, batch_size=16, concurrency=1, layout=Layout.flat, sync=True,
                                  progress_bar=False)
    assert (flagged.batch_size, flagged.concurrency, flagged.rebuild, flagged.layout, flagged.sync,
            flagged.progress_bar) == (16, 1, True, Layout.flat, True, False)
