"""The FAISS store's HNSW graph: when the setting wants one (`GraphKeeper`), its build in a worker thread and its file
beside the index (`Graph`), and the approximate search that sees every write since (`GraphSnapshot`).

Search is exact for the collections of one machine; from `AUTO_HNSW_FROM` documents on (`CBIR_FAISS_INDEX=auto`,
measured by bench/scale.py: reports/scale.md), or always with `hnsw`, an HNSW graph answers instead. The graph is
built from the documents as they are then, and replaced by a new one once a tenth of the documents changed since;
the documents written meanwhile are searched exactly beside it and the graph's copies of changed or deleted ones
are filtered out, so a search always sees every write. A filtered query that lets through few documents is
searched exactly (a graph walked through a narrow filter misses neighbours). A store that writes keeps each graph
it builds beside the index (`<index>.<token>.hnsw`, written once, atomically) and records it in the index file with
the documents changed since, so a restart loads it instead of building it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from services.common.documents import StoreHit
from services.common.scoring import score_from_cosine
from services.common.settings import FaissIndexSetting
from services.common.stores.base import StoreQuery
from services.common.stores.faiss.persistence import GraphRecord
from services.common.stores.faiss.table import DocumentTable, FrozenTable

logger = logging.getLogger(__name__)

# CBIR_FAISS_INDEX=auto uses the graph from this many documents on, with these parameters: bench/scale.py's
# rule (exact search's p50 past a tenth of the model's time per query) and its smallest efSearch whose
# recall@100 stayed >= 0.99 at every size measured (reports/scale.md, 2026-12-01).
AUTO_HNSW_FROM = 1_000_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 512
REBUILD_AFTER = 0.1  # share of documents changed since the graph was built that makes it rebuild
EXACT_BELOW = 0.2  # a filter letting through less than this share of documents is searched exactly

# The state (`FaissStore.index_kind`, reported as `index`): which index answers searches now.
SearchedIndex = Literal["flat", "hnsw", "flat (hnsw building)"]


def graph_file(index_path: Path, token: str) -> Path:
    """Where the graph named `token` of the index at `index_path` is kept."""
    return index_path.with_name(f"{index_path.name}.{token}.hnsw")


def discard_other_graphs(index_path: Path, keep: str | None) -> None:
    """Delete the graph files beside the index but the one named `keep` (the one the index file names)."""
    for stale in index_path.parent.glob(index_path.name + ".*.hnsw"):
        if keep is None or stale.name != graph_file(index_path, keep).name:
            stale.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class Graph:
    """An HNSW graph of the documents as they were when it was built: `ids[row]` is row's document; `token`
    names its file beside the index ("" when it was not kept)."""

    index: faiss.IndexHNSWFlat
    ids: tuple[str, ...]
    rows: dict[str, int]
    token: str = ""

    @classmethod
    def build(cls, ids: tuple[str, ...], vectors: np.ndarray, *, path: Path | None = None) -> Graph:
        """Build the graph; with `path` (the index file), also keep it beside it, atomically."""
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(np.ascontiguousarray(vectors[:len(ids)]))
        token = ""
        if path is not None:
            token = uuid.uuid4().hex[:12]
            target = graph_file(path, token)
            tmp = target.with_name(target.name + ".tmp")
            faiss.write_index(index, str(tmp))
            os.replace(tmp, target)
        return cls(index=index, ids=ids, rows={doc_id: row for row, doc_id in enumerate(ids)}, token=token)

    @classmethod
    def read(cls, path: Path, token: str, ids: tuple[str, ...]) -> Graph | None:
        """The graph kept beside `path`, or None when its file is missing or does not match (then it is built)."""
        try:
            index = faiss.read_index(str(graph_file(path, token)))
        except RuntimeError as exc:  # FAISS's error for a missing or unreadable file
            logger.warning("the HNSW graph %s of %s cannot be read (%s); building it again", token, path, exc)
            return None
        if index.ntotal != len(ids):
            return None
        return cls(index=index, ids=ids, rows={doc_id: row for row, doc_id in enumerate(ids)}, token=token)


class GraphKeeper:
    """The graph of one store over time: whether `setting` wants one at the store's size, the graph built last,
    the ids written or deleted since (searched exactly beside it), and the build under way in a worker thread.

    >>> graphs = GraphKeeper("hnsw")
    >>> if graphs.due(len(table)): graphs.start(table.ids(), table.vectors, keep_beside=None, on_built=note)
    >>> snapshot = graphs.snapshot(table) or table.exact_snapshot(dims=16)
    """

    def __init__(self, setting: FaissIndexSetting) -> None:
        self.setting = setting
        self.graph: Graph | None = None  # once built (or loaded)
        self.changed: set[str] = set()  # ids written or deleted since the graph was built
        self._changed_during_build: set[str] | None = None  # the same, while a new graph is being built
        self._building: asyncio.Task[None] | None = None

    def wanted(self, count: int) -> bool:
        """Whether the setting has a graph answer searches over `count` documents."""
        return self.setting == "hnsw" or (self.setting == "auto" and count >= AUTO_HNSW_FROM)

    def searched(self, count: int) -> SearchedIndex:
        """What answers searches over `count` documents now: `flat`, `hnsw`, or `flat (hnsw building)`."""
        if self.wanted(count):
            return "hnsw" if self.graph is not None else "flat (hnsw building)"
        return "flat"

    def note_changed(self, ids: Sequence[str]) -> None:
        """After a write: the graph (and the one being built) is behind on `ids`."""
        if self.graph is not None:
            self.changed.update(ids)
        if self._changed_during_build is not None:
            self._changed_during_build.update(ids)

    def due(self, count: int) -> bool:
        """A build should start: a graph is wanted, none is being built, and there is none or the one there is has
        fallen a tenth behind."""
        if not self.wanted(count) or (self._building is not None and not self._building.done()):
            return False
        return self.graph is None or len(self.changed) > REBUILD_AFTER * max(count, 1)

    def start(self, ids: tuple[str, ...], vectors: np.ndarray, *, keep_beside: Path | None,
              on_built: Callable[[Graph], Awaitable[None]]) -> None:  # fmt: skip
        """Build a graph of `ids`/`vectors` (never changed in place) in a worker thread, kept beside the index at
        `keep_beside` when given; once it answers searches, await `on_built(graph)`."""
        self._changed_during_build = set()
        self._building = asyncio.get_running_loop().create_task(self._build(ids, vectors, keep_beside, on_built))

    async def _build(self, ids: tuple[str, ...], vectors: np.ndarray, keep_beside: Path | None,
                     on_built: Callable[[Graph], Awaitable[None]]) -> None:  # fmt: skip
        started = time.perf_counter()
        try:
            graph = await asyncio.to_thread(Graph.build, ids, vectors, path=keep_beside)
        except BaseException:
            self._changed_during_build = None
            raise
        self.graph, self.changed = graph, self._changed_during_build or set()
        self._changed_during_build = None
        logger.info("built the HNSW graph of %d documents in %.1f s (%d written since)", len(ids),
                    time.perf_counter() - started, len(self.changed))
        await on_built(graph)

    async def wait(self) -> None:
        """Wait for the build under way, if any (shielded: a cancelled waiter leaves the build running)."""
        if self._building is not None:
            await asyncio.shield(self._building)

    async def cancel(self) -> None:
        """Stop the build under way, if any."""
        if self._building is not None and not self._building.done():
            self._building.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._building

    def clear(self) -> None:
        """Forget the graph: the documents it was built from are gone."""
        self.graph, self.changed = None, set()

    def restore(self, record: GraphRecord | None, index_path: Path, count: int) -> None:
        """Take up the graph an index file of `count` documents records, when it is wanted and its file is there."""
        self.clear()
        if record is not None and self.wanted(count):
            self.graph = Graph.read(index_path, record.token, record.ids)
            self.changed = set(record.changed) if self.graph is not None else set()

    def record(self) -> GraphRecord | None:
        """What the index file should record of the graph: None when there is none or it was not kept."""
        if self.graph is None or not self.graph.token:
            return None
        return GraphRecord(self.graph.token, self.graph.ids, frozenset(self.changed))

    def snapshot(self, table: DocumentTable) -> GraphSnapshot | None:
        """The graph and `table` as they are now, when a graph is to answer searches; None when exact search is."""
        if self.graph is None or not self.wanted(len(table)):
            return None
        return GraphSnapshot(graph=self.graph, changed=frozenset(self.changed), rows=dict(table.rows),
                             docs=tuple(table.docs), vectors=table.vectors)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraphSnapshot(FrozenTable):
    """The graph, the documents changed since it was built (searched exactly beside it; their graph copies
    filtered out), and the table as of one moment: an exact search's answers, approximately."""

    graph: Graph
    changed: frozenset[str]
    vectors: np.ndarray  # the table's, never changed in place

    def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        return [self._search(query) for query in queries]

    def _search(self, query: StoreQuery) -> list[StoreHit]:
        vector = np.asarray(query.vector, dtype=np.float32).ravel()
        depth = query.offset + query.k
        allowed = self.passing_rows(*query.filter_key)  # None: every document
        if allowed is not None and len(allowed) < EXACT_BELOW * len(self.docs):
            return self._page(self._exact(vector, allowed, depth), query)
        # The graph, minus its copies of documents changed since, restricted to the filter ...
        selector, keep = self._graph_selector(query, allowed)
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

    def _graph_selector(self, query: StoreQuery, allowed: np.ndarray | None) -> tuple[faiss.IDSelector | None, tuple]:
        """The selector of the graph's rows a query may find (None: all), and what it points to, to keep alive."""
        stale = {self.graph.rows[i] for i in self.changed | query.exclude_ids if i in self.graph.rows}
        if allowed is not None:
            in_graph = (self.graph.rows.get(self.docs[row].id) for row in allowed)
            graph_rows = np.asarray(sorted(r for r in in_graph if r is not None and r not in stale), dtype=np.int64)
            selector = faiss.IDSelectorBatch(graph_rows)
            return selector, (selector,)
        if stale:
            inner = faiss.IDSelectorBatch(np.asarray(sorted(stale), dtype=np.int64))
            selector = faiss.IDSelectorNot(inner)
            return selector, (selector, inner)
        return None, ()

    def _exact(self, vector: np.ndarray, rows: np.ndarray, depth: int) -> list[tuple[float, int]]:
        if not len(rows):
            return []
        cosines = self.vectors[rows] @ vector
        best = np.argsort(-cosines, kind="stable")[:depth]
        return [(float(cosines[i]), int(rows[i])) for i in best]

    def _page(self, found: list[tuple[float, int]], query: StoreQuery) -> list[StoreHit]:
        return [StoreHit(self.docs[row], score_from_cosine(cosine))
                for cosine, row in found[query.offset:query.offset + query.k]]
