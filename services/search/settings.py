"""Settings of the search gateway (`CBIR_*`)."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from services.common.settings import (
    CollectionSettings,
    EmbeddingSettings,
    StoreSettings,
    UploadSettings,
    refuse_placeholder_keys,
)
from services.search.duplicates import DEFAULT_THRESHOLD

MAX_BATCH_FILES = 32  # images of one POST /search/batch


class SearchSettings(StoreSettings, EmbeddingSettings, UploadSettings, CollectionSettings):
    """Everything the gateway reads; `CBIR_EMBEDDER_URL` unset runs the model in-process."""

    write_api_keys: list[SecretStr] = Field(
        default_factory=list, description="X-API-Key values that may add and delete images (JSON list); with "
        "none, writes are accepted only in development on a loopback address, and refused otherwise")
    max_upload_storage_bytes: int = Field(
        1024**3, ge=0, description="most bytes the uploads folder (<state dir>/uploads) may hold (507 past it)")
    max_concurrent_searches: int = Field(
        64, ge=1, le=4096, description="searches by upload (POST /search, /search/batch) that run at once: by "
        "default one full micro-batch (CBIR_MAX_BATCH); more wait for a slot, in arrival order "
        "(docs/performance.md#under-load)")
    max_search_wait_ms: float = Field(
        100.0, ge=0, le=60_000, description="how long a search waits for a slot before it is refused with 503 and "
        "Retry-After (0: refused at once when none is free)")
    max_batch_upload_bytes: int = Field(
        64 * 1024**2, ge=1024, description="largest request body of POST /search/batch (413); each file of it is "
        "held to CBIR_MAX_UPLOAD_BYTES too")
    duplicate_threshold: float = Field(
        DEFAULT_THRESHOLD, gt=0, le=1, description="the signature correlation from which two images are near "
        "duplicates (GET /duplicates' default, and the check of POST /images); calibrated in reports/duplicates.md")
    duplicates_wait_s: float = Field(
        2.0, ge=0, description="how long GET /duplicates waits for its result before answering 202 with the progress")

    @model_validator(mode="after")
    def _no_placeholder_write_keys(self) -> SearchSettings:
        refuse_placeholder_keys(self, "write_api_keys")
        return self
