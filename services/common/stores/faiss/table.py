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


@dataclasses.dataclass(frozen=True)
class Columns:
    """The documents and their vectors as of one moment (what a save writes): neither changes afterwards."""

    docs: list[StoredImage]
    vectors: np.ndarray


class DocumentTable:
    """The documents of one index: `docs[row]` and `vectors[row]` of the document whose id `rows` maps to `row`.

    A write costs the rows it touches, not the table: vectors live in a buffer with room to grow, a new document
    takes the next row and a deleted one's row is filled by the last row. An array handed out by `vectors` (to a
    snapshot, a graph build or a save) never changes afterwards: a write to one of its rows copies the buffer first.

    >>> table = DocumentTable(dims=16)
    >>> table.upsert(documents, np.stack([doc.vector for doc in documents]))
    >>> table.delete(["doc-0001", "missing"])
    ['doc-0001']
    """

    def __init__(self, docs: list[StoredImage] | None = None, vectors: np.ndarray | None = None, *,
                 dims: int = 0) -> None:  # fmt: skip
        self.docs: list[StoredImage] = docs if docs is not None else []
        self._buffer = vectors if vectors is not None else np.zeros((0, dims), dtype=np.float32)
        self._shared_rows = 0  # rows of the buffer some holder of `vectors` may still read (`vectors` is taken over)
        self.rows: dict[str, int] = {doc.id: row for row, doc in enumerate(self.docs)}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def vectors(self) -> np.ndarray:
        """The vectors, `vectors[row]` for each row: an array later writes never change (keep it as long as needed)."""
        self._shared_rows = max(self._shared_rows, len(self.docs))
        return self._buffer[:len(self.docs)]

    @property
    def dims(self) -> int:
        """The width of `vectors` (0 before an empty table knows it)."""
        return int(self._buffer.shape[1])

    def fit(self, dims: int) -> None:
        """Make an empty table's vectors `dims` wide (a non-empty one already is: the store checked it)."""
        if self.dims != dims:
            self._buffer, self._shared_rows = np.zeros((0, dims), dtype=np.float32), 0

    def columns(self) -> Columns:
        """The documents and vectors as they are now, for a save that runs while writes go on."""
        return Columns(docs=list(self.docs), vectors=self.vectors)

    def get(self, id: str) -> StoredImage | None:
        row = self.rows.get(id)
        return None if row is None else self.docs[row]

    def vectors_of(self, ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Copies of the vectors of those of `ids` that are stored."""
        return {i: self._buffer[self.rows[i]].copy() for i in ids if i in self.rows}

    def existing(self, ids: Iterable[str]) -> set[str]:
        return {i for i in ids if i in self.rows}

    def ids(self) -> tuple[str, ...]:
        """The id of every row, in row order."""
        return tuple(doc.id for doc in self.docs)

    def upsert(self, documents: Sequence[ImageDocument], vectors: np.ndarray) -> None:
        """Write `documents` with `vectors` (one row each): a known id is overwritten in its row, a new one appended."""
        for doc, vector in zip(documents, vectors, strict=True):
            row = self.rows.get(doc.id)
            if row is None:
                row = self.rows[doc.id] = len(self.docs)
                self.docs.append(doc.stored())
            else:
                self.docs[row] = doc.stored()
            self._write_row(row, vector)

    def delete(self, ids: Iterable[str]) -> list[str]:
        """Delete the documents of `ids`; returns the ids of those that were stored, in row order. The last rows
        move into the rows freed."""
        doomed = sorted({self.rows[i] for i in ids if i in self.rows})
        gone = [self.docs[row].id for row in doomed]
        for row in reversed(doomed):  # from the end: the last row is never one still to delete
            last = len(self.docs) - 1
            del self.rows[self.docs[row].id]
            if row != last:
                moved = self.docs[row] = self.docs[last]
                self.rows[moved.id] = row
                self._write_row(row, self._buffer[last])
            self.docs.pop()
        return gone

    def _write_row(self, row: int, vector: np.ndarray) -> None:
        """Set `vectors[row]` (`row` at most the count): in place, unless a holder of `vectors` may read that row."""
        if row >= len(self._buffer):  # full: grow by a quarter, amortising the copy over the rows to come
            grown = np.empty((max(16, row + row // 4), self.dims or len(vector)), dtype=np.float32)
            grown[:row] = self._buffer[:row]
            self._buffer, self._shared_rows = grown, 0
        elif row < self._shared_rows:
            self._buffer, self._shared_rows = self._buffer.copy(), 0
        self._buffer[row] = vector

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
            index.add(np.ascontiguousarray(self._buffer[:len(self.docs)]))  # FAISS keeps its own copy
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
