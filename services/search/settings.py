"""Settings of the search gateway (`CBIR_*`)."""

from __future__ import annotations

from services.common.settings import CollectionSettings, EmbeddingSettings, StoreSettings, UploadSettings


class SearchSettings(StoreSettings, EmbeddingSettings, UploadSettings, CollectionSettings):
    """Everything the gateway reads; `CBIR_EMBEDDER_URL` unset runs the model in-process."""
