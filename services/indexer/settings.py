"""Settings of the indexer (`CBIR_*`)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import CollectionSettings, EmbedderClientSettings, ModelSettings, StoreSettings


class IndexerSettings(StoreSettings, ModelSettings, EmbedderClientSettings, CollectionSettings):
    """`CBIR_EMBEDDER_URL` set: embed through the embedder service; unset: in-process."""

    index_batch_size: int = Field(256, ge=1, le=4096, description="images per embed call")
    index_concurrency: int = Field(2, ge=1, le=64, description="embed calls in flight")
