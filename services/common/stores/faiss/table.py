"""The FAISS store's documents in memory, as columns (`DocumentTable`), and the frozen copies of it that searches
read: the filters of a query as rows (`FrozenTable`), and an exact inner-product search over them (`ExactSnapshot`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import faiss
import numpy as np

from services.common.documents import ImageDocument, StoredImage, StoreHit
from services.common.scoring import score_from_cosine
from services.common.stores.base import CollectionStats, StoreQuery


class DocumentTable:
    """The documents of one index: `docs[row]` and `vectors[row]` of the document whose id `rows` maps to `row`.

    Writes replace `vectors` instead of changing it in place, so a snapshot holding the array never sees a write.

    >>> table = DocumentTable(dims=16)
    >>> table.upsert(documents, np.stack([doc.vector for doc in documents]))
    >>> table.delete(["doc-0001", "missing"])
    ['doc-0001']
    """

    def __init__(self, docs: list[StoredImage] | None = None, vectors: np.ndarray | None = None, *,
                 dims: int = 0) -> None:  # fmt: skip
        self.docs: list[StoredImage] = docs if docs is not None else []
        self.vectors = vectors if vectors is not None else np.zeros((0, dims), dtype=np.float32)
        self.rows: dict[str, int] = {doc.id: row for row, doc in enumerate(self.docs)}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dims(self) -> int:
        """The width of `vectors` (0 before an empty table knows it)."""
        return int(self.vectors.shape[1])

    def fit(self, dims: int) -> None:
        """Make an empty table's vectors `dims` wide (a non-empty one already is: the store checked it)."""
        if self.dims != dims:
            self.vectors = np.zeros((0, dims), dtype=np.float32)

    def get(self, id: str) -> StoredImage | None:
        row = self.rows.get(id)
        return None if row is None else self.docs[row]

    def vectors_of(self, ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Copies of the vectors of those of `ids` that are stored."""
        return {i: self.vectors[self.rows[i]].copy() for i in ids if i in self.rows}

    def existing(self, ids: Iterable[str]) -> set[str]:
        return {i for i in ids if i in self.rows}

    def ids(self) -> tuple[str, ...]:
        """The id of every row, in row order."""
        return tuple(doc.id for doc in self.docs)

    def upsert(self, documents: Sequence[ImageDocument], vectors: np.ndarray) -> None:
        """Write `documents` with `vectors` (one row each): a known id is overwritten in its row, a new one appended."""
        new_rows = []
        copied = False
        for doc, vector in zip(documents, vectors, strict=True):
            row = self.rows.get(doc.id)
            if row is None:
                self.rows[doc.id] = len(self.docs)
                self.docs.append(doc.stored())
                new_rows.append(vector)
            else:
                if not copied:  # a snapshot may hold the array: never change it in place
                    self.vectors, copied = self.vectors.copy(), True
                self.docs[row] = doc.stored()
                self.vectors[row] = vector
        if new_rows:
            self.vectors = np.concatenate([self.vectors, np.stack(new_rows)])

    def delete(self, ids: Iterable[str]) -> list[str]:
        """Delete the documents of `ids`; returns the ids of those that were stored, in row order."""
        doomed = sorted({self.rows[i] for i in ids if i in self.rows})
        if not doomed:
            return []
        keep = np.setdiff1d(np.arange(len(self.docs)), doomed)
        gone = [self.docs[i].id for i in doomed]
        self.vectors = self.vectors[keep]
        self.docs = [self.docs[i] for i in keep]
        self.rows = {doc.id: row for row, doc in enumerate(self.docs)}
        return gone

    def listed(self, source: str | None = None) -> list[StoredImage]:
        """The documents (of `source` only, when given) in id order: a copy, which later writes do not disturb."""
        return [doc for doc in sorted(self.docs, key=lambda doc: doc.id) if source is None or doc.source == source]

    def stats(self) -> CollectionStats:
        labels = Counter(doc.label for doc in self.docs)
        unlabelled = labels.pop(None, 0)
        return CollectionStats(documents=len(self.docs), sources=dict(Counter(doc.source for doc in self.docs)),
                               labels=dict(sorted(labels.items())), unlabelled=unlabelled)

    def exact_snapshot(self, *, dims: int | None) -> ExactSnapshot:
        """The table as it is now, searched exactly (`dims`: the index's, while the table is still 0 wide)."""
        index = faiss.IndexFlatIP(self.dims or dims or 1)
        if len(self.rows):
            index.add(np.ascontiguousarray(self.vectors))  # FAISS keeps its own copy
        return ExactSnapshot(index=index, rows=dict(self.rows), docs=tuple(self.docs))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrozenTable:
    """The documents as of one moment, and which rows hold a label or a prediction (computed on demand)."""

    rows: dict[str, int]
    docs: tuple[StoredImage, ...]
    _row_cache: dict[tuple[str, str], np.ndarray] = dataclasses.field(default_factory=dict)

    def excluded_rows(self, exclude_ids: frozenset[str]) -> np.ndarray:
        """The rows of those of `exclude_ids` that are stored, in order."""
        return np.asarray(sorted(self.rows[i] for i in exclude_ids if i in self.rows), dtype=np.int64)

    def passing_rows(self, labels: frozenset[str] | None, predicted_labels: frozenset[str] | None,
                     exclude_ids: frozenset[str]) -> np.ndarray | None:
        """The rows a label / predicted-label filter lets through, minus the excluded ids; None without a filter."""
        if labels is None and predicted_labels is None:
            return None
        allowed = np.arange(len(self.docs), dtype=np.int64)
        for field_name, values in (("label", labels), ("predicted_label", predicted_labels)):
            if values is not None:
                allowed = np.intersect1d(allowed, np.concatenate(
                    [self.rows_where(field_name, value) for value in sorted(values)] or [np.zeros(0, np.int64)]))
        return np.setdiff1d(allowed, self.excluded_rows(exclude_ids))

    def rows_where(self, field_name: str, value: str) -> np.ndarray:
        """The rows whose `field_name` (`label` or `predicted_label`) is `value`, in order."""
        key = (field_name, value)
        if key not in self._row_cache:  # computed twice at worst by two threads: same answer
            self._row_cache[key] = np.asarray(
                [row for row, doc in enumerate(self.docs) if getattr(doc, field_name) == value], dtype=np.int64)
        return self._row_cache[key]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExactSnapshot(FrozenTable):
    """The exact index of the documents as of one moment, searched from worker threads."""

    index: faiss.Index

    def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        """One FAISS search per distinct filter, each over all the queries that share it."""
        results: list[list[StoreHit]] = [[] for _ in queries]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for position, query in enumerate(queries):
            groups[query.filter_key].append(position)
        for filter_key, members in groups.items():
            selector, allowed = self.selector(*filter_key)
            depth = min(max(queries[i].offset + queries[i].k for i in members), allowed)
            if depth <= 0:
                continue
            matrix = np.stack([np.asarray(queries[i].vector, dtype=np.float32).ravel() for i in members])
            params = faiss.SearchParameters(sel=selector[0]) if selector else None
            cosines, rows = self.index.search(matrix, depth, params=params)
            for line, position in enumerate(members):
                page = slice(queries[position].offset, queries[position].offset + queries[position].k)
                results[position] = [StoreHit(self.docs[int(row)], score_from_cosine(float(cosine)))
                                     for cosine, row in zip(cosines[line][page], rows[line][page], strict=True)
                                     if row >= 0]
        return results

    def selector(self, labels: frozenset[str] | None, predicted_labels: frozenset[str] | None,
                 exclude_ids: frozenset[str]) -> tuple[tuple | None, int]:
        """A FAISS id selector for the filter (kept with what it points to) and how many rows pass it."""
        allowed = self.passing_rows(labels, predicted_labels, exclude_ids)
        if allowed is not None:
            return (faiss.IDSelectorBatch(allowed),), len(allowed)
        excluded = self.excluded_rows(exclude_ids)
        if not len(excluded):
            return None, len(self.docs)
        inner = faiss.IDSelectorBatch(excluded)
        return (faiss.IDSelectorNot(inner), inner), len(self.docs) - len(excluded)
