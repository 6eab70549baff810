"""The embedded store: `VectorStore` over the documents in memory (table.py), searched exactly with FAISS or through
an HNSW graph (graph.py), and saved to one `.npz` file under a writer's lock (persistence.py).

The vectors are L2-normalised, so inner product is cosine. Everything lives in memory; `flush` writes the file
atomically, so a crash during a save leaves the previous index intact. The first write takes an exclusive lock on a
`.lock` file beside the index, held until `close` (or the process ends), so two writers (say, `cbir index` while
`cbir serve` is indexing the same state directory) cannot overwrite each other's work; readers take no lock.
"""

from __future__ import annotations

import asyncio
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
from services.common.stores.faiss.persistence import GraphRecord, WriterLock, load_index, save_index
from services.common.stores.faiss.table import DocumentTable, ExactSnapshot


class FaissStore(VectorStore):
    """FAISS `IndexFlatIP` (or an HNSW graph, see services/common/stores/faiss/graph.py) over an in-memory table,
    saved atomically to `path`. `index` is the CBIR_FAISS_INDEX setting; `index_kind` says what searches now.

    >>> store = FaissStore(Path("state/index.npz"))
    >>> await store.open(dims=74, model_version="abc")
    >>> await store.upsert(documents); await store.flush()
    >>> hits = await store.search(query_vector, k=10)

    The search is exact, so a filtered query (labels, predicted labels, excluded ids) ranks every
    document that passes the filter: filters never cost recall.
    """

    name = "faiss"

    def __init__(self, path: Path, *, index: FaissIndexSetting = "auto") -> None:
        self.path = Path(path)
        self._graphs = GraphKeeper(index)
        self._lock = asyncio.Lock()  # held by every write and save
        self._dims: int | None = None
        self._model_version: str | None = None
        self._table = DocumentTable()
        self._snapshot: ExactSnapshot | GraphSnapshot | None = None  # what searches read; None after a write
        self._dirty = False
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
        self._dims, self._model_version = saved.dims, saved.model_version
        self._snapshot = None
        self._dirty = False

    async def info(self) -> StoreInfo:
        return StoreInfo(dims=self._dims, model_version=self._model_version, count=len(self._table))

    async def count(self) -> int:
        return len(self._table)

    async def upsert(self, documents: Sequence[ImageDocument]) -> None:
        if not documents:
            return
        vectors = self._checked_vectors(documents)
        self._writer_lock.acquire()
        async with self._lock:
            self._table.upsert(documents, vectors)
            self._written(doc.id for doc in documents)

    async def add(self, document: ImageDocument) -> bool:
        vectors = self._checked_vectors([document])
        self._writer_lock.acquire()
        async with self._lock:
            added = document.id not in self._table.rows
            if added:
                self._table.upsert([document], vectors)
                self._written([document.id])
        await self.flush()  # also when another add of the same id is still saving: on return it is on disk
        return added

    def _checked_vectors(self, documents: Sequence[ImageDocument]) -> np.ndarray:
        if self._dims is None:
            raise StoreError(f"the index at {self.path} is not open; call open() first")
        vectors = np.stack([np.asarray(doc.vector, dtype=np.float32).ravel() for doc in documents])
        if vectors.shape[1] != self._dims:
            raise StoreMismatchError(f"vectors have {vectors.shape[1]} dims; this index holds {self._dims}")
        check_model_version(documents, self._model_version)
        return vectors

    async def delete(self, ids: Sequence[str]) -> int:
        self._writer_lock.acquire()
        async with self._lock:
            gone = self._table.delete(ids)
            if gone:
                self._written(gone)
            return len(gone)

    def _written(self, ids: Iterable[str]) -> None:
        """After a write (under `self._lock`): the snapshot is stale, the file unsaved, the graph behind."""
        self._snapshot = None
        self._dirty = True
        self._graphs.note_changed(list(ids))

    async def remove(self, id: str) -> bool:
        removed = await self.delete([id]) > 0
        await self.flush()
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
        async with self._lock:
            if not self._dirty and self.path.exists():
                return
            self._writer_lock.acquire()
            await asyncio.to_thread(self._save, self._table, self._graphs.record())
            self._dirty = False

    def _save(self, table: DocumentTable, graph: GraphRecord | None) -> None:
        save_index(self.path, table, model_version=self._model_version, graph=graph)
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

    async def close(self) -> None:
        await self._graphs.cancel()
        self._writer_lock.release()
