"""Pick the store named by `CBIR_BACKEND`."""

from __future__ import annotations

from services.common.settings import Backend, StoreSettings
from services.common.stores.base import VectorStore


def create_store(settings: StoreSettings) -> VectorStore:
    if settings.backend is Backend.elasticsearch:
        from services.common.stores.elasticsearch_store import ElasticsearchStore

        return ElasticsearchStore.from_settings(settings)
    from services.common.stores.faiss_store import FaissStore

    return FaissStore(settings.faiss_path)
