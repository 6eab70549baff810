"""The embedded store: exact inner-product search with FAISS, persisted to one file on disk.

The vectors are L2-normalised, so inner product is cosine. Everything lives in memory; `flush`
writes a single `.npz` file through a temporary file and an atomic rename, so a crash during
a save leaves the previous index intact. The first write takes an exclusive lock on a `.lock`
file beside the index, held until `close` (or the process ends), so two writers (say, `cbir index`
while `cbir serve` is indexing the same state directory) cannot overwrite each other's work;
readers take no lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import tempfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import faiss
import numpy as np

from services.common.documents import DOCUMENT_SCHEMA, ImageDocument, StoredImage, StoreHit
from services.common.errors import IndexNotReadyError, StoreError, StoreMismatchError, StoreUnavailableError
from services.common.scoring import score_from_cosine
from services.common.stores.base import (
    CollectionStats,
    StoreInfo,
    StoreQuery,
    VectorStore,
    check_compatible,
    check_query_vector,
)

logger = logging.getLogger(__name__)

# The persisted columns, one array each; a null label is "" in `labels` and False in `labelled`.
_TEXT_COLUMNS = ("id", "filename", "path", "source", "predicted_label")


class FaissStore(VectorStore):
    """FAISS `IndexFlatIP` over an in-memory table, saved atomically to `path`.

    >>> store = FaissStore(Path("state/index.npz"))
    >>> await store.open(dims=74, model_version="abc")
    >>> await store.upsert(documents); await store.flush()
    >>> hits = await store.search(query_vector, k=10)

    The search is exact, so a filtered query (labels, predicted labels, excluded ids) ranks every
    document that passes the filter: filters never cost recall.
    """

    name = "faiss"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = asyncio.Lock()
        self._dims: int | None = None
        self._model_version: str | None = None
        self._schema = DOCUMENT_SCHEMA  # of the documents loaded; an older file's is older
        self._legacy_count = 0  # documents of an older schema in the file: counted, not loaded
        self._docs: list[StoredImage] = []
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._rows: dict[str, int] = {}
        self._snapshot: _Snapshot | None = None  # what searches read; None after a write until the next search
        self._dirty = False
        self._loaded = False
        self._writer_lock: int | None = None  # file descriptor holding the flock, once this store writes

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    async def open(self, *, dims: int, model_version: str, create: bool = True) -> None:
        # Once loaded (or reset), memory is the truth: opening again must not bring back the file.
        if not self._loaded:
            if self.path.exists():
                await asyncio.to_thread(self._load)
            elif not create:
                raise IndexNotReadyError(f"no index at {self.path}; build one with `cbir index`")
        check_compatible(await self.info(), dims=dims, model_version=model_version, where=str(self.path))
        self._dims, self._model_version = dims, model_version
        self._loaded = True
        if self._vectors.shape[1] != dims:
            self._vectors = np.zeros((0, dims), dtype=np.float32)

    async def info(self) -> StoreInfo:
        return StoreInfo(dims=self._dims, model_version=self._model_version,
                         count=len(self._rows) or self._legacy_count, schema=self._schema)

    async def count(self) -> int:
        return len(self._rows)

    async def upsert(self, documents: Sequence[ImageDocument]) -> None:
        if not documents:
            return
        vectors = self._checked_vectors(documents)
        self._acquire_writer_lock()
        async with self._lock:
            self._write(documents, vectors)

    async def add(self, document: ImageDocument) -> bool:
        vectors = self._checked_vectors([document])
        self._acquire_writer_lock()
        async with self._lock:
            added = document.id not in self._rows
            if added:
                self._write([document], vectors)
        await self.flush()  # also when another add of the same id is still saving: on return it is on disk
        return added

    def _checked_vectors(self, documents: Sequence[ImageDocument]) -> np.ndarray:
        if self._dims is None:
            raise StoreError(f"the index at {self.path} is not open; call open() first")
        vectors = np.stack([np.asarray(doc.vector, dtype=np.float32).ravel() for doc in documents])
        if vectors.shape[1] != self._dims:
            raise StoreMismatchError(f"vectors have {vectors.shape[1]} dims; this index holds {self._dims}")
        for doc in documents:
            if doc.model_version != self._model_version:
                raise StoreMismatchError(f"document {doc.id} is from model {doc.model_version!r}, "
                                         f"the index holds {self._model_version!r}")
        return vectors

    def _write(self, documents: Sequence[ImageDocument], vectors: np.ndarray) -> None:
        """Upsert under `self._lock`: a known id is overwritten in place, a new one appended."""
        new_rows = []
        for doc, vector in zip(documents, vectors, strict=True):
            row = self._rows.get(doc.id)
            if row is None:
                self._rows[doc.id] = len(self._docs)
                self._docs.append(doc.stored())
                new_rows.append(vector)
            else:
                self._docs[row] = doc.stored()
                self._vectors[row] = vector
        if new_rows:
            self._vectors = np.concatenate([self._vectors, np.stack(new_rows)])
        self._snapshot = None
        self._dirty = True

    async def delete(self, ids: Sequence[str]) -> int:
        self._acquire_writer_lock()
        async with self._lock:
            doomed = sorted({self._rows[i] for i in ids if i in self._rows})
            if not doomed:
                return 0
            keep = np.setdiff1d(np.arange(len(self._docs)), doomed)
            self._vectors = self._vectors[keep]
            self._docs = [self._docs[i] for i in keep]
            self._rows = {doc.id: row for row, doc in enumerate(self._docs)}
            self._snapshot = None
            self._dirty = True
            return len(doomed)

    async def remove(self, id: str) -> bool:
        removed = await self.delete([id]) > 0
        await self.flush()
        return removed

    async def get(self, id: str) -> StoredImage | None:
        row = self._rows.get(id)
        return None if row is None else self._docs[row]

    async def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {i: self._vectors[self._rows[i]].copy() for i in ids if i in self._rows}

    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        return {i for i in ids if i in self._rows}

    async def iter_documents(self, *, source: str | None = None) -> AsyncIterator[StoredImage]:
        for doc in sorted(self._docs, key=lambda doc: doc.id):  # a copy: writes meanwhile do not disturb it
            if source is None or doc.source == source:
                yield doc

    async def stats(self) -> CollectionStats:
        labels = Counter(doc.label for doc in self._docs)
        unlabelled = labels.pop(None, 0)
        return CollectionStats(documents=len(self._docs), sources=dict(Counter(doc.source for doc in self._docs)),
                               labels=dict(sorted(labels.items())), unlabelled=unlabelled)

    async def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        for query in queries:
            check_query_vector(query.vector, dims=self._dims, where=str(self.path))
        if not queries:
            return []
        snapshot = self._snapshot or self._take_snapshot()
        return await asyncio.to_thread(snapshot.search_many, queries)

    def _take_snapshot(self) -> _Snapshot:
        """A copy of the table as it is now (on the event loop, so no write is half done): later
        writes replace the store's snapshot, never change this one under a running search."""
        index = faiss.IndexFlatIP(self._vectors.shape[1] or self._dims or 1)
        if len(self._rows):
            index.add(np.ascontiguousarray(self._vectors))  # FAISS keeps its own copy
        self._snapshot = _Snapshot(index=index, rows=dict(self._rows), docs=tuple(self._docs))
        return self._snapshot

    async def flush(self) -> None:
        async with self._lock:
            if not self._dirty and self.path.exists():
                return
            self._acquire_writer_lock()
            await asyncio.to_thread(self._save)
            self._dirty = False

    async def reset(self) -> None:
        self._acquire_writer_lock()
        async with self._lock:
            self._docs = []
            self._schema, self._legacy_count = DOCUMENT_SCHEMA, 0
            self._vectors = np.zeros((0, 0), dtype=np.float32)
            self._rows = {}
            self._snapshot = None
            self._dirty = True
            self._dims = self._model_version = None
            self._loaded = True

    async def close(self) -> None:
        self._release_writer_lock()

    def __del__(self) -> None:  # a dropped store lets go of the lock, as an ended process does
        self._release_writer_lock()

    def _release_writer_lock(self) -> None:
        if getattr(self, "_writer_lock", None) is not None:
            os.close(self._writer_lock)  # closing the descriptor releases the flock
            self._writer_lock = None

    def _acquire_writer_lock(self) -> None:
        if self._writer_lock is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            # Busy, not broken: once the other writer closes, the same call succeeds.
            raise StoreUnavailableError(f"another process (pid {holder}) is writing the index at {self.path}; "
                                        "wait for it to finish or use another CBIR_STATE_DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._writer_lock = fd
        for leftover in self.path.parent.glob(self.path.name + ".*.tmp"):  # from a save that was killed
            leftover.unlink(missing_ok=True)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        docs = self._docs
        columns = {f"{name}s": np.asarray([getattr(doc, name) for doc in docs], dtype=str) for name in _TEXT_COLUMNS}
        columns |= {
            "labels": np.asarray([doc.label or "" for doc in docs], dtype=str),
            "labelled": np.asarray([doc.label is not None for doc in docs], dtype=bool),
            "confidences": np.asarray([doc.confidence for doc in docs], dtype=np.float64),
            "sizes": np.asarray([doc.size for doc in docs], dtype=np.int64),
            "mtimes": np.asarray([doc.mtime for doc in docs], dtype=np.float64),
        }
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                np.savez(file, vectors=self._vectors, model_version=np.asarray(self._model_version or ""),
                         schema=np.asarray(DOCUMENT_SCHEMA), **columns)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        logger.debug("saved %d documents to %s", len(docs), self.path)

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                vectors = data["vectors"].astype(np.float32)
                model_version = str(data["model_version"]) or None
                schema = int(data["schema"]) if "schema" in data else 1
                docs = _documents_from(data, model_version or "") if schema == DOCUMENT_SCHEMA else None
                ids = data["ids"].tolist()
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise IndexNotReadyError(
                f"the index at {self.path} is unreadable ({exc}); delete it and run `cbir index`"
            ) from exc
        # An index of an older schema is only counted and described: opening it asks for a rebuild.
        self._schema = schema
        self._docs = docs if docs is not None else []
        self._vectors = vectors if docs is not None else np.zeros((0, vectors.shape[1]), dtype=np.float32)
        self._rows = {doc.id: row for row, doc in enumerate(self._docs)}
        self._legacy_count = 0 if docs is not None else len(ids)
        self._dims = int(vectors.shape[1]) if ids else None
        self._model_version = model_version if ids else None
        self._snapshot = None
        self._dirty = False


def _documents_from(data: np.lib.npyio.NpzFile, model_version: str) -> list[StoredImage]:
    columns = {name: data[f"{name}s"].tolist() for name in _TEXT_COLUMNS}
    labels, labelled = data["labels"].tolist(), data["labelled"].tolist()
    confidences, sizes, mtimes = data["confidences"].tolist(), data["sizes"].tolist(), data["mtimes"].tolist()
    return [
        StoredImage(id=columns["id"][row], filename=columns["filename"][row], path=columns["path"][row],
                    source=columns["source"][row], label=labels[row] if labelled[row] else None,
                    predicted_label=columns["predicted_label"][row], confidence=confidences[row],
                    size=sizes[row], mtime=mtimes[row], model_version=model_version)
        for row in range(len(labels))
    ]


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """The index and its documents as of one moment, searched from worker threads."""

    index: faiss.Index
    rows: dict[str, int]
    docs: tuple[StoredImage, ...]
    _row_cache: dict[tuple[str, str], np.ndarray] = dataclasses.field(default_factory=dict)

    def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        """One FAISS search per distinct filter, each over all the queries that share it."""
        results: list[list[StoreHit]] = [[] for _ in queries]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for position, query in enumerate(queries):
            groups[query.filter_key].append(position)
        for filter_key, members in groups.items():
            selector, allowed = self._selector(*filter_key)
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

    def _selector(self, labels: frozenset[str] | None, predicted_labels: frozenset[str] | None,
                  exclude_ids: frozenset[str]) -> tuple[tuple | None, int]:
        """A FAISS id selector for the filter (kept with what it points to) and how many rows pass it."""
        excluded = np.asarray(sorted(self.rows[i] for i in exclude_ids if i in self.rows), dtype=np.int64)
        if labels is None and predicted_labels is None:
            if not len(excluded):
                return None, len(self.docs)
            inner = faiss.IDSelectorBatch(excluded)
            return (faiss.IDSelectorNot(inner), inner), len(self.docs) - len(excluded)
        allowed = np.arange(len(self.docs), dtype=np.int64)
        for field_name, values in (("label", labels), ("predicted_label", predicted_labels)):
            if values is not None:
                allowed = np.intersect1d(allowed, np.concatenate(
                    [self._rows_where(field_name, value) for value in sorted(values)] or [np.zeros(0, np.int64)]))
        allowed = np.setdiff1d(allowed, excluded)
        return (faiss.IDSelectorBatch(allowed),), len(allowed)

    def _rows_where(self, field_name: str, value: str) -> np.ndarray:
        key = (field_name, value)
        if key not in self._row_cache:  # computed twice at worst by two threads: same answer
            self._row_cache[key] = np.asarray(
                [row for row, doc in enumerate(self.docs) if getattr(doc, field_name) == value], dtype=np.int64)
        return self._row_cache[key]
