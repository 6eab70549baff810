"""The FAISS store's HNSW graph (services/common/stores/faiss/graph.py): when the setting wants one and when it is
due, its build and its file beside the index, and a search through it that finds what exact search finds, sees the
documents written since, and searches a narrow filter exactly."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from factories import brute_force, make_document, make_documents, unit_vectors

from services.common.documents import ImageDocument
from services.common.stores.base import StoreQuery
from services.common.stores.faiss import graph as faiss_graph
from services.common.stores.faiss.graph import (
    Graph,
    GraphKeeper,
    GraphSnapshot,
    discard_other_graphs,
    graph_file,
)
from services.common.stores.faiss.persistence import GraphRecord
from services.common.stores.faiss.table import DocumentTable


def table_of(documents: list[ImageDocument]) -> DocumentTable:
    table = DocumentTable(dims=documents[0].vector.size)
    table.upsert(documents, np.stack([doc.vector for doc in documents]))
    return table


def graph_snapshot(table: DocumentTable, graph: Graph, changed: frozenset[str] = frozenset()) -> GraphSnapshot:
    return GraphSnapshot(graph=graph, changed=changed, rows=dict(table.rows), docs=tuple(table.docs),
                         vectors=table.vectors)


def test_the_setting_and_the_size_say_whether_a_graph_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faiss_graph, "AUTO_HNSW_FROM", 100)
    assert [GraphKeeper("auto").searched(n) for n in (99, 100)] == ["flat", "flat (hnsw building)"]
    assert [GraphKeeper("hnsw").searched(n) for n in (0, 10**7)] == ["flat (hnsw building)"] * 2
    assert [GraphKeeper("flat").searched(n) for n in (0, 10**7)] == ["flat"] * 2
    keeper = GraphKeeper("auto")
    keeper.graph = Graph.build(("a",), unit_vectors(1))
    assert keeper.searched(100) == "hnsw" and keeper.searched(99) == "flat"  # below the size: exact again


def test_a_graph_is_due_when_none_is_there_or_more_than_a_tenth_changed() -> None:
    keeper = GraphKeeper("hnsw")
    assert keeper.due(50) and not GraphKeeper("flat").due(50)
    keeper.graph = Graph.build(tuple(f"doc-{i}" for i in range(50)), unit_vectors(50))
    keeper.note_changed([f"doc-{i}" for i in range(5)])
    assert keeper.changed == {f"doc-{i}" for i in range(5)} and not keeper.due(50)  # a tenth: not yet
    keeper.note_changed(["new"])
    assert keeper.due(50)


@pytest.mark.anyio
async def test_a_build_runs_aside_and_keeps_what_was_written_meanwhile() -> None:
    table = table_of(make_documents(200, seed=4))
    keeper, built = GraphKeeper("hnsw"), asyncio.Event()
    seen: list[Graph] = []

    async def on_built(graph: Graph) -> None:
        seen.append(graph)
        built.set()

    keeper.start(table.ids(), table.vectors, keep_beside=None, on_built=on_built)
    assert not keeper.due(len(table))  # one build at a time
    keeper.note_changed(["doc-0001", "late"])  # written while it builds
    await keeper.wait()
    assert built.is_set() and seen == [keeper.graph] and keeper.graph.token == ""
    assert keeper.changed == {"doc-0001", "late"} and len(keeper.graph.ids) == 200
    assert keeper.record() is None  # not kept beside an index: nothing for the file to record


@pytest.mark.anyio
async def test_cancel_stops_a_build_under_way(monkeypatch: pytest.MonkeyPatch) -> None:
    table = table_of(make_documents(50))
    keeper, started, release = GraphKeeper("hnsw"), threading.Event(), threading.Event()
    build = Graph.build

    def held_build(ids: tuple[str, ...], vectors: np.ndarray, *, path: Path | None = None) -> Graph:
        started.set()
        release.wait(30)
        return build(ids, vectors, path=path)

    async def on_built(graph: Graph) -> None:
        raise AssertionError("a cancelled build is never reported")

    monkeypatch.setattr(Graph, "build", staticmethod(held_build))
    keeper.start(table.ids(), table.vectors, keep_beside=None, on_built=on_built)
    assert await asyncio.to_thread(started.wait, 30)  # in its worker thread now
    await keeper.cancel()
    release.set()
    assert keeper.graph is None and keeper.due(len(table))  # no build under way: the next one may start


def test_a_kept_graph_is_read_back_and_one_that_does_not_match_is_not(tmp_path: Path) -> None:
    index_path, ids = tmp_path / "index.npz", tuple(f"doc-{i}" for i in range(30))
    kept = Graph.build(ids, unit_vectors(30), path=index_path)
    assert len(kept.token) == 12 and [p.name for p in tmp_path.iterdir()] == [graph_file(index_path, kept.token).name]
    again = Graph.read(index_path, kept.token, ids)
    assert again is not None and again.index.ntotal == 30 and again.rows == kept.rows
    assert Graph.read(index_path, kept.token, ids[:29]) is None  # not the graph of these documents
    assert Graph.read(index_path, "missing", ids) is None


def test_restore_takes_up_the_recorded_graph_only_when_it_is_wanted_and_there(tmp_path: Path) -> None:
    index_path, ids = tmp_path / "index.npz", tuple(f"doc-{i}" for i in range(30))
    kept = Graph.build(ids, unit_vectors(30), path=index_path)
    record = GraphRecord(kept.token, ids, frozenset({"doc-1"}))
    keeper = GraphKeeper("hnsw")
    keeper.restore(record, index_path, 30)
    assert keeper.graph is not None and keeper.changed == {"doc-1"} and keeper.record() == record
    keeper.restore(GraphRecord("missing", ids, frozenset({"doc-1"})), index_path, 30)
    assert keeper.graph is None and keeper.changed == set()
    flat = GraphKeeper("flat")
    flat.restore(record, index_path, 30)
    assert flat.graph is None


def test_only_the_graph_the_index_names_stays_beside_it(tmp_path: Path) -> None:
    index_path = tmp_path / "index.npz"
    old, new = (Graph.build(("a",), unit_vectors(1), path=index_path) for _ in range(2))
    other = tmp_path / "other.npz.x.hnsw"
    other.write_bytes(b"")
    discard_other_graphs(index_path, keep=new.token)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([graph_file(index_path, new.token).name, other.name])
    assert old.token != new.token
    discard_other_graphs(index_path, keep=None)
    assert [p.name for p in tmp_path.iterdir()] == [other.name]


def test_the_graph_finds_what_exact_search_finds() -> None:
    documents = make_documents(3000, seed=4)
    table = table_of(documents)
    snapshot = graph_snapshot(table, Graph.build(table.ids(), table.vectors))
    probes = unit_vectors(40, seed=9)
    results = snapshot.search_many([StoreQuery(vector=v, k=10) for v in probes])
    recalls = [len({h.id for h in hits} & set(brute_force(documents, StoreQuery(vector=v, k=10)))) / 10
               for v, hits in zip(probes, results, strict=True)]
    assert np.mean(recalls) >= 0.99
    for v, hits in zip(probes, results, strict=True):
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert hits[0].score == pytest.approx(1.0 + max(float(np.dot(d.vector, v)) for d in documents), abs=1e-5)


def test_documents_written_since_the_graph_are_searched_exactly_and_its_stale_copies_never_found() -> None:
    documents = make_documents(300, seed=4)
    table = table_of(documents)
    graph = Graph.build(table.ids(), table.vectors)
    rewritten = make_document("doc-0003", documents[8].vector)  # doc-0003 moved onto doc-0008's vector
    table.upsert([rewritten, make_document("new", documents[7].vector)], np.stack([documents[8].vector,
                                                                                   documents[7].vector]))
    table.delete(["doc-0007", "doc-0008"])
    snapshot = graph_snapshot(table, graph, frozenset({"doc-0003", "new", "doc-0007", "doc-0008"}))
    [near7, near8, near3, excluded] = snapshot.search_many([
        StoreQuery(vector=documents[7].vector, k=2), StoreQuery(vector=documents[8].vector, k=2),
        StoreQuery(vector=documents[3].vector, k=300), StoreQuery(vector=documents[7].vector, k=1,
                                                                  exclude_ids=frozenset({"new"}))])
    assert near7[0].id == "new" and near8[0].id == "doc-0003"
    assert [h.id for h in near3].count("doc-0003") == 1 and len(near3) == 299  # every document once, none deleted
    assert excluded[0].id not in {"new", "doc-0007"}


def test_a_narrow_filter_is_searched_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    documents = make_documents(1000, seed=4, labels=("cat",) * 19 + ("dog",))  # 5% dogs
    table = table_of(documents)
    snapshot = graph_snapshot(table, Graph.build(table.ids(), table.vectors))
    monkeypatch.setattr(snapshot.graph.index, "search", lambda *args, **kwargs: pytest.fail("the graph was walked"))
    query = StoreQuery(vector=unit_vectors(1, seed=2)[0], k=50, labels=frozenset({"dog"}))
    [hits] = snapshot.search_many([query])
    assert [h.id for h in hits] == brute_force(documents, query)  # all 50 dogs, in exact order
    assert len(hits) == 50


def test_a_keeper_snapshot_is_of_the_graph_only_while_one_answers() -> None:
    table = table_of(make_documents(20))
    keeper = GraphKeeper("hnsw")
    assert keeper.snapshot(table) is None  # none built yet: exact search answers
    keeper.graph = Graph.build(table.ids(), table.vectors)
    keeper.note_changed(["doc-0001"])
    snapshot = keeper.snapshot(table)
    assert snapshot is not None and snapshot.changed == {"doc-0001"} \
        and np.shares_memory(snapshot.vectors, table.vectors)
    keeper.setting = "flat"
    assert keeper.snapshot(table) is None
