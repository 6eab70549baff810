"""`ElasticsearchStore` through the `VectorStore` interface, against an HTTP double of Elasticsearch.

The real `AsyncElasticsearch` client talks HTTP to the double (tests/es_double.py), which checks
requests as Elasticsearch does. The parity tests hold the store to the FAISS store's answers.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import numpy as np
import pytest
from elasticsearch import ApiError, AsyncElasticsearch
from es_double import WWW_AUTHENTICATE, EsDouble
from es_fixtures import filled
from factories import DIMS, make_documents, unit_vectors

from services.common.errors import (
    BulkWriteError,
    IndexNotReadyError,
    StoreAuthError,
    StoreError,
    StoreMismatchError,
    StoreUnavailableError,
)
from services.common.settings import EsSearchMode
from services.common.stores.base import StoreQuery, VectorStore
from services.common.stores.elasticsearch import ElasticsearchStore
from services.common.stores.faiss import FaissStore

if TYPE_CHECKING:
    from es_fixtures import MakeEsStore

pytestmark = pytest.mark.anyio

MODEL = "model-a"
documents = partial(make_documents, model_version=MODEL)


async def test_elasticsearch_open_creates_the_index_once_with_its_mapping(
    es_double: EsDouble, es_store: ElasticsearchStore, make_es_store: MakeEsStore
) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    await es_store.open(dims=DIMS, model_version=MODEL)
    await make_es_store().open(dims=DIMS, model_version=MODEL)

    assert es_double.calls(f"/{es_store.index}", method="PUT") == 1
    index = es_double.indices[es_store.index]
    assert index.settings["index.number_of_shards"] == "30"
    assert index.settings["index.number_of_replicas"] == "0"
    features = index.mappings["properties"]["features"]
    assert features == {
        "type": "dense_vector", "dims": DIMS, "similarity": "cosine", "index": True,
        "index_options": {"type": "hnsw", "m": 16, "ef_construction": 100},  # as GET _mapping shows the default
    }  # fmt: skip
    assert all(index.mappings["properties"][f]["type"] == "keyword" for f in ("id", "label", "model_version"))
    info = await es_store.info()
    assert (info.dims, info.model_version, info.count) == (DIMS, MODEL, 0)


async def test_elasticsearch_open_without_create_refuses_a_missing_index(es_store: ElasticsearchStore) -> None:
    with pytest.raises(IndexNotReadyError, match="there is no Elasticsearch index 'cbir-test'.*cbir index"):
        await es_store.open(dims=DIMS, model_version=MODEL, create=False)
    assert (await es_store.info()).dims is None


@pytest.mark.parametrize("backend", ["faiss", "elasticsearch"])
async def test_a_missing_index_is_not_ready_on_both_stores(
    make_es_store: MakeEsStore, tmp_path: Path, backend: str
) -> None:
    store: VectorStore = FaissStore(tmp_path / "index.npz") if backend == "faiss" else make_es_store()
    with pytest.raises(IndexNotReadyError, match="cbir index") as caught:
        await store.open(dims=DIMS, model_version=MODEL, create=False)
    assert not isinstance(caught.value, StoreError)  # not "the store refused": there is nothing to refuse yet


async def test_elasticsearch_upsert_is_idempotent_by_document_id(es_store: ElasticsearchStore) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    docs = documents(25)
    await es_store.upsert(docs)
    await es_store.flush()
    assert await es_store.count() == 25

    relabelled = [replace(doc, label="cat") for doc in docs[:5]]
    await es_store.upsert(docs)
    await es_store.upsert(relabelled)
    await es_store.flush()
    assert await es_store.count() == 25
    stored = await es_store.get(docs[0].id)
    assert stored is not None and stored.label == "cat"


async def test_elasticsearch_bulk_partial_failure_names_every_refused_document(
    es_double: EsDouble, es_store: ElasticsearchStore
) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    good = documents(6)
    bad = [replace(doc, id=f"bad-{i}", vector=doc.vector[:8]) for i, doc in enumerate(documents(2, seed=9))]

    with pytest.raises(BulkWriteError) as caught:
        await es_store.upsert([*good[:3], *bad, *good[3:]])

    assert set(caught.value.failures) == {"bad-0", "bad-1"}
    assert "bad-0" in caught.value.message and "bad-1" in caught.value.message
    assert "different number of dimensions [8] than defined in the mapping [16]" in caught.value.failures["bad-0"]
    assert caught.value.message.startswith(
        f"Elasticsearch index '{es_store.index}' at {es_double.url} refused 2 of 8 documents: bad-0 (")
    await es_store.flush()
    assert await es_store.count() == len(good)  # the valid documents were written, none dropped silently


async def test_elasticsearch_bulk_429s_are_retried_until_accepted(
    es_double: EsDouble, es_store: ElasticsearchStore
) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    es_double.reject_bulk_requests = 1  # the whole first request
    es_double.reject_bulk_items = 4  # then four items of the next one
    await es_store.upsert(documents(30))
    await es_store.flush()

    assert await es_store.count() == 30
    assert es_double.calls("/_bulk") == 3


async def test_elasticsearch_bulk_429s_beyond_the_retries_are_reported(
    es_double: EsDouble, es_store: ElasticsearchStore
) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    es_double.reject_bulk_items = 1_000

    with pytest.raises(BulkWriteError, match="es_rejected_execution_exception") as caught:
        await es_store.upsert(documents(5))
    assert len(caught.value.failures) == 5
    assert es_double.calls("/_bulk") == 1 + es_store.max_retries


async def faiss_and_es(make_es_store: MakeEsStore, tmp_path: Path, docs: list, **settings: object
                       ) -> tuple[FaissStore, ElasticsearchStore]:  # fmt: skip
    faiss_store, es_store = FaissStore(tmp_path / "index.npz"), make_es_store(**settings)
    for store in (faiss_store, es_store):
        await store.open(dims=DIMS, model_version=MODEL)
        await store.upsert(docs)
        await store.flush()
    return faiss_store, es_store


async def test_elasticsearch_exact_search_ranks_and_scores_like_faiss(
    make_es_store: MakeEsStore, tmp_path: Path
) -> None:
    faiss_store, es_store = await faiss_and_es(make_es_store, tmp_path, documents(300, seed=1))
    for query in unit_vectors(5, seed=2):
        for k in (1, 10, 400):  # 400 > the 300 documents: both return all of them
            expected = await faiss_store.search(query, k)
            got = await es_store.search(query, k)
            assert [hit.id for hit in got] == [hit.id for hit in expected]
            np.testing.assert_allclose([hit.score for hit in got], [hit.score for hit in expected], atol=1e-4)
            assert got == [replace(hit, score=g.score) for hit, g in zip(expected, got, strict=True)]
    assert len(expected) == 300


async def test_elasticsearch_knn_recall_against_faiss_with_its_scores(
    make_es_store: MakeEsStore, tmp_path: Path
) -> None:
    """kNN is approximate: held to recall@k against FAISS's exact answer, the shared hits scored alike."""
    faiss_store, es_store = await faiss_and_es(make_es_store, tmp_path, documents(2000, seed=1),
                                               es_search_mode=EsSearchMode.knn, es_shards=2)  # fmt: skip
    for query in unit_vectors(5, seed=2):
        for k in (1, 10, 100):
            expected = {hit.id: hit for hit in await faiss_store.search(query, k)}
            got = await es_store.search(query, k)
            assert len(got) == k and len(set(expected) & {hit.id for hit in got}) >= 0.95 * k
            for hit in got:
                if hit.id in expected:
                    assert hit == replace(expected[hit.id], score=hit.score)
                    assert hit.score == pytest.approx(expected[hit.id].score, abs=1e-4)


async def test_elasticsearch_search_of_a_stored_vector_finds_it_first_with_score_two(
    es_store: ElasticsearchStore,
) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    docs = documents(40, seed=3)
    await es_store.upsert(docs)
    await es_store.flush()

    hits = await es_store.search(docs[7].vector, k=3)
    assert hits[0].id == docs[7].id
    assert hits[0].score == pytest.approx(2.0, abs=1e-5)
    assert hits[0].score >= hits[1].score >= hits[2].score


async def test_elasticsearch_delete_get_and_existing_ids(es_store: ElasticsearchStore) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    docs = documents(10)
    await es_store.upsert(docs)
    # Lookups by id are realtime: no flush needed.
    assert await es_store.existing_ids([docs[0].id, docs[9].id, "nope"]) == {docs[0].id, docs[9].id}
    assert await es_store.get(docs[4].id) == docs[4].stored()

    assert await es_store.delete([docs[1].id, docs[2].id, docs[2].id, "nope"]) == 2
    await es_store.flush()
    assert await es_store.count() == 8
    assert await es_store.get(docs[1].id) is None
    assert await es_store.existing_ids([d.id for d in docs[:3]]) == {docs[0].id}
    assert await es_store.delete([]) == 0


async def test_elasticsearch_open_refuses_an_index_of_other_dims(
    es_store: ElasticsearchStore, make_es_store: MakeEsStore
) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)  # empty: dims alone must still match
    with pytest.raises(StoreMismatchError, match=f"holds {DIMS}-dimensional vectors but the model produces 8"):
        await make_es_store().open(dims=8, model_version=MODEL)


async def test_elasticsearch_open_refuses_an_index_of_another_model_version(
    es_store: ElasticsearchStore, make_es_store: MakeEsStore
) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    other = make_es_store()
    await other.open(dims=DIMS, model_version="model-b")  # an empty index is claimed by the new model
    assert (await other.info()).model_version == "model-b"
    await other.upsert(documents(3, model_version="model-b"))
    await other.flush()

    with pytest.raises(StoreMismatchError, match="built by model version 'model-b'"):
        await es_store.open(dims=DIMS, model_version=MODEL)
    with pytest.raises(StoreError, match="is from model 'model-a'"):
        await other.upsert(documents(1))


async def test_elasticsearch_reset_drops_every_document_and_keeps_the_index(es_store: ElasticsearchStore) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    await es_store.upsert(documents(12))
    await es_store.flush()
    await es_store.reset()
    info = await es_store.info()
    assert (info.dims, info.model_version, info.count) == (DIMS, MODEL, 0)
    assert await es_store.search(unit_vectors(1)[0], 5) == []


async def test_elasticsearch_reset_before_open_lets_another_model_rebuild(
    es_store: ElasticsearchStore, make_es_store: MakeEsStore
) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    await es_store.upsert(documents(4))
    await es_store.flush()
    rebuild = make_es_store()
    await rebuild.reset()
    await rebuild.open(dims=8, model_version="model-b")
    info = await rebuild.info()
    assert (info.dims, info.model_version, info.count) == (8, "model-b", 0)


async def test_elasticsearch_down_is_unavailable_quickly(es_double: EsDouble, make_es_store: MakeEsStore) -> None:
    store = make_es_store(es_timeout_s=0.5, es_max_retries=1)
    es_double.go_down()
    started = time.perf_counter()
    with pytest.raises(StoreUnavailableError, match=f"cannot reach Elasticsearch at {es_double.url}"):
        await store.open(dims=DIMS, model_version=MODEL)
    assert time.perf_counter() - started < 3.0


async def test_elasticsearch_that_does_not_answer_times_out_as_unavailable(
    es_double: EsDouble, make_es_store: MakeEsStore
) -> None:
    store = make_es_store(es_timeout_s=0.2, es_max_retries=1)
    es_double.stall_s = 2.0
    started = time.perf_counter()
    with pytest.raises(StoreUnavailableError, match="did not answer in time while counting"):
        await store.count()
    assert time.perf_counter() - started < 1.5  # two attempts of 0.2 s, not the 2 s stall
    es_double.stall_s = 0.0


async def test_elasticsearch_index_deleted_under_the_store_is_not_ready(
    es_double: EsDouble, es_store: ElasticsearchStore
) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    del es_double.indices[es_store.index]
    with pytest.raises(IndexNotReadyError, match="there is no Elasticsearch index 'cbir-test'"):
        await es_store.search(unit_vectors(1)[0], 3)
    with pytest.raises(IndexNotReadyError, match="there is no Elasticsearch index 'cbir-test'"):
        await es_store.count()
    with pytest.raises(IndexNotReadyError):
        await es_store.get("doc-0000")
    with pytest.raises(IndexNotReadyError):
        await es_store.existing_ids(["doc-0000"])


# -- what a real cluster does: partial results, fresh indices, bad vectors, ties ------------------


async def test_elasticsearch_partial_shard_failures_are_a_503_naming_the_shards(
    es_double: EsDouble, es_store: ElasticsearchStore
) -> None:
    await filled(es_store, 200)
    es_double.break_shards(3, 17)
    with pytest.raises(StoreUnavailableError) as caught:
        await es_store.search(unit_vectors(1)[0], 10)
    message = caught.value.message
    assert caught.value.status_code == 503
    assert "partial results: 2 of 30 shards failed" in message and "not serving an incomplete ranking" in message
    assert "shard 3: circuit_breaking_exception" in message and "shard 17: circuit_breaking_exception" in message


async def test_elasticsearch_count_of_failed_shards_is_a_503_never_a_short_count(
    es_double: EsDouble, es_store: ElasticsearchStore
) -> None:
    # The count feeds readiness, /collection and the `cbir index` report: a short one would be taken for the truth.
    await filled(es_store, 60)
    es_double.break_shards(4)
    with pytest.raises(StoreUnavailableError, match=r"1 of 30 shards failed \(shard 4: circuit_breaking_exception.*"
                                                    r"not serving a short count"):  # fmt: skip
        await es_store.count()
    es_double.broken_shards.clear()
    assert await es_store.count() == 60


async def test_elasticsearch_partial_results_of_one_query_fail_the_whole_call(
    es_double: EsDouble, es_store: ElasticsearchStore
) -> None:
    """A one-shard failure fails every query of the call: their hits come from the same shards."""
    await filled(es_store, 60)
    es_double.break_shards(0, error={"type": "node_not_connected_exception", "reason": "[cbir-es-2] not connected"})
    queries = [StoreQuery(vector=v, k=5) for v in unit_vectors(3, seed=4)]
    with pytest.raises(StoreUnavailableError, match=r"1 of 30 shards failed \(shard 0: node_not_connected_exception"):
        await es_store.search_many(queries)


async def test_elasticsearch_partial_timed_out_search_is_a_503(
    es_double: EsDouble, es_store: ElasticsearchStore
) -> None:
    await filled(es_store, 60)
    es_double.time_out_searches = 1
    with pytest.raises(StoreUnavailableError, match="the search timed out before every shard answered"):
        await es_store.search(unit_vectors(1)[0], 10)
    assert len(await es_store.search(unit_vectors(1)[0], 10)) == 10  # the next search is whole again


async def test_elasticsearch_partial_every_shard_failed_is_a_503_too(
    es_double: EsDouble, es_store: ElasticsearchStore
) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    es_double.break_shards(*range(30), error={"type": "no_shard_available_action_exception", "reason": None})
    with pytest.raises(StoreUnavailableError, match="503 search_phase_execution_exception: all shards failed"):
        await es_store.search(unit_vectors(1)[0], 10)


async def test_elasticsearch_fresh_index_open_waits_for_its_primaries(
    es_double: EsDouble, es_store: ElasticsearchStore
) -> None:
    es_double.primaries_start_s = 0.3
    started = time.perf_counter()
    await es_store.open(dims=DIMS, model_version=MODEL)
    assert time.perf_counter() - started >= 0.3
    assert es_double.calls(f"/_cluster/health/{es_store.index}") == 1
    await es_store.upsert(documents(50))  # no 503 to retry: the primaries had started
    assert es_double.calls("/_bulk") == 1


async def test_elasticsearch_fresh_index_503_items_are_retried(es_double: EsDouble, make_es_store: MakeEsStore) -> None:
    """Someone else created the index a moment ago: its primaries are still starting, so the first
    bulk items answer 503 unavailable_shards_exception, and the store retries them with backoff."""
    creator = make_es_store()
    await creator.open(dims=DIMS, model_version=MODEL)
    store = make_es_store(es_max_retries=6)  # backoff 0.01, 0.02, ... 0.32 s: 0.63 s in all
    await store.open(dims=DIMS, model_version=MODEL, create=False)
    # As if it had just been created (a count, as open makes, would fail on every shard until then).
    es_double.indices[creator.index].active_at = time.monotonic() + 0.15
    await store.upsert(documents(40))
    await store.flush()
    assert await store.count() == 40
    assert es_double.calls("/_bulk") > 1


async def test_elasticsearch_fresh_index_503s_beyond_the_retries_are_reported(
    es_double: EsDouble, make_es_store: MakeEsStore
) -> None:
    store = make_es_store(es_max_retries=1)
    await store.open(dims=DIMS, model_version=MODEL)
    es_double.indices[store.index].active_at = time.monotonic() + 60
    with pytest.raises(BulkWriteError, match="unavailable_shards_exception") as caught:
        await store.upsert(documents(5))
    assert len(caught.value.failures) == 5 and "primary shard is not active" in caught.value.message
    assert es_double.calls("/_bulk") == 2


async def test_elasticsearch_fresh_index_whose_primaries_never_start_is_unavailable(
    es_double: EsDouble, es_store: ElasticsearchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.common.stores.elasticsearch.indices.PRIMARIES_WAIT_S", 0.2)
    es_double.primaries_start_s = 60
    with pytest.raises(StoreUnavailableError, match="did not start within 0.2 s .*health red, 30 initializing"):
        await es_store.open(dims=DIMS, model_version=MODEL)


@pytest.mark.parametrize("mode", ["exact", "knn"])
async def test_elasticsearch_double_answers_zero_and_nan_query_vectors_with_400(es_double: EsDouble, mode: str) -> None:
    """What the store's check spares the cluster: a zero vector is a 400 on every shard, NaN is not JSON."""
    client = AsyncElasticsearch(es_double.url, max_retries=0)
    try:
        await client.indices.create(index="v", mappings={"properties": {"f": {"type": "dense_vector", "dims": 3}}})
        await client.bulk(operations=[{"index": {"_index": "v", "_id": "a"}}, {"f": [1.0, 0.0, 0.0]}])
        await client.indices.refresh(index="v")

        def body(vector: list[float]) -> dict:
            if mode == "knn":
                return {"knn": {"field": "f", "query_vector": vector, "k": 1, "num_candidates": 1}}
            script = {"source": "cosineSimilarity(params.q, 'f') + 1.0", "params": {"q": vector}}
            return {"query": {"script_score": {"query": {"match_all": {}}, "script": script}}}

        answer = await client.msearch(index="v", searches=[{}, body([0.0, 0.0, 0.0]), {}, body([0.0, 1.0, 0.0])])
        zero, fine = answer["responses"]
        assert zero["status"] == 400 and zero["error"]["type"] == "search_phase_execution_exception"
        cause = zero["error"]["root_cause"][0]
        assert cause["type"] == "illegal_argument_exception"
        assert ("does not support vectors with zero magnitude" if mode == "knn"
                else "script returned an invalid score [NaN]") in cause["reason"]  # fmt: skip
        assert fine["status"] == 200 and fine["hits"]["hits"][0]["_id"] == "a"
        await _expect(client.msearch(index="v", searches=[{}, body([float("nan"), 0.0, 1.0])]),
                      400, "x_content_parse_exception", "Non-standard token 'NaN'")  # fmt: skip
    finally:
        await client.close()


async def test_elasticsearch_ties_are_ordered_by_shard_then_doc_order(es_double: EsDouble, es_store: ElasticsearchStore
                                                                      ) -> None:  # fmt: skip
    """Equal scores: Elasticsearch's merge orders them by shard, then by Lucene doc id within it."""
    await es_store.open(dims=DIMS, model_version=MODEL)
    same = unit_vectors(1, seed=8)[0]
    twins = [replace(doc, vector=same) for doc in documents(40)]
    await es_store.upsert(twins)
    await es_store.flush()
    hits = await es_store.search(same, 40)
    index = es_double.indices[es_store.index]
    assert len({hit.score for hit in hits}) == 1
    assert [hit.id for hit in hits] == sorted((doc.id for doc in twins),
                                              key=lambda i: (index.shard_of(i), index.doc_order[i]))  # fmt: skip
    assert [hit.id for hit in hits] != [doc.id for doc in twins]  # not insertion order


def test_elasticsearch_double_routes_ids_as_elasticsearch_does() -> None:
    """Murmur3HashFunction (murmur3 x86_32 of the UTF-16 units), floorMod by 960 routing shards, / 32."""
    from es_double import Index, routing_num_shards

    assert [routing_num_shards(n) for n in (1, 2, 5, 30, 1024)] == [1024, 1024, 640, 960, 2048]
    index = Index(name="x", settings={"index.number_of_shards": "30", "index.number_of_replicas": "0"}, mappings={})
    shards = [index.shard_of(f"doc-{i:04d}") for i in range(3000)]
    assert set(shards) == set(range(30)) and max(map(shards.count, set(shards))) < 2 * 3000 / 30


# -- a secured cluster --------------------------------------------------------------------------

PASSWORD = "s3cret-pa55"
API_KEY_SECRET = "k3y-s3cret"
API_KEY = base64.b64encode(f"key-id:{API_KEY_SECRET}".encode()).decode()  # as Kibana hands it out


def every_call(store: ElasticsearchStore) -> dict[str, Callable[[], Awaitable[object]]]:
    """Each store operation that talks to Elasticsearch, on an open store."""
    return {
        "open": lambda: store.open(dims=DIMS, model_version=MODEL),
        "info": store.info,
        "upsert": lambda: store.upsert(documents(3)),
        "delete": lambda: store.delete(["doc-0000"]),
        "flush": store.flush,
        "count": store.count,
        "search": lambda: store.search(unit_vectors(1)[0], 3),
        "get": lambda: store.get("doc-0000"),
        "existing_ids": lambda: store.existing_ids(["doc-0000"]),
        "reset": store.reset,
    }


@pytest.mark.parametrize(
    ("credentials", "settings", "secrets"),
    [
        ({"es_username": "cbir", "es_password": "wrong-password"}, "CBIR_ES_USERNAME/CBIR_ES_PASSWORD",
         ["wrong-password", base64.b64encode(b"cbir:wrong-password").decode()]),
        ({"es_api_key": base64.b64encode(b"key-id:wrong-key").decode()}, "CBIR_ES_API_KEY",
         ["wrong-key", base64.b64encode(b"key-id:wrong-key").decode()]),
        ({}, "CBIR_ES_API_KEY, or CBIR_ES_USERNAME/CBIR_ES_PASSWORD", []),
    ],
    ids=["wrong-password", "wrong-api-key", "no-credentials"],
)  # fmt: skip
async def test_elasticsearch_refusing_the_credentials_is_an_auth_error_on_every_call(
    es_double: EsDouble, make_es_store: MakeEsStore, credentials: dict[str, str], settings: str, secrets: list[str]
) -> None:
    store = make_es_store(**credentials)
    await store.open(dims=DIMS, model_version=MODEL)  # while security is still off
    es_double.secure(users={"cbir": PASSWORD}, api_keys={"key-id": API_KEY_SECRET})

    for name, call in every_call(store).items():
        with pytest.raises(StoreAuthError) as caught:
            await call()
        message = caught.value.message
        assert "401 security_exception" in message and es_double.url in message, (name, message)
        assert settings in message, (name, message)
        assert "not ready" not in message and not any(secret in message for secret in secrets), (name, message)
    assert es_double.indices[store.index].docs == {}  # nothing got past the 401


@pytest.mark.parametrize("credentials", [{"es_username": "cbir", "es_password": PASSWORD}, {"es_api_key": API_KEY}])
async def test_elasticsearch_right_credentials_are_let_in(
    es_double: EsDouble, make_es_store: MakeEsStore, credentials: dict[str, str]
) -> None:
    es_double.secure(users={"cbir": PASSWORD}, api_keys={"key-id": API_KEY_SECRET})
    store = make_es_store(**credentials)
    await store.open(dims=DIMS, model_version=MODEL)
    await store.upsert(documents(5))
    await store.flush()
    assert await store.count() == 5


@pytest.mark.parametrize(
    ("credentials", "principal", "settings"),
    [
        ({"es_username": "cbir", "es_password": PASSWORD}, "user [cbir] with effective roles [viewer]",
         "CBIR_ES_USERNAME/CBIR_ES_PASSWORD"),
        ({"es_api_key": API_KEY}, "API key id [key-id] of user [cbir-admin]", "CBIR_ES_API_KEY"),
    ],
)  # fmt: skip
async def test_elasticsearch_read_only_credentials_search_but_writes_are_an_auth_error(
    es_double: EsDouble, make_es_store: MakeEsStore, credentials: dict[str, str], principal: str, settings: str
) -> None:
    writer = make_es_store()
    await writer.open(dims=DIMS, model_version=MODEL)
    await writer.upsert(documents(4))
    await writer.flush()
    es_double.secure(users={"cbir": PASSWORD}, api_keys={"key-id": API_KEY_SECRET}, role="viewer")
    reader = make_es_store(**credentials)

    await reader.open(dims=DIMS, model_version=MODEL, create=False)
    assert len(await reader.search(unit_vectors(1)[0], 3)) == 3
    for write in (lambda: reader.upsert(documents(1)), lambda: reader.delete(["doc-0000"])):
        before = len(es_double.requests)
        lacks = r"lacks the index privileges \[write\] on \[cbir-test, cbir-test-\*\], needed to write documents"
        with pytest.raises(StoreAuthError, match=lacks) as caught:
            await write()
        message = caught.value.message
        assert settings in message and PASSWORD not in message and API_KEY_SECRET not in message, message
        assert API_KEY not in message
        assert not [path for _, path in es_double.requests[before:] if path.endswith("/_bulk")]  # asked first
    with pytest.raises(StoreAuthError, match="403 security_exception") as caught:  # Elasticsearch's own refusal
        await reader.reset()
    message = caught.value.message
    assert f"is unauthorized for {principal}" in message and settings in message, message
    assert PASSWORD not in message and API_KEY_SECRET not in message and API_KEY not in message
    assert len(es_double.indices[reader.index].docs) == 4


async def test_elasticsearch_credentials_without_any_privilege_cannot_even_open(
    es_double: EsDouble, make_es_store: MakeEsStore
) -> None:
    es_double.secure(users={"cbir": PASSWORD}, role="monitoring_user")
    store = make_es_store(es_username="cbir", es_password=PASSWORD)
    with pytest.raises(StoreAuthError, match=r"action \[indices:admin/aliases/get\] is unauthorized") as caught:
        await store.open(dims=DIMS, model_version=MODEL)
    assert "on index 'cbir-test'" in caught.value.message and "not ready" not in caught.value.message


async def test_elasticsearch_double_answers_wrong_credentials_like_a_secured_cluster(es_double: EsDouble) -> None:
    """The 401 and 403 of Elasticsearch 8 with x-pack security: body, status and challenge headers."""
    es_double.secure(users={"cbir": PASSWORD}, role="viewer")
    challenge = {"WWW-Authenticate": WWW_AUTHENTICATE}
    reason = "unable to authenticate user [cbir] for REST request [/cbir-test/_search?size=1]"
    async with aiohttp.ClientSession() as session:
        wrong = {"Authorization": "Basic " + base64.b64encode(b"cbir:wrong").decode()}
        async with session.get(f"{es_double.url}/cbir-test/_search?size=1", headers=wrong) as response:
            assert response.status == 401
            assert response.headers.getall("WWW-Authenticate") == WWW_AUTHENTICATE
            assert await response.json(content_type=None) == {
                "error": {
                    "root_cause": [{"type": "security_exception", "reason": reason, "header": challenge}],
                    "type": "security_exception", "reason": reason, "header": challenge,
                },
                "status": 401,
            }  # fmt: skip
        right = {"Authorization": "Basic " + base64.b64encode(f"cbir:{PASSWORD}".encode()).decode()}
        async with session.put(f"{es_double.url}/cbir-test", headers=right) as response:
            assert response.status == 403
            body = await response.json(content_type=None)
    reason = ("action [indices:admin/create] is unauthorized for user [cbir] with effective roles [viewer] on "
              "indices [cbir-test], this action is granted by the index privileges [create_index,manage,all]")
    assert body == {"error": {"root_cause": [{"type": "security_exception", "reason": reason}],
                              "type": "security_exception", "reason": reason}, "status": 403}  # fmt: skip


async def test_elasticsearch_double_validates_requests_like_elasticsearch(es_double: EsDouble) -> None:
    """The double must refuse what Elasticsearch refuses, or the store tests prove nothing."""
    client = AsyncElasticsearch(es_double.url, max_retries=0)
    vector = {"type": "dense_vector", "dims": 3, "similarity": "cosine"}
    try:
        await _expect(client.indices.create(index="v", mappings={"properties": {"f": {**vector, "dim": 3}}}),
                      400, "mapper_parsing_exception", "unknown parameter [dim] on mapper [f]")  # fmt: skip
        await _expect(client.indices.create(index="v", mappings={"properties": {"f": {"type": "dense_vector"}}}),
                      400, "mapper_parsing_exception", "Missing required parameter [dims]")  # fmt: skip
        await client.indices.create(index="v", mappings={"properties": {"f": vector}})
        await _expect(client.indices.create(index="v"), 400, "resource_already_exists_exception", "already exists")
        await _expect(client.search(index="missing"), 404, "index_not_found_exception", "no such index [missing]")

        await client.bulk(operations=[{"index": {"_index": "v", "_id": "a"}}, {"f": [1.0, 0.0, 0.0]}])
        await client.indices.refresh(index="v")
        knn = {"field": "f", "query_vector": [0.0, 1.0, 0.0]}
        await _expect(client.search(index="v", knn={**knn, "k": 5, "num_candidates": 3}),
                      400, "illegal_argument_exception", "[num_candidates] cannot be less than [k]")  # fmt: skip
        await _expect(client.search(index="v", knn={**knn, "k": 5, "num_candidates": 10_001}),
                      400, "illegal_argument_exception", "[num_candidates] cannot exceed [10000]")  # fmt: skip
        await _expect(client.search(index="v", query={"script_score": {"query": {"match_all": {}}}}),
                      400, "parsing_exception", "requires 'script'")  # fmt: skip
        orthogonal = await client.search(index="v", knn={**knn, "k": 1, "num_candidates": 1})
        assert orthogonal["hits"]["hits"][0]["_score"] == pytest.approx(0.5)  # (1 + cos 90°) / 2
    finally:
        await client.close()


async def _expect(call: object, status: int, error_type: str, reason: str) -> None:
    with pytest.raises(ApiError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.meta.status == status
    error = caught.value.body["error"]
    assert error["type"] == error_type and error["root_cause"][0]["type"] == error_type
    assert reason in error["reason"]
    assert caught.value.body["status"] == status
