"""The embedded store: `VectorStore` over the documents in memory (table.py), searched exactly with FAISS or through
an HNSW graph (graph.py), saved to one `.npz` file under a writer's lock (persistence.py) with a write-ahead log
beside it (log.py).

The vectors are L2-normalised, so inner product is cosine. Everything lives in memory. Every write is appended to the
log (`add` and `remove` wait for its fsync, so what they acknowledge survives a crash); the log is replayed on open
and folded into the index file (written atomically) after `fold_records` records or `fold_bytes` bytes, in the
background while writes go on, and by `flush` and `reset`. The first write takes an exclusive lock on a
`.lock` file beside the index, held until `close` (or the process ends), so two writers (say, `cbir index` while
`cbir serve` is indexing the same state directory) cannot overwrite each other's work; readers take no lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import numpy as np

from services.common.documents import ImageDocument, StoredImage, StoreHit
from services.common.errors import IndexNotReadyError, StoreError, StoreMismatchError
from services.common.settings import FaissIndexSetting
from services.common.stores.base import (
    CollectionStats,
    StoreInfo,
    StoreQuery,
    VectorStore,
    check_compatible,
    check_model_version,
    check_query_vector,
)
from services.common.stores.faiss.graph import (
    Graph,
    GraphKeeper,
    GraphSnapshot,
    SearchedIndex,
    discard_other_graphs,
)
from services.common.stores.faiss.log import LoggedWrite, WriteLog, delete_record, log_files, read_log, upsert_record
from services.common.stores.faiss.persistence import GraphRecord, WriterLock, load_index, save_index
from services.common.stores.faiss.table import Columns, DocumentTable, ExactSnapshot

logger = logging.getLogger(__name__)

# When the log is folded into the index file: a fold rewrites the whole file (seconds at 10^6 documents, in the
# background), a replay on open reads the whole log.
FOLD_RECORDS = 10_000
FOLD_BYTES = 64 * 2**20


class FaissStore(VectorStore):
    """FAISS `IndexFlatIP` (or an HNSW graph, see services/common/stores/faiss/graph.py) over an in-memory table,
    saved atomically to `path`, every write logged beside it first (services/common/stores/faiss/log.py) and folded
    into it after `fold_records` records or `fold_bytes` bytes (CBIR_FAISS_LOG_FOLD_*). `index` is the
    CBIR_FAISS_INDEX setting; `index_kind` says what searches now.

    >>> store = FaissStore(Path("state/index.npz"))
    >>> await store.open(dims=74, model_version="abc")
    >>> await store.upsert(documents); await store.flush()
    >>> hits = await store.search(query_vector, k=10)

    The search is exact, so a filtered query (labels, predicted labels, excluded ids) ranks every
    document that passes the filter: filters never cost recall.
    """

    name = "faiss"

    def __init__(self, path: Path, *, index: FaissIndexSetting = "auto", fold_records: int = FOLD_RECORDS,
                 fold_bytes: int = FOLD_BYTES) -> None:  # fmt: skip
        self.path = Path(path)
        self.fold_records, self.fold_bytes = fold_records, fold_bytes
        self._graphs = GraphKeeper(index)
        self._lock = asyncio.Lock()  # held by every write, and while a fold takes its copy
        self._fold_lock = asyncio.Lock()  # one fold at a time, in order
        self._folding: asyncio.Task[None] | None = None
        self._log = WriteLog(self.path)
        self._dims: int | None = None
        self._model_version: str | None = None
        self._table = DocumentTable()
        self._snapshot: ExactSnapshot | GraphSnapshot | None = None  # what searches read; None after a write
        self._dirty = False  # the index file is behind memory (the log holds the difference)
        self._loaded = False
        self._writer_lock = WriterLock(self.path)  # taken by the first write

    @property
    def index_setting(self) -> FaissIndexSetting:
        """Which index the store may search (CBIR_FAISS_INDEX): `auto`, `flat` or `hnsw`."""
        return self._graphs.setting

    @property
    def index_kind(self) -> SearchedIndex:
        """What answers searches now: `flat`, `hnsw`, or `flat (hnsw building)`."""
        return self._graphs.searched(len(self._table))

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
        self._table.fit(dims)

    def _load(self) -> None:
        saved = load_index(self.path)
        self._table = saved.table
        self._graphs.restore(saved.graph, self.path, len(saved.table))
        self._model_version = saved.model_version
        self._log = WriteLog(self.path, start=saved.log_from)
        replayed = 0
        for generation, log_path in log_files(self.path):
            if generation >= saved.log_from:  # older ones: a fold killed before it removed them
                for write in read_log(log_path):
                    self._replay(write)
                    replayed += 1
        if replayed:
            logger.info("replayed %d logged writes onto %s", replayed, self.path)
        self._dims = self._table.dims if len(self._table) else None
        self._model_version = self._model_version if len(self._table) else None
        self._snapshot = None
        self._dirty = replayed > 0

    def _replay(self, write: LoggedWrite) -> None:
        """Apply one logged write again (idempotent: an upsert overwrites by id, deleting a missing id does nothing);
        the graph learns of it as of any write."""
        if write.op == "delete":
            self._graphs.note_changed(self._table.delete(write.ids))
            return
        vectors = np.stack([doc.vector for doc in write.documents])
        if len(self._table) and (vectors.shape[1] != self._table.dims or write.model_version != self._model_version):
            raise IndexNotReadyError(f"the write log beside {self.path} holds {vectors.shape[1]}-dim vectors of model "
                                     f"{write.model_version}, unlike the index; delete it and run `cbir index`")
        self._model_version = write.model_version
        self._table.upsert(write.documents, vectors)
        self._graphs.note_changed([doc.id for doc in write.documents])

    async def info(self) -> StoreInfo:
        return StoreInfo(dims=self._dims, model_version=self._model_version, count=len(self._table))

    async def count(self) -> int:
        return len(self._table)

    async def upsert(self, documents: Sequence[ImageDocument]) -> None:
        if not documents:
            return
        vectors = self._checked_vectors(documents)
        await self._start_writing()
        async with self._lock:
            self._log.append(upsert_record(documents, vectors, model_version=self._model_version))
            self._table.upsert(documents, vectors)
            self._written(doc.id for doc in documents)
        self._maybe_fold()

    async def add(self, document: ImageDocument) -> bool:
        vectors = self._checked_vectors([document])
        await self._start_writing()
        async with self._lock:
            added = document.id not in self._table.rows
            if added:
                self._log.append(upsert_record([document], vectors, model_version=self._model_version))
                self._table.upsert([document], vectors)
                self._written([document.id])
        await self._log.sync()  # also when another add of the same id logged it: on return it is on disk
        self._maybe_fold()
        return added

    async def _start_writing(self) -> None:
        """Before a write: take the writer's lock, and write the index file if there is none yet (the log's records
        are replayed onto it: without it they would be orphans)."""
        self._writer_lock.acquire()
        if not self.path.exists():
            await self._fold()

    def _checked_vectors(self, documents: Sequence[ImageDocument]) -> np.ndarray:
        if self._dims is None:
            raise StoreError(f"the index at {self.path} is not open; call open() first")
        vectors = np.stack([np.asarray(doc.vector, dtype=np.float32).ravel() for doc in documents])
        if vectors.shape[1] != self._dims:
            raise StoreMismatchError(f"vectors have {vectors.shape[1]} dims; this index holds {self._dims}")
        check_model_version(documents, self._model_version)
        return vectors

    async def delete(self, ids: Sequence[str]) -> int:
        await self._start_writing()
        async with self._lock:
            stored = [i for i in dict.fromkeys(ids) if i in self._table.rows]
            if stored:
                self._log.append(delete_record(stored))
                self._written(self._table.delete(stored))
        self._maybe_fold()
        return len(stored)

    def _written(self, ids: Iterable[str]) -> None:
        """After a write (under `self._lock`): the snapshot is stale, the file unsaved, the graph behind."""
        self._snapshot = None
        self._dirty = True
        self._graphs.note_changed(list(ids))

    async def remove(self, id: str) -> bool:
        removed = await self.delete([id]) > 0
        await self._log.sync()  # also when another removal of it logged it: on return it is on disk
        return removed

    async def get(self, id: str) -> StoredImage | None:
        return self._table.get(id)

    async def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return self._table.vectors_of(ids)

    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        return self._table.existing(ids)

    async def iter_documents(self, *, source: str | None = None) -> AsyncIterator[StoredImage]:
        for doc in self._table.listed(source):  # a copy: writes meanwhile do not disturb it
            yield doc

    async def stats(self) -> CollectionStats:
        return self._table.stats()

    async def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        for query in queries:
            check_query_vector(query.vector, dims=self._dims, where=str(self.path))
        if not queries:
            return []
        snapshot = self._snapshot or self._take_snapshot()
        return await asyncio.to_thread(snapshot.search_many, queries)

    def _take_snapshot(self) -> ExactSnapshot | GraphSnapshot:
        """The table as it is now (on the event loop, so no write is half done): later writes replace the
        store's snapshot, never change this one under a running search."""
        self._maybe_build_graph()
        self._snapshot = self._graphs.snapshot(self._table) or self._table.exact_snapshot(dims=self._dims)
        return self._snapshot

    async def wait_for_graph(self) -> None:
        """Start the graph's build if one is due, and wait for it (searches never need to: they go on
        exactly meanwhile)."""
        self._maybe_build_graph()
        await self._graphs.wait()

    def _maybe_build_graph(self) -> None:
        """Start building a graph in a worker thread when one is due; searches go on with what there is meanwhile."""
        if self._graphs.due(len(self._table)):
            keep_beside = self.path if self._writer_lock.held else None  # only the index's writer writes beside it
            self._graphs.start(self._table.ids(), self._table.vectors, keep_beside=keep_beside,
                               on_built=self._graph_built)

    async def _graph_built(self, graph: Graph) -> None:
        self._snapshot = None  # the next search reads the new graph
        if graph.token:  # kept beside the index: once the index file names it, a restart loads it
            self._dirty = True
            await self.flush()

    async def flush(self) -> None:
        """Fold every write so far into the index file (the log already made them durable)."""
        await self._fold()

    def _fold_due(self) -> bool:
        return self._log.records >= self.fold_records or self._log.bytes >= self.fold_bytes

    def _maybe_fold(self) -> None:
        """After a write: start folding the log in the background once it holds enough."""
        if self._fold_due() and (self._folding is None or self._folding.done()):
            self._folding = asyncio.get_running_loop().create_task(self._fold_in_background())

    async def _fold_in_background(self) -> None:
        try:
            await self._fold()
            while self._fold_due():  # what was written during the fold is enough for the next one
                await self._fold()
        except Exception:  # the log still holds every write: the next fold tries again
            logger.exception("folding the write log into %s failed", self.path)

    async def _fold(self) -> None:
        """Write the index file with every write so far, then delete the log files it holds. Writes go on
        meanwhile, into a new log file: only taking the copy to save holds them up."""
        async with self._fold_lock:
            async with self._lock:
                if not self._dirty and self.path.exists():
                    return
                self._writer_lock.acquire()
                columns, graph, model_version = self._table.columns(), self._graphs.record(), self._model_version
                log_from = await self._log.rotate()
                self._dirty = False
            save = asyncio.ensure_future(asyncio.to_thread(self._save, columns, graph, model_version, log_from))
            try:
                await asyncio.shield(save)
            except BaseException:
                await asyncio.wait([save])  # a save left running could land after the next one
                self._dirty = True
                raise
            self._log.discard_before(log_from)

    def _save(self, columns: Columns, graph: GraphRecord | None, model_version: str | None, log_from: int) -> None:
        save_index(self.path, columns, model_version=model_version, graph=graph, log_from=log_from)
        discard_other_graphs(self.path, keep=graph.token if graph else None)  # graphs the index no longer names

    async def reset(self) -> None:
        self._writer_lock.acquire()
        async with self._lock:
            self._table = DocumentTable()
            self._graphs.clear()
            self._snapshot = None
            self._dirty = True
            self._dims = self._model_version = None
            self._loaded = True
        await self._fold()  # at once: no logged write of the old documents may be replayed onto the new ones

    async def close(self) -> None:
        """Let go of the files, once a fold under way is done. What the log holds stays there (durable, replayed by
        the next open): closing never waits for a rewrite of the index file (seconds at a million documents), which
        a retired index (a swap's old one, removed next) would not even need."""
        await self._graphs.cancel()
        if self._folding is not None:
            await self._folding
        await self._log.close()
        self._writer_lock.release()
