"""`VectorStore.search_many` on both stores: filters, pages and exclusions answered like a brute-force
ranking, bad query vectors refused before anything is searched.

The same tests run over the FAISS store and the Elasticsearch store on the HTTP double (tests/es_double.py)
in exact mode, where the answers must be equal; in kNN mode, which is approximate per shard, they are
held to a recall bound against the brute-force ranking instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from es_double import EsDouble
from factories import make_document, make_documents, unit_vectors

from services.common.documents import ImageDocument
from services.common.errors import StoreError, StoreMismatchError
from services.common.stores.base import StoreQuery, VectorStore
from services.common.stores.faiss import FaissStore

if TYPE_CHECKING:
    from es_fixtures import MakeEsStore

pytestmark = pytest.mark.anyio
DIMS, LABELS = 8, ("cat", "dog", "ship")
BACKENDS = ["faiss", "faiss-hnsw", "elasticsearch-exact", "elasticsearch-knn"]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def corpus() -> list[ImageDocument]:
    """90 documents: labels cycle through cat, dog, ship and none (null); predictions through cat, dog,
    ship, cat, dog, so label and prediction disagree for many of them."""
    return make_documents(90, dims=DIMS, seed=3, labels=(*LABELS, None), predicted=("cat", "dog", "ship", "cat", "dog"))


def brute_force(documents: list[ImageDocument], query: StoreQuery) -> list[str]:
    allowed = [d for d in documents if (query.labels is None or d.label in query.labels)
               and (query.predicted_labels is None or d.predicted_label in query.predicted_labels)
               and d.id not in query.exclude_ids]  # fmt: skip
    ranked = sorted(allowed, key=lambda d: -float(np.dot(d.vector, query.vector)))
    return [d.id for d in ranked[query.offset:query.offset + query.k]]


async def open_store(backend: str, tmp_path: Path, make_es_store: MakeEsStore, documents: list[ImageDocument],
                     **es_settings: object) -> VectorStore:  # fmt: skip
    if backend.startswith("faiss"):
        store: VectorStore = FaissStore(tmp_path / "index.npz", index="hnsw" if backend == "faiss-hnsw" else "flat")
    else:
        store = make_es_store(es_search_mode=backend.removeprefix("elasticsearch-"), **es_settings)
    await store.open(dims=len(documents[0].vector), model_version=documents[0].model_version)
    await store.upsert(documents)
    await store.flush()
    if isinstance(store, FaissStore):
        await store.wait_for_graph()  # with hnsw: the graph, which at 90 documents and efSearch 256 finds all
    return store


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path, make_es_store: MakeEsStore) -> VectorStore:
    return await open_store(request.param, tmp_path, make_es_store, corpus())


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


async def test_filters_pages_and_exclusions_match_a_brute_force_ranking(store: VectorStore) -> None:
    """Exact on FAISS and on Elasticsearch's script_score; kNN on the double is exact here too, since each
    of its 30 shards holds about 3 of the 90 documents, fewer than num_candidates (its exact fallback)."""
    documents = corpus()
    queries = mixed_queries(documents)
    results = await store.search_many(queries)
    assert [[hit.id for hit in hits] for hits in results] == [brute_force(documents, q) for q in queries]
    assert results[0][0].id == "doc-0004" and results[0][0].score == pytest.approx(2.0, abs=1e-5)
    assert all(hit.image.label == "cat" for hit in results[2])
    assert len(results[7]) == 10
    assert len(results[8]) == 8 and all(hit.image.predicted_label == "dog" for hit in results[8])
    assert {hit.image.label for hit in results[8]} > {"dog"}  # the prediction filters, not the label
    assert results[9] and results[10] == []
    assert any(hit.image.label is None for hit in results[0] + results[1])  # null labels come back null


async def test_elasticsearch_answers_every_query_of_a_call_in_one_msearch(
    es_double: EsDouble, make_es_store: MakeEsStore, tmp_path: Path
) -> None:
    store = await open_store("elasticsearch-exact", tmp_path, make_es_store, corpus())
    before = len(es_double.requests)
    await store.search_many(mixed_queries(corpus()))
    assert es_double.requests[before:] == [("POST", f"/{store.index}/_msearch")]


async def test_pages_do_not_overlap_and_cover_the_ranking(store: VectorStore) -> None:
    probe = corpus()[0].vector
    pages = await store.search_many([StoreQuery(vector=probe, k=10, offset=offset) for offset in range(0, 90, 10)])
    ids = [hit.id for page in pages for hit in page]
    assert len(ids) == len(set(ids)) == 90
    assert ids == [hit.id for hit in await store.search(probe, 90)]


@pytest.mark.parametrize("vector", [np.zeros(DIMS), np.full(DIMS, np.nan), np.r_[np.ones(DIMS - 1), np.inf]],
                         ids=["zero", "nan", "inf"])  # fmt: skip
async def test_a_zero_or_non_finite_query_vector_is_refused(
    store: VectorStore, es_double: EsDouble, vector: np.ndarray
) -> None:
    sent = len(es_double.requests)
    with pytest.raises(StoreError, match="all zeros|not finite"):
        await store.search_many([StoreQuery(vector=unit_vectors(1, DIMS)[0], k=3),
                                 StoreQuery(vector=vector.astype(np.float32), k=3)])  # fmt: skip
    assert len(es_double.requests) == sent  # refused before anything was sent


async def test_a_query_of_another_size_is_refused(store: VectorStore) -> None:
    with pytest.raises(StoreMismatchError, match="4 dims"):
        await store.search(np.ones(4, dtype=np.float32), 3)


async def test_faiss_search_reads_a_snapshot_that_writes_replace_but_never_change(tmp_path: Path,
                                                                                make_es_store: MakeEsStore) -> None:
    documents = corpus()
    store = await open_store("faiss", tmp_path, make_es_store, documents)
    assert isinstance(store, FaissStore)
    snapshot = store._take_snapshot()
    await store.delete(["doc-0004"])
    newcomer = make_document("new", documents[4].vector, model_version=documents[0].model_version)
    await store.upsert([newcomer])
    before = snapshot.search_many([StoreQuery(vector=documents[4].vector, k=1)])
    after = await store.search_many([StoreQuery(vector=documents[4].vector, k=1)])
    assert before[0][0].id == "doc-0004" and after[0][0].id == "new"


# -- kNN: approximate per shard, held to recall ------------------------------------------------------

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
    store = await open_store("elasticsearch-knn", tmp_path, make_es_store, documents, es_shards=2)
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
    store = await open_store("elasticsearch-knn", tmp_path, make_es_store, documents, es_shards=2,
                             es_num_candidates=10)  # fmt: skip
    queries = [StoreQuery(vector=v, k=10) for v in unit_vectors(20, 16, seed=11)]
    results = await store.search_many(queries)
    recalls = [recall([hit.id for hit in hits], brute_force(documents, q)) for q, hits in zip(queries, results,
                                                                                              strict=True)]
    assert 0.3 < float(np.mean(recalls)) < 0.99, recalls
