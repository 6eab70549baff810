"""Settings of the embedder service (`CBIR_*`)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import ModelSettings, UploadSettings


class EmbedderSettings(ModelSettings, UploadSettings):
    max_images_per_request: int = Field(512, ge=1, description="images per POST /embed")
