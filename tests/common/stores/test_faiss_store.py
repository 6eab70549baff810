"""The embedded FAISS store: round trip, upsert idempotence, persistence, delete, mismatch; and its HNSW graph:
as good as exact search, every write seen at once, rebuilt when a tenth changed, narrow filters exact, auto's
switch at the measured size."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from factories import DIMS, MODEL_VERSION, make_document, make_documents, unit_vectors

from services.common.errors import IndexNotReadyError, StoreMismatchError, StoreUnavailableError
from services.common.stores.base import StoreQuery
from services.common.stores.faiss import FaissStore

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


async def test_unflushed_writes_are_not_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    store = await open_store(path)
    await store.upsert(make_documents(10))
    await store.flush()
    await store.upsert(make_documents(5, prefix="late"))
    assert await (await open_store(path)).count() == 10


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
    small = [replace(doc, vector=doc.vector[:4]) for doc in make_documents(2)]
    with pytest.raises(StoreMismatchError, match=f"vectors have 4 dims; this index holds {DIMS}"):
        await store.upsert(small)
    assert await store.count() == 0


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


# -- the HNSW graph (CBIR_FAISS_INDEX=hnsw, or auto above AUTO_HNSW_FROM) --------------------------------------


def brute_force(documents: list, vector: np.ndarray, k: int, *, skip: set[str] = frozenset()) -> list[str]:
    ranked = sorted((d for d in documents if d.id not in skip), key=lambda d: -float(np.dot(d.vector, vector)))
    return [d.id for d in ranked[:k]]


async def graph_store(tmp_path: Path, documents: list, **kwargs) -> FaissStore:
    store = FaissStore(tmp_path / "index.npz", index="hnsw", **kwargs)
    await store.open(dims=documents[0].vector.size, model_version=MODEL_VERSION)
    await store.upsert(documents)
    assert store.index_kind == "flat (hnsw building)"
    await store.wait_for_graph()
    assert store.index_kind == "hnsw"
    return store


async def test_the_graph_finds_what_exact_search_finds(tmp_path: Path) -> None:
    documents = make_documents(3000, seed=4)
    store = await graph_store(tmp_path, documents)
    probes = unit_vectors(40, seed=9)
    results = await store.search_many([StoreQuery(vector=v, k=10) for v in probes])
    recalls = [len({h.id for h in hits} & set(brute_force(documents, v, 10))) / 10
               for v, hits in zip(probes, results, strict=True)]
    assert np.mean(recalls) >= 0.99
    for v, hits in zip(probes, results, strict=True):
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert hits[0].score == pytest.approx(1.0 + max(float(np.dot(d.vector, v)) for d in documents), abs=1e-5)


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
    assert store.index_kind == "hnsw" and store._graph is not None and "new" not in store._graph.rows  # not rebuilt


async def test_a_tenth_of_the_documents_changed_rebuilds_the_graph(tmp_path: Path) -> None:
    documents = make_documents(200, seed=4)
    store = await graph_store(tmp_path, documents)
    first = store._graph
    await store.upsert(make_documents(30, prefix="more", seed=5))
    await store.search_many([StoreQuery(vector=documents[0].vector, k=1)])  # a search starts the rebuild
    await store.wait_for_graph()
    assert store._graph is not first and "more-0029" in store._graph.rows and not store._changed


async def test_a_narrow_filter_is_searched_exactly(tmp_path: Path) -> None:
    documents = make_documents(1000, seed=4, labels=("cat",) * 19 + ("dog",))  # 5% dogs
    store = await graph_store(tmp_path, documents)
    dogs = [d for d in documents if d.label == "dog"]
    probe = unit_vectors(1, seed=2)[0]
    [hits] = await store.search_many([StoreQuery(vector=probe, k=50, labels=frozenset({"dog"}))])
    assert [h.id for h in hits] == brute_force(dogs, probe, 50)  # all 50 dogs, in exact order


async def test_auto_uses_the_graph_from_the_measured_size_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.common.stores.faiss import store as faiss_store

    monkeypatch.setattr(faiss_store, "AUTO_HNSW_FROM", 100)
    store = FaissStore(tmp_path / "index.npz")  # auto
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
    assert again.index_kind == "hnsw" and again._graph is not None and again._graph.token in kept.name
    assert again._changed == {"late"}  # searched exactly beside the loaded graph
    [hits] = await again.search_many([StoreQuery(vector=documents[5].vector, k=2)])
    assert {h.id for h in hits} == {"late", "doc-0005"}
    await again.upsert(make_documents(60, prefix="more", seed=6))  # past a tenth: a new graph replaces the old
    await again.wait_for_graph()
    assert [p.name for p in tmp_path.glob("index.npz.*.hnsw")] == [f"index.npz.{again._graph.token}.hnsw"]
    flat = FaissStore(tmp_path / "index.npz", index="flat")  # the option changed: the graph is not used
    await flat.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    assert flat.index_kind == "flat" and flat._graph is None
