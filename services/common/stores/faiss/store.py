"""The embedded store: inner-product search with FAISS, persisted to one file on disk.

Search is exact (`IndexFlatIP`) for the collections of one machine; from `AUTO_HNSW_FROM` documents on
(`CBIR_FAISS_INDEX=auto`, measured by bench/scale.py: reports/scale.md), or always with `hnsw`, an HNSW
graph answers instead. The graph is built in a worker thread from the documents as they are then, and
replaced by a new one once a tenth of the documents changed since; the documents written meanwhile are
searched exactly beside it and the graph's copies of changed or deleted ones are filtered out, so a
search always sees every write. A filtered query that lets through few documents is searched exactly
(a graph walked through a narrow filter misses neighbours). A store that writes keeps each graph it builds
beside the index (`<index>.<token>.hnsw`, written once, atomically) and records it in the index file with
the documents changed since, so a restart loads it instead of building it again.

The vectors are L2-normalised, so inner product is cosine. Everything lives in memory; `flush`
writes a single `.npz` file through a temporary file and an atomic rename, so a crash during
a save leaves the previous index intact. The first write takes an exclusive lock on a `.lock`
file beside the index, held until `close` (or the process ends), so two writers (say, `cbir index`
while `cbir serve` is indexing the same state directory) cannot overwrite each other's work;
readers take no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import tempfile
import time
import uuid
import zipfile
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Literal

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


# CBIR_FAISS_INDEX=auto uses the graph from this many documents on, with these parameters: bench/scale.py's
# rule (exact search's p50 past a tenth of the model's time per query) and its smallest efSearch whose
# recall@100 stayed >= 0.99 at every size measured (reports/scale.md, 2026-12-01).
AUTO_HNSW_FROM = 1_000_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 512
REBUILD_AFTER = 0.1  # share of documents changed since the graph was built that makes it rebuild
EXACT_BELOW = 0.2  # a filter letting through less than this share of documents is searched exactly
IndexKind = Literal["auto", "flat", "hnsw"]


class FaissStore(VectorStore):
    """FAISS `IndexFlatIP` (or an HNSW graph, see the module's docstring) over an in-memory table, saved
    atomically to `path`.

    >>> store = FaissStore(Path("state/index.npz"))
    >>> await store.open(dims=74, model_version="abc")
    >>> await store.upsert(documents); await store.flush()
    >>> hits = await store.search(query_vector, k=10)

    The search is exact, so a filtered query (labels, predicted labels, excluded ids) ranks every
    document that passes the filter: filters never cost recall.
    """

    name = "faiss"

    def __init__(self, path: Path, *, index: IndexKind = "auto") -> None:
        self.path = Path(path)
        self.index_option = index
        self._graph: _Graph | None = None  # the HNSW graph, once built
        self._changed: set[str] = set()  # ids written or deleted since the graph was built
        self._changed_during_build: set[str] | None = None  # the same, while a new graph is being built
        self._building: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._dims: int | None = None
        self._model_version: str | None = None
        self._schema = DOCUMENT_SCHEMA  # of the documents loaded; an older file's is older
        self._legacy_count = 0  # documents of an older schema in the file: counted, not loaded
        self._docs: list[StoredImage] = []
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._rows: dict[str, int] = {}
        self._snapshot: _Snapshot | _GraphSnapshot | None = None  # what searches read; None after a write
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

    @property
    def index_kind(self) -> str:
        """What answers searches now: `flat`, `hnsw`, or `flat (hnsw building)`."""
        if self._wants_graph():
            return "hnsw" if self._graph is not None else "flat (hnsw building)"
        return "flat"

    def _wants_graph(self) -> bool:
        return self.index_option == "hnsw" or (self.index_option == "auto" and len(self._rows) >= AUTO_HNSW_FROM)

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
        updated = False
        for doc, vector in zip(documents, vectors, strict=True):
            row = self._rows.get(doc.id)
            if row is None:
                self._rows[doc.id] = len(self._docs)
                self._docs.append(doc.stored())
                new_rows.append(vector)
            else:
                if not updated:  # a snapshot may hold the array: never change it in place
                    self._vectors, updated = self._vectors.copy(), True
                self._docs[row] = doc.stored()
                self._vectors[row] = vector
        if new_rows:
            self._vectors = np.concatenate([self._vectors, np.stack(new_rows)])
        self._changed_ids(doc.id for doc in documents)

    async def delete(self, ids: Sequence[str]) -> int:
        self._acquire_writer_lock()
        async with self._lock:
            doomed = sorted({self._rows[i] for i in ids if i in self._rows})
            if not doomed:
                return 0
            keep = np.setdiff1d(np.arange(len(self._docs)), doomed)
            gone = [self._docs[i].id for i in doomed]
            self._vectors = self._vectors[keep]
            self._docs = [self._docs[i] for i in keep]
            self._rows = {doc.id: row for row, doc in enumerate(self._docs)}
            self._changed_ids(gone)
            return len(doomed)

    def _changed_ids(self, ids: Iterable[str]) -> None:
        """After a write (under `self._lock`): the snapshot is stale, the file unsaved, the graph behind."""
        ids = list(ids)
        self._snapshot = None
        self._dirty = True
        if self._graph is not None:
            self._changed.update(ids)
        if self._changed_during_build is not None:
            self._changed_during_build.update(ids)

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

    def _take_snapshot(self) -> _Snapshot | _GraphSnapshot:
        """The table as it is now (on the event loop, so no write is half done): later writes replace the
        store's snapshot, never change this one under a running search."""
        self._maybe_build_graph()
        graph = self._graph if self._wants_graph() else None
        if graph is None:
            index = faiss.IndexFlatIP(self._vectors.shape[1] or self._dims or 1)
            if len(self._rows):
                index.add(np.ascontiguousarray(self._vectors))  # FAISS keeps its own copy
            self._snapshot = _Snapshot(index=index, rows=dict(self._rows), docs=tuple(self._docs))
        else:
            self._snapshot = _GraphSnapshot(graph=graph, changed=frozenset(self._changed), rows=dict(self._rows),
                                            docs=tuple(self._docs), vectors=self._vectors)
        return self._snapshot

    async def wait_for_graph(self) -> None:
        """Start the graph's build if one is due, and wait for it (searches never need to: they go on
        exactly meanwhile)."""
        self._maybe_build_graph()
        if self._building is not None:
            await asyncio.shield(self._building)

    def _maybe_build_graph(self) -> None:
        """Start building a graph in a worker thread when one is wanted and there is none, or the one there is
        has fallen a tenth behind; searches go on with what there is meanwhile."""
        if not self._wants_graph() or (self._building is not None and not self._building.done()):
            return
        if self._graph is not None and len(self._changed) <= REBUILD_AFTER * max(len(self._rows), 1):
            return
        ids, vectors = tuple(doc.id for doc in self._docs), self._vectors  # never changed in place
        self._changed_during_build = set()
        self._building = asyncio.get_running_loop().create_task(self._build_graph(ids, vectors))

    async def _build_graph(self, ids: tuple[str, ...], vectors: np.ndarray) -> None:
        started = time.perf_counter()
        keep = self._writer_lock is not None  # only a store that writes the index writes beside it
        try:
            graph = await asyncio.to_thread(_Graph.build, ids, vectors, path=self.path if keep else None)
        except BaseException:
            self._changed_during_build = None
            raise
        self._graph, self._changed = graph, self._changed_during_build or set()
        self._changed_during_build, self._snapshot = None, None
        logger.info("built the HNSW graph of %d documents in %.1f s (%d written since)", len(ids),
                    time.perf_counter() - started, len(self._changed))
        if keep:
            self._dirty = True
            await self.flush()  # the index file now names the graph: a restart loads it

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
            self._graph, self._changed = None, set()
            self._schema, self._legacy_count = DOCUMENT_SCHEMA, 0
            self._vectors = np.zeros((0, 0), dtype=np.float32)
            self._rows = {}
            self._snapshot = None
            self._dirty = True
            self._dims = self._model_version = None
            self._loaded = True

    async def close(self) -> None:
        if self._building is not None and not self._building.done():
            self._building.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._building
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
        graph = self._graph if self._graph is not None and self._graph.token else None
        if graph is not None:  # the graph kept beside the index, and what changed since it was built
            columns |= {"graph_token": np.asarray(graph.token), "graph_ids": np.asarray(graph.ids, dtype=str),
                        "graph_changed": np.asarray(sorted(self._changed), dtype=str)}
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
        for stale in self.path.parent.glob(self.path.name + ".*.hnsw"):  # graphs the index no longer names
            if graph is None or stale.name != _Graph.file_name(self.path, graph.token):
                stale.unlink(missing_ok=True)
        logger.debug("saved %d documents to %s", len(docs), self.path)

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                vectors = data["vectors"].astype(np.float32)
                model_version = str(data["model_version"]) or None
                schema = int(data["schema"]) if "schema" in data else 1
                docs = _documents_from(data, model_version or "") if schema == DOCUMENT_SCHEMA else None
                ids = data["ids"].tolist()
                kept = (str(data["graph_token"]), tuple(data["graph_ids"].tolist()),
                        set(data["graph_changed"].tolist())) if "graph_token" in data else None
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise IndexNotReadyError(
                f"the index at {self.path} is unreadable ({exc}); delete it and run `cbir index`"
            ) from exc
        # An index of an older schema is only counted and described: opening it asks for a rebuild.
        self._schema = schema
        self._docs = docs if docs is not None else []
        self._vectors = vectors if docs is not None else np.zeros((0, vectors.shape[1]), dtype=np.float32)
        self._rows = {doc.id: row for row, doc in enumerate(self._docs)}
        self._graph, self._changed = None, set()
        if kept is not None and docs is not None and self._wants_graph():
            token, graph_ids, changed = kept
            self._graph = _Graph.read(self.path, token, graph_ids)
            self._changed = changed if self._graph is not None else set()
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Table:
    """The documents as of one moment, and which rows hold a label or a prediction (computed on demand)."""

    rows: dict[str, int]
    docs: tuple[StoredImage, ...]
    _row_cache: dict[tuple[str, str], np.ndarray] = dataclasses.field(default_factory=dict)

    def _excluded_rows(self, exclude_ids: frozenset[str]) -> np.ndarray:
        return np.asarray(sorted(self.rows[i] for i in exclude_ids if i in self.rows), dtype=np.int64)

    def _passing_rows(self, labels: frozenset[str] | None, predicted_labels: frozenset[str] | None,
                      exclude_ids: frozenset[str]) -> np.ndarray | None:
        """The rows a label / predicted-label filter lets through, minus the excluded ids; None without a filter."""
        if labels is None and predicted_labels is None:
            return None
        allowed = np.arange(len(self.docs), dtype=np.int64)
        for field_name, values in (("label", labels), ("predicted_label", predicted_labels)):
            if values is not None:
                allowed = np.intersect1d(allowed, np.concatenate(
                    [self._rows_where(field_name, value) for value in sorted(values)] or [np.zeros(0, np.int64)]))
        return np.setdiff1d(allowed, self._excluded_rows(exclude_ids))

    def _rows_where(self, field_name: str, value: str) -> np.ndarray:
        key = (field_name, value)
        if key not in self._row_cache:  # computed twice at worst by two threads: same answer
            self._row_cache[key] = np.asarray(
                [row for row, doc in enumerate(self.docs) if getattr(doc, field_name) == value], dtype=np.int64)
        return self._row_cache[key]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Snapshot(_Table):
    """The exact index of the documents as of one moment, searched from worker threads."""

    index: faiss.Index

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
        allowed = self._passing_rows(labels, predicted_labels, exclude_ids)
        if allowed is not None:
            return (faiss.IDSelectorBatch(allowed),), len(allowed)
        excluded = self._excluded_rows(exclude_ids)
        if not len(excluded):
            return None, len(self.docs)
        inner = faiss.IDSelectorBatch(excluded)
        return (faiss.IDSelectorNot(inner), inner), len(self.docs) - len(excluded)


@dataclasses.dataclass(frozen=True)
class _Graph:
    """An HNSW graph of the documents as they were when it was built: `ids[row]` is row's document; `token`
    names its file beside the index ("" when it was not kept)."""

    index: faiss.IndexHNSWFlat
    ids: tuple[str, ...]
    rows: dict[str, int]
    token: str = ""

    @classmethod
    def build(cls, ids: tuple[str, ...], vectors: np.ndarray, *, path: Path | None = None) -> _Graph:
        """Build the graph; with `path` (the index file), also keep it beside it, atomically."""
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(np.ascontiguousarray(vectors[:len(ids)]))
        token = ""
        if path is not None:
            token = uuid.uuid4().hex[:12]
            target = path.with_name(cls.file_name(path, token))
            tmp = target.with_name(target.name + ".tmp")
            faiss.write_index(index, str(tmp))
            os.replace(tmp, target)
        return cls(index=index, ids=ids, rows={doc_id: row for row, doc_id in enumerate(ids)}, token=token)

    @staticmethod
    def file_name(path: Path, token: str) -> str:
        return f"{path.name}.{token}.hnsw"

    @classmethod
    def read(cls, path: Path, token: str, ids: tuple[str, ...]) -> _Graph | None:
        """The graph kept beside `path`, or None when its file is missing or does not match (then it is built)."""
        try:
            index = faiss.read_index(str(path.with_name(cls.file_name(path, token))))
        except RuntimeError as exc:  # FAISS's error for a missing or unreadable file
            logger.warning("the HNSW graph %s of %s cannot be read (%s); building it again", token, path, exc)
            return None
        if index.ntotal != len(ids):
            return None
        return cls(index=index, ids=ids, rows={doc_id: row for row, doc_id in enumerate(ids)}, token=token)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _GraphSnapshot(_Table):
    """The graph, the documents changed since it was built (searched exactly beside it; their graph copies
    filtered out), and the table as of one moment: an exact search's answers, approximately."""

    graph: _Graph
    changed: frozenset[str]
    vectors: np.ndarray  # the table's, never changed in place

    def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        results: list[list[StoreHit]] = [[] for _ in queries]
        for query_position, query in enumerate(queries):
            results[query_position] = self._search(query)
        return results

    def _search(self, query: StoreQuery) -> list[StoreHit]:
        vector = np.asarray(query.vector, dtype=np.float32).ravel()
        depth = query.offset + query.k
        allowed = self._passing_rows(*query.filter_key)  # None: every document
        if allowed is not None and len(allowed) < EXACT_BELOW * len(self.docs):
            return self._page(self._exact(vector, allowed, depth), query)
        # The graph, minus its copies of documents changed since, restricted to the filter ...
        stale = {self.graph.rows[i] for i in self.changed | query.exclude_ids if i in self.graph.rows}
        if allowed is not None:
            in_graph = (self.graph.rows.get(self.docs[row].id) for row in allowed)
            graph_rows = np.asarray(sorted(r for r in in_graph if r is not None and r not in stale), dtype=np.int64)
            selector = faiss.IDSelectorBatch(graph_rows)
            keep: tuple = (selector,)
        elif stale:
            inner = faiss.IDSelectorBatch(np.asarray(sorted(stale), dtype=np.int64))
            selector = faiss.IDSelectorNot(inner)
            keep = (selector, inner)
        else:
            selector, keep = None, ()
        params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, depth), sel=selector) if selector else \
            faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, depth))
        cosines, rows = self.graph.index.search(vector[np.newaxis], depth, params=params)
        del keep  # the selectors lived through the search
        found = [(float(c), self.rows[self.graph.ids[int(r)]]) for c, r in zip(cosines[0], rows[0], strict=True)
                 if r >= 0 and self.graph.ids[int(r)] in self.rows]
        # ... and the documents written since, exactly.
        fresh = np.asarray([self.rows[i] for i in self.changed if i in self.rows and i not in query.exclude_ids],
                           dtype=np.int64)
        if allowed is not None:
            fresh = np.intersect1d(fresh, allowed)
        found += self._exact(vector, fresh, depth)
        found.sort(key=lambda hit: -hit[0])
        return self._page(found[:depth], query)

    def _exact(self, vector: np.ndarray, rows: np.ndarray, depth: int) -> list[tuple[float, int]]:
        if not len(rows):
            return []
        cosines = self.vectors[rows] @ vector
        best = np.argsort(-cosines, kind="stable")[:depth]
        return [(float(cosines[i]), int(rows[i])) for i in best]

    def _page(self, found: list[tuple[float, int]], query: StoreQuery) -> list[StoreHit]:
        return [StoreHit(self.docs[row], score_from_cosine(cosine))
                for cosine, row in found[query.offset:query.offset + query.k]]
