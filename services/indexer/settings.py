"""Settings of the indexer (`CBIR_*`)."""

from __future__ import annotations

from services.common.settings import (
    CollectionSettings,
    EmbeddingSettings,
    IndexingSettings,
    StoreSettings,
    WatchSettings,
)


class IndexerSettings(StoreSettings, EmbeddingSettings, IndexingSettings, CollectionSettings, WatchSettings):
    """`CBIR_EMBEDDER_URL` set: embed through the embedder service; unset: in-process."""
