"""Settings of the search gateway (`CBIR_*`)."""

from __future__ import annotations

from services.common.settings import (
    CollectionSettings,
    EmbedderClientSettings,
    ModelSettings,
    StoreSettings,
    UploadSettings,
)


class SearchSettings(StoreSettings, ModelSettings, UploadSettings, EmbedderClientSettings, CollectionSettings):
    """Everything the gateway reads; `CBIR_EMBEDDER_URL` unset runs the model in-process."""
