"""The document schema shared by the indexer and the gateway (which write it) and search (which reads it)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

# Bumped when documents gain or change fields: an index of another schema is rebuilt, never read half-filled.
# 2: source, predicted_label, confidence, size and mtime; label may be null; ids name their source.
DOCUMENT_SCHEMA = 2
UPLOAD_SOURCE = "upload"  # the `source` of images added through POST /images


def document_id(source: str, relative_path: str) -> str:
    """Deterministic id of a collection image from its source (the collection root) and its path inside
    it, so re-runs overwrite and two collections with the same layout do not collide."""
    return hashlib.blake2b(f"{source}\n{relative_path}".encode(), digest_size=10).hexdigest()


def content_id(data: bytes) -> str:
    """Id of an uploaded image: the hash of its bytes, so the same upload twice is one document."""
    return hashlib.blake2b(data, digest_size=10).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredImage:
    """An indexed image without its vector: where it came from, what it is and what the model said."""

    id: str
    filename: str
    path: str  # relative to its source (the collection root, or the uploads folder), forward slashes
    source: str  # UPLOAD_SOURCE, or the collection root it was indexed from
    label: str | None  # the ground truth, when the collection's layout gives one
    predicted_label: str  # the embedder's class for it
    confidence: float  # the softmax probability of that class
    size: int  # bytes of the file when it was embedded
    mtime: float  # its modification time then, in seconds since the epoch (an upload: when it arrived)
    model_version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageDocument(StoredImage):
    """An indexed image with its vector: what the indexer and the gateway write."""

    vector: np.ndarray

    @classmethod
    def of(cls, image: StoredImage, *, vector: np.ndarray, **changes: object) -> ImageDocument:
        """`image` with a vector (and `changes` to its fields): a stored image re-embedded by another model."""
        fields = {f.name: getattr(image, f.name) for f in dataclasses.fields(StoredImage)}
        return cls(**(fields | changes), vector=vector)

    def stored(self) -> StoredImage:
        """The document without its vector."""
        return StoredImage(**{f.name: getattr(self, f.name) for f in dataclasses.fields(StoredImage)})


@dataclass(frozen=True, slots=True)
class StoreHit:
    """One search result: the document and its score on the service's scale (cosine + 1.0)."""

    image: StoredImage
    score: float

    @property
    def id(self) -> str:
        return self.image.id
