"""Every error cbir raises on purpose, mapped to one JSON error envelope at the HTTP edge.

    CbirError
    ├── ConfigError                a setting is invalid; the message names the variable
    ├── CollectionError            the collection root or split is missing or holds no images
    ├── ImageError                 (4xx: the caller sent something we cannot use)
    │   ├── EmptyImageError        400
    │   ├── ImageDecodeError       415
    │   ├── ImageTooLargeError     413
    │   └── ImageRegionError       422 (a search box outside the image, or empty)
    ├── BundleError                (start-up: the model bundle is missing, corrupt or mismatched)
    ├── TrainingError              `cbir train` cannot run as asked; the message names the option
    ├── ModelNotLoadedError        503
    ├── EmbedderUnavailableError   503, with Retry-After
    ├── OverloadedError            503, with Retry-After (more searches than the gateway admits at once)
    ├── IndexNotReadyError         503 (index missing, empty or still being built)
    ├── SearchApiError             `cbir evaluate --url`: the search API is not ready or failed a query
    ├── DocumentNotFoundError      404 (no indexed image with that id)
    ├── InvalidQueryError          422 (a query that cannot be searched: a zero example query, a bad page)
    ├── StorageFullError           507 (the uploads folder is at CBIR_MAX_UPLOAD_STORAGE_BYTES)
    └── StoreError                 (a store refused an operation)
        ├── StoreMismatchError     409 (index built for other dims or another model version)
        ├── StoreLayoutError       409 (an index where the alias belongs, an alias moved meanwhile: not changed)
        ├── StoreUnavailableError  503 (unreachable, overloaded or timed out: try again later)
        ├── StoreAuthError         500 (the store refused our credentials: fix the settings)
        └── BulkWriteError         some documents of a write were refused; `failures` says which
"""

from __future__ import annotations


class CbirError(Exception):
    """Base of every error this project raises on purpose; `message` is meant for the user."""

    status_code: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(CbirError):
    """A setting is invalid (a bad `CBIR_*` value, an unknown device); the message names it."""


class CollectionError(CbirError):
    """The collection root or split does not exist or holds no images."""


class ImageError(CbirError):
    status_code = 400


class EmptyImageError(ImageError):
    status_code = 400


class ImageDecodeError(ImageError):
    status_code = 415


class ImageTooLargeError(ImageError):
    status_code = 413


class ImageRegionError(ImageError):
    """422: the region asked for (`/search?box=`) is empty or not inside the image; the message gives its size."""

    status_code = 422


class BundleError(CbirError):
    """The model bundle cannot be used; the message says why and how to get one."""


class TrainingError(CbirError):
    """`cbir train` cannot run with these options or inputs; the message names the bad one."""


class ModelNotLoadedError(CbirError):
    status_code = 503


class EmbedderUnavailableError(CbirError):
    status_code = 503

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OverloadedError(CbirError):
    """503: the request could not start within the stated wait (`CBIR_MAX_SEARCH_WAIT_MS`, the query batcher's
    bound); `retry_after` seconds is a fair time to try again."""

    status_code = 503

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IndexNotReadyError(CbirError):
    """503: search cannot answer yet. `status` says why in the API's vocabulary (`empty` when the index is
    missing or has no documents, `indexing` while a run fills it, with its `progress`, `failed` when that
    run failed); both go into the JSON body beside `detail`."""

    status_code = 503

    def __init__(self, message: str, *, status: str = "empty", progress: dict[str, int | None] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.progress = progress or {}


class SearchApiError(CbirError):
    """The search API is not ready, or did not answer a query after retries; names the image and the reason."""


class DocumentNotFoundError(CbirError):
    """404: no indexed image has this id (never was, or was deleted)."""

    status_code = 404


class InvalidQueryError(CbirError):
    """422: the request is well formed, but it asks for a query that cannot be searched."""

    status_code = 422


class StorageFullError(CbirError):
    """507: storing the upload would take the uploads folder past its quota; nothing was stored."""

    status_code = 507


class StoreError(CbirError):
    status_code = 500


class StoreMismatchError(StoreError):
    status_code = 409


class StoreLayoutError(StoreError):
    """409: the indices and alias on the cluster are not laid out as the operation needs (a concrete index named
    like the alias, from before versioned indices; an alias another `cbir promote` moved meanwhile), and cbir will
    not change them by itself; the message names the commands that do. Not a `StoreMismatchError`: nothing may
    catch it and reset the index."""

    status_code = 409


class StoreUnavailableError(StoreError):
    status_code = 503


class StoreAuthError(StoreError):
    """The store refused the credentials (HTTP 401/403): a configuration problem, not a passing one."""

    status_code = 500


class BulkWriteError(StoreError):
    """The store refused some documents of a write; the others were written.

    `failures` maps every refused document id to the store's reason.
    """

    def __init__(self, message: str, *, failures: dict[str, str]) -> None:
        super().__init__(message)
        self.failures = failures
