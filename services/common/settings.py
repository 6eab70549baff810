"""Settings shared by the services, read from `CBIR_*` environment variables (pydantic-settings).

Each service has one `Settings` class built from these pieces; `cbir` commands and the apps
read them once at start-up with `load()`, so a bad value fails fast with the variable's name.
Every default lives here, once.
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import AnyHttpUrl, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.errors import ConfigError
from services.common.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_CONCURRENT_DECODES, DEFAULT_MAX_PIXELS


class Backend(StrEnum):
    faiss = "faiss"
    elasticsearch = "elasticsearch"


class EsSearchMode(StrEnum):
    exact = "exact"
    knn = "knn"


# Which index the embedded FAISS store may search (`CBIR_FAISS_INDEX`); what it searches now is its `index_kind`.
FaissIndexSetting = Literal["auto", "flat", "hnsw"]


class BaseCbirSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CBIR_", env_file=".env", extra="ignore")

    environment: str = Field("development", description="development or production")

    @classmethod
    def load(cls) -> Self:
        """The settings from the environment and `.env`; `ConfigError` naming each bad variable.

        >>> SearchSettings.load().backend
        <Backend.faiss: 'faiss'>
        """
        try:
            return cls()
        except ValidationError as exc:
            problems = "; ".join(_describe(cls, error) for error in exc.errors())
            raise ConfigError(f"invalid settings: {problems}") from exc


class StoreSettings(BaseCbirSettings):
    """Where vectors live: the embedded FAISS file, or an Elasticsearch cluster."""

    backend: Backend = Field(Backend.faiss, description="faiss (embedded, default) or elasticsearch")
    state_dir: Path = Field(Path("state"), description="index file and other state of one-machine mode")
    faiss_threads: int | None = Field(None, ge=1, le=256, description="OpenMP threads of the embedded FAISS index; "
                                      "unset: a quarter of the available cores, at least one (docs/performance.md)")
    faiss_index: FaissIndexSetting = Field(
        "auto", description="the embedded index: flat (exact), hnsw (approximate, for millions of images), or auto: "
        "exact below the size bench/scale.py measured (reports/scale.md), HNSW above it")
    faiss_log_fold_records: int = Field(10_000, ge=1, le=10_000_000, description="writes the embedded index's write "
                                        "log holds before it is folded into the index file (in the background)")
    faiss_log_fold_bytes: int = Field(64 * 2**20, ge=4096, description="bytes the embedded index's write log holds "
                                      "before it is folded into the index file")
    es_url: AnyHttpUrl = Field("http://localhost:9200", description="Elasticsearch URL")
    es_api_key: SecretStr | None = Field(None, description="Elasticsearch API key (instead of basic auth)")
    es_username: str | None = Field(None, description="Elasticsearch basic-auth user")
    es_password: SecretStr | None = Field(None, description="Elasticsearch basic-auth password")
    es_index: str = Field("cbir-images", description="Elasticsearch index name")
    es_shards: int = Field(30, ge=1, le=1024, description="number_of_shards of a new index")
    es_replicas: int = Field(0, ge=0, le=16, description="number_of_replicas of a new index")
    es_index_options: Literal["hnsw", "int8_hnsw", "bbq_hnsw", "flat", "int8_flat", "bbq_flat"] = Field(
        "hnsw", description="index_options.type of the vectors of a new index: hnsw (float HNSW), int8_hnsw, "
        "bbq_hnsw (quantised HNSW, rescored), flat, int8_flat, bbq_flat (no graph: every vector compared); bbq "
        "needs at least 64 dims")
    es_search_mode: EsSearchMode = Field(EsSearchMode.exact, description="exact (script_score) or knn")
    es_num_candidates: int = Field(200, ge=1, le=10000, description="kNN candidates per shard")
    es_timeout_s: float = Field(60.0, gt=0, description="request timeout to Elasticsearch, seconds")
    es_max_retries: int = Field(3, ge=0, le=10, description="retries on timeouts and 429/5xx")

    @property
    def faiss_path(self) -> Path:
        return self.state_dir / "index.npz"

    @property
    def uploads_dir(self) -> Path:
        """Where the gateway keeps added images (`cbir promote` re-embeds them from there)."""
        return self.state_dir / "uploads"


class ModelSettings(BaseCbirSettings):
    """Which bundle embeds images, where, and how its vectors are built."""

    model_dir: Path | None = Field(None, description="model bundle directory (default: the shipped one)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto (CUDA when present), cpu or cuda")
    pca_dims: int | None = Field(None, ge=1, description="PCA dims of the vector (default: the bundle's)")
    onehot_weight: float | None = Field(None, ge=0, description="one-hot weight (default: the bundle's)")
    compile: Literal["auto", "on", "cached", "off"] = Field(
        "auto", description="compile the model ahead of time in the background at start-up (it serves uncompiled "
        "meanwhile); auto: when a C++ compiler (CPU) or CUDA is present; cached: load the packages already in the "
        "compile cache, build none")
    compile_cache_dir: Path | None = Field(
        None, description="where compiled code is kept across restarts, a folder per bundle, torch and device "
        "(default: <CBIR_STATE_DIR>/compile-cache where there is a state dir, else torch's folder in /tmp)")
    torch_threads: int | None = Field(None, ge=1, le=256, description="intra-op threads of the forward pass "
                                      "(torch.set_num_threads); unset: every available core (docs/performance.md)")
    max_batch: int = Field(64, ge=1, le=1024, description="largest micro-batch of the forward pass")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a micro-batch waits to fill")
    max_queue: int = Field(256, ge=1, description="requests waiting for the model before 503 (with Retry-After)")


class UploadSettings(BaseCbirSettings):
    max_upload_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1024, description="largest request body (413)")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest image in pixels (413)")
    max_concurrent_decodes: int = Field(
        DEFAULT_MAX_CONCURRENT_DECODES, ge=1, description="uploads decoded at once; bounds decode memory"
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="accepted X-API-Key values (JSON list); empty = no auth"
    )
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins (JSON list)")

    @model_validator(mode="after")
    def _no_placeholder_keys(self) -> UploadSettings:
        refuse_placeholder_keys(self, "api_keys")
        return self


class EmbedderClientSettings(BaseCbirSettings):
    embedder_url: AnyHttpUrl | None = Field(
        None, description="embedder service URL; unset = run the model in-process"
    )
    embedder_timeout_s: float = Field(10.0, gt=0, description="timeout of one call to the embedder")
    embedder_retries: int = Field(2, ge=0, le=10, description="retries of a failed embedder call")
    embedder_api_key: SecretStr | None = Field(None, description="X-API-Key sent to an embedder that requires one")


class EmbeddingSettings(ModelSettings, EmbedderClientSettings):
    """How a service reaches the model: the embedder service at `CBIR_EMBEDDER_URL`, else in-process."""


class IndexingSettings(BaseCbirSettings):
    index_batch_size: int = Field(256, ge=1, le=4096, description="images per embed call")
    index_concurrency: int | None = Field(
        None, ge=1, le=64, description="batches in flight (one reads while another embeds); default 1 with the model "
        "in this process, whose forward pass needs every core (nothing decodes beside it), 2 through CBIR_EMBEDDER_URL")


class WatchSettings(BaseCbirSettings):
    """Watched folders (`services.indexer.watch`): kept indexed as files come, change and go."""

    watch: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="folders cbir serve keeps indexed as their files come, change and go: a "
        "JSON list, or paths separated by ':'; `cbir serve --watch DIR` adds to them")
    watch_settle_ms: int = Field(300, ge=10, le=60_000, description="quiet time after the last change in a "
                                 "watched folder before its batch is indexed")
    watch_max_batch_ms: int = Field(2000, ge=50, le=600_000, description="longest a batch of changes is "
                                    "collected while the folder keeps changing")
    watch_retries: int = Field(5, ge=0, le=100, description="times a file that does not decode (still being "
                               "written) is tried again, once its size and mtime stay the same, before it is "
                               "reported bad")
    watch_retry_ms: int = Field(1000, ge=10, le=600_000, description="time between two tries of such a file")

    @field_validator("watch", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        """`CBIR_WATCH=/a:/b` as well as `CBIR_WATCH='["/a", "/b"]'`."""
        if isinstance(value, str):
            return json.loads(value) if value.lstrip().startswith("[") else [p for p in value.split(os.pathsep) if p]
        return value


class CollectionSettings(BaseCbirSettings):
    data_dir: Path | None = Field(
        None, description="collection root (<split>/<class>/<image>); default data/cifar10, else ../shared/cifar10"
    )
    index_split: str = Field("train", description="the split that is indexed")


PLACEHOLDER_KEYS = frozenset({"changeme", "secret", ""})


def refuse_placeholder_keys(settings: BaseCbirSettings, name: str) -> None:
    """Refuse a placeholder among the keys of setting `name` outside development (a model validator's check)."""
    keys: list[SecretStr] = getattr(settings, name)
    if settings.environment != "development" and any(k.get_secret_value() in PLACEHOLDER_KEYS for k in keys):
        raise ValueError(f"CBIR_{name.upper()} holds a placeholder key; set real keys outside development")


def default(settings_class: type[BaseSettings], name: str) -> Any:
    """The default of one setting, for a constructor that should share it rather than repeat it.

    >>> def __init__(self, *, max_batch: int = default(ModelSettings, "max_batch")): ...
    """
    return settings_class.model_fields[name].get_default(call_default_factory=True)


def _describe(cls: type[BaseSettings], error: dict) -> str:
    """One validation error as `CBIR_NAME: what is wrong (got 'value')`; secrets are never echoed."""
    if not error.get("loc"):  # a model validator: its message names the variable itself
        return str(error["msg"]).removeprefix("Value error, ")
    name = str(error["loc"][0])
    field = cls.model_fields.get(name)
    secret = field is not None and "SecretStr" in str(field.annotation)
    got = "" if secret or "input" not in error else f" (got {error['input']!r})"
    return f"CBIR_{name.upper()}: {error['msg']}{got}"
