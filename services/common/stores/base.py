"""The store interface that the embedded FAISS store and the Elasticsearch store implement."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.documents import DOCUMENT_SCHEMA, ImageDocument, StoredImage, StoreHit
from services.common.errors import StoreError, StoreMismatchError

# The most hits a search may reach (offset + k), on both stores: Elasticsearch's `index.max_result_window`,
# kept by the FAISS store too so that a page that works on one machine works on a cluster.
MAX_RESULT_WINDOW = 10_000


@dataclass(frozen=True, slots=True)
class StoreQuery:
    """One nearest-neighbour query: the hits ranked `offset` to `offset + k` by score, among the
    documents whose label is one of `labels`, whose predicted label is one of `predicted_labels`
    (None: any) and whose id is not in `exclude_ids`.

    >>> StoreQuery(vector, k=10, offset=10, labels=frozenset({"cat"}))  # the second page of cats
    """

    vector: np.ndarray
    k: int
    offset: int = 0
    labels: frozenset[str] | None = None
    predicted_labels: frozenset[str] | None = None
    exclude_ids: frozenset[str] = frozenset()

    @property
    def filter_key(self) -> tuple[frozenset[str] | None, frozenset[str] | None, frozenset[str]]:
        """Queries with the same key can be answered by one search over the same documents."""
        return self.labels, self.predicted_labels, self.exclude_ids


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """What an index holds: vector size, the model version that wrote it, its document schema
    (`DOCUMENT_SCHEMA` when written by this code; None when empty or unknown) and its size."""

    dims: int | None
    model_version: str | None
    count: int
    schema: int | None = DOCUMENT_SCHEMA


@dataclass(frozen=True, slots=True)
class CollectionStats:
    """How many documents an index holds, by source and by label (`unlabelled`: those with a null label)."""

    documents: int
    sources: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    unlabelled: int = 0


class VectorStore(abc.ABC):
    """A collection of `ImageDocument`s searchable by cosine similarity.

    Every implementation scores hits as cosine + 1.0 (see `services.common.scoring`) and treats
    writes as upserts by document id.
    """

    name: str

    @property
    def index_kind(self) -> str:
        """What answers searches (`/healthz` and `/collection` report it): `flat` (exact), `hnsw`, ..."""
        return "exact"

    @abc.abstractmethod
    async def open(self, *, dims: int, model_version: str, create: bool = True) -> None:
        """Create the index if needed (and allowed), then check it matches `dims`/`model_version`."""

    @abc.abstractmethod
    async def info(self) -> StoreInfo: ...

    @abc.abstractmethod
    async def upsert(self, documents: Sequence[ImageDocument]) -> None: ...

    @abc.abstractmethod
    async def add(self, document: ImageDocument) -> bool:
        """Store `document` unless its id is already stored (then nothing changes): True if it was added.
        Two concurrent adds of one id store it once. On return the document is durable and searchable."""

    @abc.abstractmethod
    async def delete(self, ids: Sequence[str]) -> int:
        """Delete documents by id; returns how many existed."""

    @abc.abstractmethod
    async def remove(self, id: str) -> bool:
        """Delete one document: True if it existed. On return the deletion is durable and no search
        finds the document any more."""

    @abc.abstractmethod
    async def count(self) -> int: ...

    @abc.abstractmethod
    async def get(self, id: str) -> StoredImage | None: ...

    @abc.abstractmethod
    async def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of those of `ids` that are stored (a query by indexed images)."""

    @abc.abstractmethod
    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The subset of `ids` already stored (the indexer's resume check)."""

    @abc.abstractmethod
    def iter_documents(self, *, source: str | None = None) -> AsyncIterator[StoredImage]:
        """Every stored document (of `source` only, when given), without vectors, in id order."""

    @abc.abstractmethod
    async def stats(self) -> CollectionStats: ...

    @abc.abstractmethod
    async def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        """The hits of every query, best first, in the queries' order: one round trip for all of
        them, against one consistent state of the index (a search never sees half a write), never
        on the event loop's thread."""

    async def search(self, vector: np.ndarray, k: int) -> list[StoreHit]:
        """The `k` nearest documents to one vector (a one-query `search_many`)."""
        [hits] = await self.search_many([StoreQuery(vector=vector, k=k)])
        return hits

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every write so far durable and searchable."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Drop every document (the index is rebuilt for a new model version)."""

    async def verify(self, model_version: str) -> None:  # noqa: B027 - optional hook
        """Raise `StoreMismatchError` when the index this store searches is no longer the one served for
        `model_version` (an Elasticsearch alias moved to another model's index); one file cannot move."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""


def check_compatible(info: StoreInfo, *, dims: int, model_version: str, where: str) -> None:
    """Raise `StoreMismatchError` when an index holds vectors of another size or model, or documents of another
    schema than `DOCUMENT_SCHEMA` (an empty index of another model or schema is not refused: it is claimed)."""
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
    if info.count and info.schema != DOCUMENT_SCHEMA:
        raise StoreMismatchError(
            f"{where} holds documents of schema {info.schema}, not {DOCUMENT_SCHEMA}; re-index (cbir index --rebuild)"
        )


def check_model_version(documents: Iterable[ImageDocument], model_version: str | None) -> None:
    """Refuse documents whose vectors come from another model than the index's (one vector space an index)."""
    for document in documents:
        if document.model_version != model_version:
            raise StoreMismatchError(f"document {document.id} is from model {document.model_version!r}, "
                                     f"the index holds {model_version!r}")


def check_query_vector(vector: np.ndarray, *, dims: int | None, where: str) -> None:
    """Refuse a query vector that cannot be searched: of another size, all zeros, or not finite (the
    embedder's vectors are unit length, so such a vector is a fault upstream, not a query)."""
    values = np.asarray(vector, dtype=np.float32).ravel()
    if dims is not None and values.size != dims:
        raise StoreMismatchError(f"the query vector has {values.size} dims; {where} holds {dims}")
    problem = "not finite" if not np.all(np.isfinite(values)) else "all zeros" if not np.any(values) else None
    if problem:
        raise StoreError(f"the query vector is {problem}; nothing can be ranked against it in {where}")
