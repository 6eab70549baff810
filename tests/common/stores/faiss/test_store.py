"""`FaissStore` (services/common/stores/faiss/store.py): round trip, upsert idempotence, persistence, delete,
mismatch, one writer at a time, snapshots that writes replace; and its graph as the store drives it: every write
seen at once, rebuilt when a tenth changed, auto's switch at the measured size, kept beside the index for a restart.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from factories import DIMS, MODEL_VERSION, make_document, make_documents

from services.common.errors import IndexNotReadyError, StoreError, StoreMismatchError, StoreUnavailableError
from services.common.stores.base import StoreQuery
from services.common.stores.faiss import FaissStore
from services.common.stores.faiss import graph as faiss_graph
from services.common.stores.faiss.log import log_files
from services.common.stores.faiss.persistence import load_index

pytestmark = pytest.mark.anyio


async def open_store(path: Path, version: str = "v1") -> FaissStore:
    store = FaissStore(path)
    await store.open(dims=DIMS, model_version=version)
    return store


async def test_round_trip_returns_exact_cosine_ranking(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "index.npz")
    documents = make_documents(50)
    await store.upsert(documents)
    query = documents[7].vector
    hits = await store.search(query, 5)
    cosines = np.stack([d.vector for d in documents]) @ query
    expected = np.argsort(-cosines)[:5]
    assert [hit.id for hit in hits] == [f"doc-{i:04d}" for i in expected]
    assert hits[0].id == "doc-0007"
    assert hits[0].score == pytest.approx(2.0, abs=1e-5)
    assert [hit.score for hit in hits] == pytest.approx([c + 1.0 for c in cosines[expected]], abs=1e-5)
    assert hits[0].image.label == "horse" and hits[0].image.path == "train/horse/0007.jpg"


async def test_upsert_is_idempotent_and_overwrites(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "index.npz")
    await store.upsert(make_documents(20))
    await store.upsert(make_documents(20))
    assert await store.count() == 20
    moved = make_documents(20, seed=9)[0]
    await store.upsert([moved])
    assert await store.count() == 20
    hits = await store.search(moved.vector, 1)
    assert hits[0].id == "doc-0000" and hits[0].score == pytest.approx(2.0, abs=1e-5)


async def test_persists_across_restart(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    store = await open_store(path)
    documents = make_documents(30)
    await store.upsert(documents)
    await store.flush()
    reopened = await open_store(path)
    assert await reopened.count() == 30
    assert await reopened.existing_ids(["doc-0001", "doc-0029", "nope"]) == {"doc-0001", "doc-0029"}
    assert (await reopened.get("doc-0003")).filename == "0003.jpg"
    before = await store.search(documents[4].vector, 10)
    after = await reopened.search(documents[4].vector, 10)
    assert [h.id for h in before] == [h.id for h in after]


async def test_writes_since_the_last_fold_are_in_the_log_and_flush_folds_them(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    store = await open_store(path)
    await store.upsert(make_documents(10))
    await store.flush()
    await store.upsert(make_documents(5, prefix="late"))
    await store.delete(["doc-0003"])
    assert len(load_index(path).table) == 10 and len(log_files(path)) == 1  # the file as flushed, the rest logged
    assert await (await open_store(path)).count() == 14  # a reader replays the log
    await store.flush()
    assert len(load_index(path).table) == 14 and log_files(path) == []


async def test_delete_removes_documents(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "index.npz")
    documents = make_documents(10)
    await store.upsert(documents)
    assert await store.delete(["doc-0002", "doc-0005", "missing"]) == 2
    assert await store.count() == 8
    assert await store.get("doc-0002") is None
    hits = await store.search(documents[2].vector, 10)
    assert "doc-0002" not in {hit.id for hit in hits} and len(hits) == 8
    assert (await store.get("doc-0009")).path == "train/truck/0009.jpg"


async def test_k_larger_than_the_index_returns_everything(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "index.npz")
    await store.upsert(make_documents(4))
    assert len(await store.search(make_documents(1)[0].vector, 100)) == 4


async def test_other_model_version_or_dims_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    store = await open_store(path)
    await store.upsert(make_documents(3))
    await store.flush()
    with pytest.raises(StoreMismatchError, match="model version"):
        await open_store(path, version="v2")
    with pytest.raises(StoreMismatchError, match="dimensional"):
        await FaissStore(path).open(dims=DIMS + 1, model_version="v1")


async def test_missing_index_without_create_is_not_ready(tmp_path: Path) -> None:
    with pytest.raises(IndexNotReadyError, match="cbir index"):
        await FaissStore(tmp_path / "none.npz").open(dims=DIMS, model_version="v1", create=False)


@pytest.mark.parametrize("content", [b"", b"not an npz file", b"PK\x03\x04truncated"], ids=["empty", "garbage", "zip"])
@pytest.mark.parametrize("create", [False, True])
async def test_unreadable_index_is_not_ready(tmp_path: Path, content: bytes, create: bool) -> None:
    path = tmp_path / "index.npz"
    path.write_bytes(content)
    with pytest.raises(IndexNotReadyError, match=r"unreadable .*delete it and run `cbir index`"):
        await FaissStore(path).open(dims=DIMS, model_version="v1", create=create)


async def test_documents_of_another_model_or_size_are_a_mismatch(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "index.npz")
    with pytest.raises(StoreMismatchError, match="is from model 'v2', the index holds 'v1'"):
        await store.upsert(make_documents(2, model_version="v2"))
    with pytest.raises(StoreMismatchError, match="is from model 'v2', the index holds 'v1'"):
        await store.add(make_documents(1, model_version="v2")[0])
    small = [replace(doc, vector=doc.vector[:4]) for doc in make_documents(2)]
    with pytest.raises(StoreMismatchError, match=f"vectors have 4 dims; this index holds {DIMS}"):
        await store.upsert(small)
    assert await store.count() == 0
    assert not (tmp_path / "index.npz.lock").exists()  # refused before the writer's lock was taken


async def test_a_second_writer_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    first = await open_store(path)
    await first.upsert(make_documents(5))
    await first.flush()
    reader = await open_store(path)  # reading takes no lock
    assert await reader.count() == 5
    second = await open_store(path)
    writes = (lambda: second.upsert(make_documents(3, prefix="other")), second.reset,
              lambda: second.delete(["doc-0001"]))
    for write in writes:  # busy, not broken: unavailable until the first writer closes
        with pytest.raises(StoreUnavailableError, match=rf"another process \(pid {os.getpid()}\) is writing"):
            await write()
    await first.close()
    await second.upsert(make_documents(3, prefix="other"))
    await second.flush()
    assert await (await open_store(path)).count() == 8  # nothing the first writer stored was lost


async def test_a_search_reads_a_snapshot_that_writes_replace_but_never_change(tmp_path: Path) -> None:
    documents = make_documents(90, seed=3)
    store = await open_store(tmp_path / "index.npz")
    await store.upsert(documents)
    snapshot = store._take_snapshot()
    await store.delete(["doc-0004"])
    await store.upsert([make_document("new", documents[4].vector)])
    before = snapshot.search_many([StoreQuery(vector=documents[4].vector, k=1)])
    after = await store.search_many([StoreQuery(vector=documents[4].vector, k=1)])
    assert before[0][0].id == "doc-0004" and after[0][0].id == "new"


async def test_an_unopened_store_refuses_writes(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not open; call open"):
        await FaissStore(tmp_path / "index.npz").upsert(make_documents(1))


# -- the graph as the store drives it (CBIR_FAISS_INDEX=hnsw, or auto from AUTO_HNSW_FROM on) -------------------


async def graph_store(tmp_path: Path, documents: list, **kwargs) -> FaissStore:
    store = FaissStore(tmp_path / "index.npz", index="hnsw", **kwargs)
    await store.open(dims=documents[0].vector.size, model_version=MODEL_VERSION)
    await store.upsert(documents)
    assert store.index_kind == "flat (hnsw building)"
    await store.wait_for_graph()
    assert store.index_kind == "hnsw"
    return store


async def test_writes_after_the_graph_are_searched_at_once_and_deleted_ones_never_come_back(tmp_path: Path) -> None:
    documents = make_documents(500, seed=4)
    store = await graph_store(tmp_path, documents)
    newcomer = make_document("new", documents[7].vector)  # the same vector as doc-0007
    moved = make_document("doc-0003", documents[8].vector)  # doc-0003 rewritten with doc-0008's vector
    await store.upsert([newcomer, moved])
    await store.delete(["doc-0008", "doc-0007"])
    [hits] = await store.search_many([StoreQuery(vector=documents[7].vector, k=3)])
    assert hits[0].id == "new" and hits[0].score == pytest.approx(2.0, abs=1e-5)
    [hits] = await store.search_many([StoreQuery(vector=documents[8].vector, k=3)])
    assert hits[0].id == "doc-0003" and {h.id for h in hits}.isdisjoint({"doc-0007", "doc-0008"})
    [hits] = await store.search_many([StoreQuery(vector=documents[3].vector, k=500)])
    assert len(hits) == 499 and len({h.id for h in hits}) == 499  # every document once, none deleted
    graph = store._graphs.graph
    assert store.index_kind == "hnsw" and graph is not None and "new" not in graph.rows  # not rebuilt


async def test_a_tenth_of_the_documents_changed_rebuilds_the_graph(tmp_path: Path) -> None:
    documents = make_documents(200, seed=4)
    store = await graph_store(tmp_path, documents)
    first = store._graphs.graph
    await store.upsert(make_documents(30, prefix="more", seed=5))
    await store.search_many([StoreQuery(vector=documents[0].vector, k=1)])  # a search starts the rebuild
    await store.wait_for_graph()
    graph = store._graphs.graph
    assert graph is not first and "more-0029" in graph.rows and not store._graphs.changed


async def test_auto_uses_the_graph_from_the_measured_size_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faiss_graph, "AUTO_HNSW_FROM", 100)
    store = FaissStore(tmp_path / "index.npz")  # auto
    assert store.index_setting == "auto"
    await store.open(dims=16, model_version=MODEL_VERSION)
    await store.upsert(make_documents(99))
    assert store.index_kind == "flat"
    await store.upsert(make_documents(1, prefix="one-more"))
    assert store.index_kind == "flat (hnsw building)"
    await store.wait_for_graph()
    assert store.index_kind == "hnsw"
    assert FaissStore(tmp_path / "flat.npz", index="flat").index_kind == "flat"


async def test_a_writing_store_keeps_its_graph_and_a_restart_loads_it(tmp_path: Path) -> None:
    documents = make_documents(400, seed=4)
    store = await graph_store(tmp_path, documents)
    [kept] = list(tmp_path.glob("index.npz.*.hnsw"))
    await store.upsert([make_document("late", documents[5].vector)])  # written after the graph
    await store.flush()
    await store.close()
    again = FaissStore(tmp_path / "index.npz", index="hnsw")
    await again.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    graph = again._graphs.graph
    assert again.index_kind == "hnsw" and graph is not None and graph.token in kept.name
    assert again._graphs.changed == {"late"}  # searched exactly beside the loaded graph
    [hits] = await again.search_many([StoreQuery(vector=documents[5].vector, k=2)])
    assert {h.id for h in hits} == {"late", "doc-0005"}
    await again.upsert(make_documents(60, prefix="more", seed=6))  # past a tenth: a new graph replaces the old
    await again.wait_for_graph()
    assert [p.name for p in tmp_path.glob("index.npz.*.hnsw")] == [f"index.npz.{again._graphs.graph.token}.hnsw"]
    flat = FaissStore(tmp_path / "index.npz", index="flat")  # the setting changed: the graph is not used
    await flat.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    assert flat.index_kind == "flat" and flat._graphs.graph is None


async def test_a_reading_store_builds_its_graph_but_keeps_no_file(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    writer = await open_store(path)
    await writer.upsert(make_documents(300, seed=4))
    await writer.flush()
    await writer.close()
    reader = FaissStore(path, index="hnsw")
    await reader.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    await reader.wait_for_graph()
    assert reader.index_kind == "hnsw" and reader._graphs.graph.token == ""
    assert list(tmp_path.glob("index.npz.*.hnsw")) == []
    await (await open_store(path)).upsert(make_documents(1, prefix="other"))  # the reader took no lock
