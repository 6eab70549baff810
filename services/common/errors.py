"""Domain errors, mapped to one JSON error envelope at the HTTP edge.

    CbirError
    ├── ImageError                 (4xx: the caller sent something we cannot use)
    │   ├── EmptyImageError        400
    │   ├── ImageDecodeError       415
    │   └── ImageTooLargeError     413
    ├── BundleError                (start-up: the model bundle is missing, corrupt or mismatched)
    ├── ModelNotLoadedError        503
    ├── EmbedderUnavailableError   503, with Retry-After
    ├── IndexNotReadyError         503 (store missing, empty or still being built)
    └── StoreError                 (a store refused an operation)
        ├── StoreMismatchError     409 (index built for other dims or another model version)
        └── StoreUnavailableError  503
"""

from __future__ import annotations


class CbirError(Exception):
    """Base of every error this project raises on purpose."""

    status_code: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ImageError(CbirError):
    status_code = 400


class EmptyImageError(ImageError):
    status_code = 400


class ImageDecodeError(ImageError):
    status_code = 415


class ImageTooLargeError(ImageError):
    status_code = 413


class BundleError(CbirError):
    """The model bundle cannot be used; the message says why and how to get one."""


class ModelNotLoadedError(CbirError):
    status_code = 503


class EmbedderUnavailableError(CbirError):
    status_code = 503

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IndexNotReadyError(CbirError):
    status_code = 503


class StoreError(CbirError):
    status_code = 500


class StoreMismatchError(StoreError):
    status_code = 409


class StoreUnavailableError(StoreError):
    status_code = 503
