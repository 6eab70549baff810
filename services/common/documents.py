"""The document schema shared by the indexer (which writes it) and the search gateway (which reads it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def document_id(relative_path: str) -> str:
    """Deterministic id of an image from its path inside the collection, so re-runs overwrite."""
    return hashlib.blake2b(relative_path.encode("utf-8"), digest_size=10).hexdigest()


@dataclass(frozen=True, slots=True)
class ImageDocument:
    """One indexed image: where it lives, what it is, and its vector."""

    id: str
    filename: str
    path: str  # relative to the collection root, with forward slashes
    label: str
    model_version: str
    vector: np.ndarray


@dataclass(frozen=True, slots=True)
class StoredImage:
    """An indexed image without its vector: what a lookup by id returns."""

    id: str
    filename: str
    path: str
    label: str
    model_version: str


@dataclass(frozen=True, slots=True)
class StoreHit:
    """One search result, scored on the service's scale (cosine + 1.0)."""

    id: str
    filename: str
    path: str
    label: str
    score: float
