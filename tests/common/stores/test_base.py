"""The `VectorStore` contract (services/common/stores/base.py), over both stores: the FAISS store and the
Elasticsearch store on the HTTP double (tests/es_double.py); and base.py's own checks.

- Documents: what a document records survives a round trip (a null label stays null), adds are create-only and
  immediately durable and searchable, removes are immediate, vectors are read back by id, documents are listed
  by source, counted by source and label, and an index of another document schema asks for a rebuild instead of
  being read half-filled.
- Search: filters, pages and exclusions answered like a brute-force ranking, bad query vectors refused before
  anything is searched. Exact modes must give equal answers; Elasticsearch's kNN, approximate per shard, is held
  to a recall bound against the brute-force ranking instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from es_double import EsDouble
from factories import DIMS, MODEL_VERSION, SOURCE, brute_force, make_document, make_documents, unit_vectors

from services.common.documents import DOCUMENT_SCHEMA, ImageDocument
from services.common.errors import StoreError, StoreMismatchError
from services.common.stores.base import (
    StoreInfo,
    StoreQuery,
    VectorStore,
    check_compatible,
    check_model_version,
    check_query_vector,
)
from services.common.stores.elasticsearch import store as elasticsearch_store
from services.common.stores.faiss import FaissStore

if TYPE_CHECKING:
    from es_fixtures import MakeEsStore

pytestmark = pytest.mark.anyio

# -- base.py's checks ------------------------------------------------------------------------------------------

INFO = StoreInfo(dims=DIMS, model_version=MODEL_VERSION, count=3)


def test_an_index_of_the_model_and_schema_is_compatible_and_an_empty_one_of_another_is_claimed() -> None:
    check_compatible(INFO, dims=DIMS, model_version=MODEL_VERSION, where="here")
    empty = StoreInfo(dims=None, model_version="older", count=0, schema=1)
    check_compatible(empty, dims=DIMS, model_version=MODEL_VERSION, where="here")


@pytest.mark.parametrize(("info", "message"), [
    (replace(INFO, dims=8), f"here holds 8-dimensional vectors but the model produces {DIMS}; "),
    (replace(INFO, model_version="older"), "here was built by model version 'older' but the model is 'v1'"),
    (replace(INFO, schema=1), f"here holds documents of schema 1, not {DOCUMENT_SCHEMA}; "),
    (replace(INFO, schema=None), f"here holds documents of schema None, not {DOCUMENT_SCHEMA}; "),
], ids=["dims", "model", "older-schema", "unknown-schema"])  # fmt: skip
def test_an_index_of_other_dims_model_or_schema_is_a_mismatch_naming_the_rebuild(info: StoreInfo, message: str) -> None:
    with pytest.raises(StoreMismatchError) as raised:
        check_compatible(info, dims=DIMS, model_version=MODEL_VERSION, where="here")
    assert raised.value.message.startswith(message) and raised.value.message.endswith("(cbir index --rebuild)")


def test_documents_of_another_model_are_refused_naming_the_first() -> None:
    check_model_version(make_documents(3), MODEL_VERSION)
    mixed = make_documents(2) + make_documents(2, prefix="new", model_version="v2")
    with pytest.raises(StoreMismatchError, match=r"^document new-0000 is from model 'v2', the index holds 'v1'$"):
        check_model_version(mixed, MODEL_VERSION)


def test_a_query_vector_of_the_index_size_passes_and_one_of_another_is_a_mismatch() -> None:
    check_query_vector(unit_vectors(1)[0], dims=DIMS, where="here")
    check_query_vector(np.ones(3), dims=None, where="here")  # an index of unknown size takes any
    with pytest.raises(StoreMismatchError, match=f"^the query vector has 4 dims; here holds {DIMS}$"):
        check_query_vector(np.ones(4, dtype=np.float32), dims=DIMS, where="here")


@pytest.mark.parametrize(("vector", "problem"), [(np.zeros(DIMS), "all zeros"), (np.full(DIMS, np.nan), "not finite"),
                                                 (np.r_[np.ones(DIMS - 1), -np.inf], "not finite")],
                         ids=["zero", "nan", "inf"])  # fmt: skip
def test_a_zero_or_non_finite_query_vector_is_a_fault_not_a_mismatch(vector: np.ndarray, problem: str) -> None:
    with pytest.raises(StoreError, match=f"the query vector is {problem}; nothing can be ranked against it in here") \
            as raised:
        check_query_vector(vector, dims=DIMS, where="here")
    assert not isinstance(raised.value, StoreMismatchError)


def test_queries_share_a_filter_key_exactly_when_they_filter_alike() -> None:
    one, other = unit_vectors(2)
    cats = StoreQuery(vector=one, k=5, labels=frozenset({"cat"}), exclude_ids=frozenset({"a"}))
    assert replace(cats, vector=other, k=50, offset=10).filter_key == cats.filter_key
    assert cats.filter_key == (frozenset({"cat"}), None, frozenset({"a"}))
    variants = [replace(cats, labels=None), replace(cats, labels=frozenset()), replace(cats, exclude_ids=frozenset()),
                replace(cats, predicted_labels=frozenset({"cat"})), replace(cats, labels=frozenset({"cat", "dog"}))]
    assert len({cats.filter_key, *(variant.filter_key for variant in variants)}) == 6


# -- the documents, on both stores -----------------------------------------------------------------------------


def contents() -> list[ImageDocument]:
    """35 documents: 30 of `SOURCE` labelled cat, none, dog and predicted dog, cat, cat; 5 of /elsewhere."""
    documents = make_documents(30, labels=("cat", None, "dog"), predicted=("dog", "cat", "cat"))
    return documents + make_documents(5, prefix="other", seed=1, source="/elsewhere")


@pytest.fixture(params=["faiss", "elasticsearch"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, make_es_store: MakeEsStore) -> VectorStore:
    store: VectorStore = FaissStore(tmp_path / "index.npz") if request.param == "faiss" else make_es_store()
    await store.open(dims=DIMS, model_version=MODEL_VERSION)
    await store.upsert(contents())
    await store.flush()
    return store


async def reopened_faiss(store: VectorStore) -> FaissStore:
    """A second FAISS store on the same file, opened: what a restart would read."""
    assert isinstance(store, FaissStore)
    again = FaissStore(store.path)
    await again.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    return again


async def test_every_field_round_trips_and_a_null_label_stays_null(store: VectorStore) -> None:
    expected = contents()
    assert await store.get("doc-0001") == expected[1].stored()
    assert (await store.get("doc-0001")).label is None
    [hit] = await store.search(expected[1].vector, 1)
    assert hit.image == expected[1].stored()
    if isinstance(store, FaissStore):
        again = await reopened_faiss(store)
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
        assert await (await reopened_faiss(store)).get("upload-1") == document.stored()


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
        again = await reopened_faiss(store)
        assert await again.get("doc-0004") is None and await again.count() == 34


async def test_vectors_are_read_back_by_id(store: VectorStore) -> None:
    expected = contents()
    found = await store.vectors(["doc-0002", "doc-0029", "nope", "doc-0002"])
    assert sorted(found) == ["doc-0002", "doc-0029"]
    for doc_id in found:
        np.testing.assert_allclose(found[doc_id], expected[int(doc_id[-4:])].vector, atol=1e-6)


async def test_documents_are_listed_by_source_in_id_order(store: VectorStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(elasticsearch_store, "SCAN_PAGE", 7)  # several search_after pages on Elasticsearch
    mine = [doc async for doc in store.iter_documents(source=SOURCE)]
    assert [doc.id for doc in mine] == [f"doc-{i:04d}" for i in range(30)]
    assert mine[3] == contents()[3].stored()
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


async def make_older(store: VectorStore, es_double: EsDouble) -> None:
    """Make the index `store` wrote one of document schema 1, as written before the schema was recorded (on
    FAISS: a file left by a writer that has closed)."""
    if isinstance(store, FaissStore):
        await store.close()
        with np.load(store.path) as data:
            arrays = {name: data[name] for name in data.files if name != "schema"}
        np.savez(store.path, **arrays)
    else:
        es_double.indices[store.index].mappings["_meta"] = {"model_version": MODEL_VERSION}


async def test_an_index_of_the_older_schema_asks_for_a_rebuild_and_reset_starts_afresh(
        store: VectorStore, es_double: EsDouble, make_es_store: MakeEsStore) -> None:  # fmt: skip
    await make_older(store, es_double)
    again = FaissStore(store.path) if isinstance(store, FaissStore) else make_es_store()
    with pytest.raises(StoreMismatchError, match=r"schema 1, not 2; .*cbir index --rebuild"):
        await again.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    await again.reset()
    await again.open(dims=DIMS, model_version=MODEL_VERSION)
    assert await again.count() == 0 and (await again.info()).schema == DOCUMENT_SCHEMA


# -- search_many, on both stores and in each search mode ----------------------------------------------------------

SEARCH_DIMS, LABELS = 8, ("cat", "dog", "ship")
MODES = ["faiss", "faiss-hnsw", "elasticsearch-exact", "elasticsearch-knn"]


def corpus() -> list[ImageDocument]:
    """90 documents: labels cycle through cat, dog, ship and none (null); predictions through cat, dog,
    ship, cat, dog, so label and prediction disagree for many of them."""
    return make_documents(90, dims=SEARCH_DIMS, seed=3, labels=(*LABELS, None),
                          predicted=("cat", "dog", "ship", "cat", "dog"))  # fmt: skip


async def open_in_mode(mode: str, tmp_path: Path, make_es_store: MakeEsStore, documents: list[ImageDocument],
                       **es_settings: object) -> VectorStore:  # fmt: skip
    if mode.startswith("faiss"):
        store: VectorStore = FaissStore(tmp_path / "index.npz", index="hnsw" if mode == "faiss-hnsw" else "flat")
    else:
        store = make_es_store(es_search_mode=mode.removeprefix("elasticsearch-"), **es_settings)
    await store.open(dims=len(documents[0].vector), model_version=documents[0].model_version)
    await store.upsert(documents)
    await store.flush()
    if isinstance(store, FaissStore):
        await store.wait_for_graph()  # with hnsw: the graph, which at 90 documents and efSearch 256 finds all
    return store


@pytest.fixture(params=MODES)
async def searched(request: pytest.FixtureRequest, tmp_path: Path, make_es_store: MakeEsStore) -> VectorStore:
    """A store of the `corpus()` in one of the search modes."""
    return await open_in_mode(request.param, tmp_path, make_es_store, corpus())


def mixed_queries(documents: list[ImageDocument]) -> list[StoreQuery]:
    probe = documents[4].vector
    return [
        StoreQuery(vector=probe, k=5),
        StoreQuery(vector=probe, k=5, offset=5),  # the second page
        StoreQuery(vector=probe, k=7, labels=frozenset({"cat"})),
        StoreQuery(vector=probe, k=7, offset=3, labels=frozenset({"cat", "ship"})),
        StoreQuery(vector=probe, k=4, exclude_ids=frozenset({"doc-0004", "doc-0007", "missing"})),
        StoreQuery(vector=documents[10].vector, k=6, labels=frozenset({"dog"}), exclude_ids=frozenset({"doc-0010"})),
        StoreQuery(vector=probe, k=3, labels=frozenset({"horse"})),  # no such label: no hits
        StoreQuery(vector=probe, k=50, offset=80),  # past the end: what is left
        StoreQuery(vector=probe, k=8, predicted_labels=frozenset({"dog"})),  # same_class
        StoreQuery(vector=probe, k=8, offset=2, labels=frozenset({"cat"}), predicted_labels=frozenset({"cat"}),
                   exclude_ids=frozenset({"doc-0000"})),
        StoreQuery(vector=probe, k=3, labels=frozenset({"None"})),  # a null label is never the string "None"
    ]


async def test_filters_pages_and_exclusions_match_a_brute_force_ranking(searched: VectorStore) -> None:
    """Exact on FAISS and on Elasticsearch's script_score; kNN on the double is exact here too, since each
    of its 30 shards holds about 3 of the 90 documents, fewer than num_candidates (its exact fallback)."""
    documents = corpus()
    queries = mixed_queries(documents)
    results = await searched.search_many(queries)
    assert [[hit.id for hit in hits] for hits in results] == [brute_force(documents, q) for q in queries]
    assert results[0][0].id == "doc-0004" and results[0][0].score == pytest.approx(2.0, abs=1e-5)
    assert all(hit.image.label == "cat" for hit in results[2])
    assert len(results[7]) == 10
    assert len(results[8]) == 8 and all(hit.image.predicted_label == "dog" for hit in results[8])
    assert {hit.image.label for hit in results[8]} > {"dog"}  # the prediction filters, not the label
    assert results[9] and results[10] == []
    assert any(hit.image.label is None for hit in results[0] + results[1])  # null labels come back null


async def test_pages_do_not_overlap_and_cover_the_ranking(searched: VectorStore) -> None:
    probe = corpus()[0].vector
    pages = await searched.search_many([StoreQuery(vector=probe, k=10, offset=offset) for offset in range(0, 90, 10)])
    ids = [hit.id for page in pages for hit in page]
    assert len(ids) == len(set(ids)) == 90
    assert ids == [hit.id for hit in await searched.search(probe, 90)]


@pytest.mark.parametrize("vector", [np.zeros(SEARCH_DIMS), np.full(SEARCH_DIMS, np.nan),
                                    np.r_[np.ones(SEARCH_DIMS - 1), np.inf]], ids=["zero", "nan", "inf"])  # fmt: skip
async def test_a_zero_or_non_finite_query_vector_is_refused(
    searched: VectorStore, es_double: EsDouble, vector: np.ndarray
) -> None:
    sent = len(es_double.requests)
    with pytest.raises(StoreError, match="all zeros|not finite"):
        await searched.search_many([StoreQuery(vector=unit_vectors(1, SEARCH_DIMS)[0], k=3),
                                    StoreQuery(vector=vector.astype(np.float32), k=3)])  # fmt: skip
    assert len(es_double.requests) == sent  # refused before anything was sent


async def test_a_query_of_another_size_is_refused(searched: VectorStore) -> None:
    with pytest.raises(StoreMismatchError, match="4 dims"):
        await searched.search(np.ones(4, dtype=np.float32), 3)


# -- Elasticsearch only: one round trip, and kNN held to recall (approximate per shard) ---------------------------
# (here rather than in tests/common/stores/elasticsearch/: they measure the store against the contract's corpus
# and its brute-force ranking)


async def test_elasticsearch_answers_every_query_of_a_call_in_one_msearch(
    es_double: EsDouble, make_es_store: MakeEsStore, tmp_path: Path
) -> None:
    store = await open_in_mode("elasticsearch-exact", tmp_path, make_es_store, corpus())
    before = len(es_double.requests)
    await store.search_many(mixed_queries(corpus()))
    assert es_double.requests[before:] == [("POST", f"/{store.index}/_msearch")]


async def test_an_empty_elasticsearch_index_of_the_older_schema_is_claimed_and_its_mapping_brought_up_to_date(
        es_double: EsDouble, make_es_store: MakeEsStore) -> None:  # fmt: skip
    store = make_es_store()
    await store.open(dims=DIMS, model_version=MODEL_VERSION)
    index = es_double.indices[store.index]
    for name in ("source", "predicted_label", "confidence", "size", "mtime"):
        del index.mappings["properties"][name]
    index.mappings["_meta"] = {"model_version": "older"}
    claimed = make_es_store()
    await claimed.open(dims=DIMS, model_version=MODEL_VERSION)  # empty: claimed, its mapping brought up to date
    assert es_double.indices[store.index].mappings["_meta"] == {"model_version": MODEL_VERSION,
                                                                "schema": DOCUMENT_SCHEMA}  # fmt: skip
    await claimed.upsert(make_documents(2))  # the strict mapping now has every field


RECALL_DOCS = 3000  # on 2 shards: 1,500 vectors each, far more than num_candidates, so the graph search decides


def recall(got: list[str], expected: list[str]) -> float:
    return len(set(got) & set(expected)) / len(expected) if expected else 1.0


def recall_queries(documents: list[ImageDocument]) -> list[StoreQuery]:
    probes = unit_vectors(20, 16, seed=11)
    return ([StoreQuery(vector=v, k=10) for v in probes]
            + [StoreQuery(vector=v, k=10, offset=10) for v in probes[:5]]
            + [StoreQuery(vector=v, k=10, labels=frozenset({"cat", "dog", "ship"})) for v in probes[5:10]]
            + [StoreQuery(vector=v, k=10, exclude_ids=frozenset(brute_force(documents, StoreQuery(vector=v, k=5))))
               for v in probes[10:15]])  # fmt: skip


async def test_elasticsearch_knn_recall_at_10_against_exact_search_at_the_default_num_candidates(
    make_es_store: MakeEsStore, tmp_path: Path
) -> None:
    """recall@10 >= 0.95 on every kind of query (plain, second page, label filter, exclusions) at the
    default num_candidates (200); every hit is a real one, scored exactly, best first."""
    documents = make_documents(RECALL_DOCS, seed=5)
    store = await open_in_mode("elasticsearch-knn", tmp_path, make_es_store, documents, es_shards=2)
    queries = recall_queries(documents)
    results = await store.search_many(queries)
    vectors = {d.id: d.vector for d in documents}
    for query, hits in zip(queries, results, strict=True):
        expected = brute_force(documents, query)
        assert recall([hit.id for hit in hits], expected) >= 0.95, (query.offset, query.labels)
        assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
        for hit in hits:
            assert hit.score == pytest.approx(1.0 + float(np.dot(vectors[hit.id], query.vector)), abs=1e-5)
            assert hit.id not in query.exclude_ids and (query.labels is None or hit.image.label in query.labels)


async def test_elasticsearch_knn_recall_falls_with_fewer_candidates_so_equality_would_be_luck(
    make_es_store: MakeEsStore, tmp_path: Path
) -> None:
    """The double's kNN really is approximate: with num_candidates = k its graph search misses
    neighbours that exact search finds (so the tests above measure the store, not an exact double)."""
    documents = make_documents(RECALL_DOCS, seed=5)
    store = await open_in_mode("elasticsearch-knn", tmp_path, make_es_store, documents, es_shards=2,
                               es_num_candidates=10)  # fmt: skip
    queries = [StoreQuery(vector=v, k=10) for v in unit_vectors(20, 16, seed=11)]
    results = await store.search_many(queries)
    recalls = [recall([hit.id for hit in hits], brute_force(documents, q)) for q, hits in zip(queries, results,
                                                                                              strict=True)]
    assert 0.3 < float(np.mean(recalls)) < 0.99, recalls
