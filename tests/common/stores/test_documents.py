"""The document side of both stores: what a document records survives a round trip (a null label stays
null), adds are create-only and immediately durable and searchable, removes are immediate, vectors are read
back by id, documents are listed by source, counted by source and label, and an index of an older
document schema asks for a rebuild instead of being read half-filled.

Every test runs over the FAISS store and the Elasticsearch store on the HTTP double (tests/es_double.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from es_double import EsDouble
from factories import MODEL_VERSION, SOURCE, make_document, make_documents

from services.common.errors import StoreMismatchError
from services.common.stores.base import StoreQuery, VectorStore
from services.common.stores.elasticsearch import store as elasticsearch_store
from services.common.stores.faiss import FaissStore

if TYPE_CHECKING:
    from es_fixtures import MakeEsStore

pytestmark = pytest.mark.anyio
DIMS = 16


@pytest.fixture(params=["faiss", "elasticsearch"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, make_es_store: MakeEsStore) -> VectorStore:
    store: VectorStore = FaissStore(tmp_path / "index.npz") if request.param == "faiss" else make_es_store()
    await store.open(dims=DIMS, model_version=MODEL_VERSION)
    documents = make_documents(30, labels=("cat", None, "dog"), predicted=("dog", "cat", "cat"))
    documents += make_documents(5, prefix="other", seed=1, source="/elsewhere")
    await store.upsert(documents)
    await store.flush()
    return store


def reopened(store: VectorStore) -> FaissStore:
    """A second FAISS store on the same file: what a restart would read."""
    assert isinstance(store, FaissStore)
    return FaissStore(store.path)


async def test_every_field_round_trips_and_a_null_label_stays_null(store: VectorStore) -> None:
    expected = make_documents(30, labels=("cat", None, "dog"), predicted=("dog", "cat", "cat"))
    assert await store.get("doc-0001") == expected[1].stored()
    assert (await store.get("doc-0001")).label is None
    [hit] = await store.search(expected[1].vector, 1)
    assert hit.image == expected[1].stored()
    if isinstance(store, FaissStore):
        again = reopened(store)
        await again.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
        assert await again.get("doc-0001") == expected[1].stored()
        assert (await again.get("doc-0000")).label == "cat"


async def test_add_is_create_only_and_immediately_durable_and_searchable(store: VectorStore) -> None:
    vector = np.eye(DIMS, dtype=np.float32)[3]
    document = make_document("upload-1", vector, source="upload", label=None, predicted_label="ship")
    assert await store.add(document) is True
    [hit] = await store.search(vector, 1)  # no flush: add makes it searchable
    assert hit.id == "upload-1" and hit.score == pytest.approx(2.0, abs=1e-5)
    other = make_document("upload-1", np.eye(DIMS, dtype=np.float32)[4], source="upload", label="cat")
    assert await store.add(other) is False  # the id exists: nothing changes
    assert await store.get("upload-1") == document.stored()
    np.testing.assert_allclose((await store.vectors(["upload-1"]))["upload-1"], vector, atol=1e-6)
    assert await store.count() == 36
    if isinstance(store, FaissStore):
        await store.close()
        again = reopened(store)
        await again.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
        assert await again.get("upload-1") == document.stored()


async def test_concurrent_adds_of_one_id_store_it_once(store: VectorStore) -> None:
    vectors = np.eye(DIMS, dtype=np.float32)
    added = await asyncio.gather(*(store.add(make_document("same", vectors[i], source="upload")) for i in range(6)))
    assert sorted(added) == [False] * 5 + [True]
    assert await store.count() == 36
    assert len([doc async for doc in store.iter_documents(source="upload")]) == 1


async def test_remove_is_immediate_and_says_whether_it_existed(store: VectorStore) -> None:
    vector = (await store.vectors(["doc-0004"]))["doc-0004"]
    assert await store.remove("doc-0004") is True
    assert await store.remove("doc-0004") is False
    assert await store.get("doc-0004") is None and await store.vectors(["doc-0004"]) == {}
    hits = await store.search(vector, 35)
    assert "doc-0004" not in {hit.id for hit in hits} and len(hits) == 34
    if isinstance(store, FaissStore):
        await store.close()
        again = reopened(store)
        await again.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
        assert await again.get("doc-0004") is None and await again.count() == 34


async def test_vectors_are_read_back_by_id(store: VectorStore) -> None:
    expected = make_documents(30, labels=("cat", None, "dog"))
    found = await store.vectors(["doc-0002", "doc-0029", "nope", "doc-0002"])
    assert sorted(found) == ["doc-0002", "doc-0029"]
    for doc_id in found:
        np.testing.assert_allclose(found[doc_id], expected[int(doc_id[-4:])].vector, atol=1e-6)


async def test_documents_are_listed_by_source_in_id_order(store: VectorStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(elasticsearch_store, "SCAN_PAGE", 7)  # several search_after pages on Elasticsearch
    mine = [doc async for doc in store.iter_documents(source=SOURCE)]
    assert [doc.id for doc in mine] == [f"doc-{i:04d}" for i in range(30)]
    assert mine[3] == make_documents(30, labels=("cat", None, "dog"), predicted=("dog", "cat", "cat"))[3].stored()
    assert [doc.id for doc in [d async for d in store.iter_documents(source="/elsewhere")]] == [
        f"other-{i:04d}" for i in range(5)]
    assert len([doc async for doc in store.iter_documents()]) == 35
    assert [doc async for doc in store.iter_documents(source="/nowhere")] == []


async def test_stats_count_documents_by_source_and_label(store: VectorStore) -> None:
    stats = await store.stats()
    assert stats.documents == 35
    assert stats.sources == {SOURCE: 30, "/elsewhere": 5}
    # other-*: airplane, automobile, bird, cat, deer (the factory's default labels)
    assert stats.labels == {"airplane": 1, "automobile": 1, "bird": 1, "cat": 11, "deer": 1, "dog": 10}
    assert stats.unlabelled == 10


async def test_a_filter_on_predicted_labels_uses_the_stored_prediction(store: VectorStore) -> None:
    probe = np.ones(DIMS, dtype=np.float32) / 4
    [hits] = await store.search_many([StoreQuery(vector=probe, k=40, predicted_labels=frozenset({"dog"}))])
    assert {hit.id for hit in hits} == {f"doc-{i:04d}" for i in range(0, 30, 3)}


async def test_a_faiss_file_of_the_older_schema_asks_for_a_rebuild(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    np.savez(path, vectors=np.eye(3, DIMS, dtype=np.float32), model_version=np.asarray(MODEL_VERSION),
             ids=np.asarray(["a", "b", "c"]), filenames=np.asarray(["a.jpg"] * 3), paths=np.asarray(["x"] * 3),
             labels=np.asarray(["cat"] * 3))  # what the store wrote before documents had a source
    store = FaissStore(path)
    with pytest.raises(StoreMismatchError, match="schema 1.*--rebuild"):
        await store.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    await store.reset()
    await store.open(dims=DIMS, model_version=MODEL_VERSION)
    assert await store.count() == 0


async def test_an_elasticsearch_index_of_the_older_schema_asks_for_a_rebuild_and_an_empty_one_is_claimed(
        es_double: EsDouble, make_es_store: MakeEsStore) -> None:
    store = make_es_store()
    await store.open(dims=DIMS, model_version=MODEL_VERSION)
    index = es_double.indices[store.index]
    index.mappings["_meta"] = {"model_version": MODEL_VERSION}  # as written before the schema was recorded
    await store.upsert(make_documents(3))
    await store.flush()
    with pytest.raises(StoreMismatchError, match="schema 1"):
        await make_es_store().open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    await store.reset()  # empty again, and re-created with today's mapping
    index = es_double.indices[store.index]
    for name in ("source", "predicted_label", "confidence", "size", "mtime"):
        del index.mappings["properties"][name]
    index.mappings["_meta"] = {"model_version": "older"}
    claimed = make_es_store()
    await claimed.open(dims=DIMS, model_version=MODEL_VERSION)  # empty: claimed, its mapping brought up to date
    assert es_double.indices[store.index].mappings["_meta"] == {"model_version": MODEL_VERSION, "schema": 2}
    await claimed.upsert(make_documents(2))  # the strict mapping now has every field
