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
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from services.common.documents import ImageDocument, StoredImage, StoreHit
from services.common.errors import IndexNotReadyError, StoreError, StoreMismatchError, StoreUnavailableError
from services.common.scoring import score_from_cosine
from services.common.stores.base import StoreInfo, StoreQuery, VectorStore, check_compatible, check_query_vector

logger = logging.getLogger(__name__)

_FIELDS = ("ids", "filenames", "paths", "labels")


class FaissStore(VectorStore):
    """FAISS `IndexFlatIP` over an in-memory table, saved atomically to `path`.

    >>> store = FaissStore(Path("state/index.npz"))
    >>> await store.open(dims=74, model_version="abc")
    >>> await store.upsert(documents); await store.flush()
    >>> hits = await store.search(query_vector, k=10)
    """

    name = "faiss"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = asyncio.Lock()
        self._dims: int | None = None
        self._model_version: str | None = None
        self._columns: dict[str, list[str]] = {field: [] for field in _FIELDS}
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
        return StoreInfo(dims=self._dims, model_version=self._model_version, count=len(self._rows))

    async def count(self) -> int:
        return len(self._rows)

    async def upsert(self, documents: Sequence[ImageDocument]) -> None:
        if not documents:
            return
        vectors = np.stack([np.asarray(doc.vector, dtype=np.float32) for doc in documents])
        if self._dims is None:
            raise StoreError(f"the index at {self.path} is not open; call open() first")
        if vectors.shape[1] != self._dims:
            raise StoreMismatchError(f"vectors have {vectors.shape[1]} dims; this index holds {self._dims}")
        self._acquire_writer_lock()
        async with self._lock:
            new_rows = []
            for doc, vector in zip(documents, vectors, strict=True):
                if doc.model_version != self._model_version:
                    raise StoreMismatchError(
                        f"document {doc.id} is from model {doc.model_version!r}, "
                        f"the index holds {self._model_version!r}"
                    )
                row = self._rows.get(doc.id)
                if row is None:
                    self._rows[doc.id] = len(self._rows)
                    new_rows.append(vector)
                    for field, value in zip(_FIELDS, (doc.id, doc.filename, doc.path, doc.label), strict=True):
                        self._columns[field].append(value)
                else:
                    self._vectors[row] = vector
                    self._columns["filenames"][row] = doc.filename
                    self._columns["paths"][row] = doc.path
                    self._columns["labels"][row] = doc.label
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
            keep = np.setdiff1d(np.arange(len(self._rows)), doomed)
            self._vectors = self._vectors[keep]
            for field in _FIELDS:
                column = self._columns[field]
                self._columns[field] = [column[i] for i in keep]
            self._rows = {doc_id: row for row, doc_id in enumerate(self._columns["ids"])}
            self._snapshot = None
            self._dirty = True
            return len(doomed)

    async def get(self, id: str) -> StoredImage | None:
        row = self._rows.get(id)
        if row is None:
            return None
        return StoredImage(
            id=id,
            filename=self._columns["filenames"][row],
            path=self._columns["paths"][row],
            label=self._columns["labels"][row],
            model_version=self._model_version or "",
        )

    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        return {i for i in ids if i in self._rows}

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
        self._snapshot = _Snapshot(index=index, rows=dict(self._rows),
                                   **{name: tuple(self._columns[name]) for name in _FIELDS})
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
            self._columns = {field: [] for field in _FIELDS}
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
        arrays = {field: np.asarray(values, dtype=str) for field, values in self._columns.items()}
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                np.savez(
                    file,
                    vectors=self._vectors,
                    model_version=np.asarray(self._model_version or ""),
                    **arrays,
                )
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
        logger.debug("saved %d documents to %s", len(self._rows), self.path)

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                vectors = data["vectors"].astype(np.float32)
                columns = {field: data[field].tolist() for field in _FIELDS}
                model_version = str(data["model_version"]) or None
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise IndexNotReadyError(
                f"the index at {self.path} is unreadable ({exc}); delete it and run `cbir index`"
            ) from exc
        self._vectors, self._columns = vectors, columns
        self._rows = {doc_id: row for row, doc_id in enumerate(columns["ids"])}
        self._dims = int(vectors.shape[1]) if len(columns["ids"]) else None
        self._model_version = model_version if columns["ids"] else None
        self._snapshot = None
        self._dirty = False


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """The index and its columns as of one moment, searched from worker threads."""

    index: faiss.Index
    rows: dict[str, int]
    ids: tuple[str, ...]
    filenames: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[str, ...]
    _label_rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        """One FAISS search per distinct filter, each over all the queries that share it."""
        results: list[list[StoreHit]] = [[] for _ in queries]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for position, query in enumerate(queries):
            groups[query.filter_key].append(position)
        for (labels, exclude_ids), members in groups.items():
            selector, allowed = self._selector(labels, exclude_ids)
            depth = min(max(queries[i].offset + queries[i].k for i in members), allowed)
            if depth <= 0:
                continue
            matrix = np.stack([np.asarray(queries[i].vector, dtype=np.float32).ravel() for i in members])
            params = faiss.SearchParameters(sel=selector[0]) if selector else None
            cosines, rows = self.index.search(matrix, depth, params=params)
            for line, position in enumerate(members):
                page = slice(queries[position].offset, queries[position].offset + queries[position].k)
                results[position] = [self._hit(int(row), float(cosine))
                                     for cosine, row in zip(cosines[line][page], rows[line][page], strict=True)
                                     if row >= 0]
        return results

    def _selector(self, labels: frozenset[str] | None, exclude_ids: frozenset[str]) -> tuple[tuple | None, int]:
        """A FAISS id selector for the filter (kept with what it points to) and how many rows pass it."""
        excluded = np.asarray(sorted(self.rows[i] for i in exclude_ids if i in self.rows), dtype=np.int64)
        if labels is None:
            if not len(excluded):
                return None, len(self.ids)
            inner = faiss.IDSelectorBatch(excluded)
            return (faiss.IDSelectorNot(inner), inner), len(self.ids) - len(excluded)
        allowed = np.concatenate([self._rows_labelled(label) for label in sorted(labels)] or [np.zeros(0, np.int64)])
        allowed = np.setdiff1d(allowed, excluded)
        return (faiss.IDSelectorBatch(allowed),), len(allowed)

    def _rows_labelled(self, label: str) -> np.ndarray:
        if label not in self._label_rows:  # computed twice at worst by two threads: same answer
            self._label_rows[label] = np.flatnonzero(np.asarray(self.labels, dtype=object) == label).astype(np.int64)
        return self._label_rows[label]

    def _hit(self, row: int, cosine: float) -> StoreHit:
        return StoreHit(id=self.ids[row], filename=self.filenames[row], path=self.paths[row], label=self.labels[row],
                        score=score_from_cosine(cosine))
