"""The store interface that the embedded FAISS store and the Elasticsearch store implement."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.common.documents import ImageDocument, StoredImage, StoreHit
from services.common.errors import StoreMismatchError


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """What an index holds: vector size, the model version that wrote it, and its size."""

    dims: int | None
    model_version: str | None
    count: int


class VectorStore(abc.ABC):
    """A collection of `ImageDocument`s searchable by cosine similarity.

    Every implementation scores hits as cosine + 1.0 (see `services.common.scoring`) and treats
    writes as upserts by document id.
    """

    name: str

    @abc.abstractmethod
    async def open(self, *, dims: int, model_version: str, create: bool = True) -> None:
        """Create the index if needed (and allowed), then check it matches `dims`/`model_version`."""

    @abc.abstractmethod
    async def info(self) -> StoreInfo: ...

    @abc.abstractmethod
    async def upsert(self, documents: Sequence[ImageDocument]) -> None: ...

    @abc.abstractmethod
    async def delete(self, ids: Sequence[str]) -> int:
        """Delete documents by id; returns how many existed."""

    @abc.abstractmethod
    async def count(self) -> int: ...

    @abc.abstractmethod
    async def get(self, id: str) -> StoredImage | None: ...

    @abc.abstractmethod
    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The subset of `ids` already stored (the indexer's resume check)."""

    @abc.abstractmethod
    async def search(self, vector: np.ndarray, k: int) -> list[StoreHit]: ...

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every write so far durable and searchable."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Drop every document (the index is rebuilt for a new model version)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""


def check_compatible(info: StoreInfo, *, dims: int, model_version: str, where: str) -> None:
    """Raise `StoreMismatchError` when an index holds vectors of another size or model."""
    if info.dims is not None and info.dims != dims:
        raise StoreMismatchError(
            f"{where} holds {info.dims}-dimensional vectors but the model produces {dims}; "
            "re-index with the current model (cbir index --rebuild)"
        )
    if info.count and info.model_version not in (None, model_version):
        raise StoreMismatchError(
            f"{where} was built by model version {info.model_version!r} but the model is "
            f"{model_version!r}; re-index with the current model (cbir index --rebuild)"
        )
