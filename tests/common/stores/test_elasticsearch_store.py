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
from factories import DIMS, make_documents, unit_vectors

from services.common.documents import StoredImage
from services.common.errors import (
    BulkWriteError,
    CbirError,
    IndexNotReadyError,
    StoreAuthError,
    StoreError,
    StoreMismatchError,
    StoreUnavailableError,
)
from services.common.settings import EsSearchMode
from services.common.stores.base import VectorStore
from services.common.stores.elasticsearch_store import ElasticsearchStore
from services.common.stores.faiss_store import FaissStore

if TYPE_CHECKING:
    from es_fixtures import MakeEsStore

pytestmark = pytest.mark.anyio

MODEL = "model-a"
documents = partial(make_documents, model_version=MODEL)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


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
        "index_options": {"type": "hnsw"},
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
    es_store: ElasticsearchStore,
) -> None:
    await es_store.open(dims=DIMS, model_version=MODEL)
    good = documents(6)
    bad = [replace(doc, id=f"bad-{i}", vector=doc.vector[:8]) for i, doc in enumerate(documents(2, seed=9))]

    with pytest.raises(BulkWriteError) as caught:
        await es_store.upsert([*good[:3], *bad, *good[3:]])

    assert set(caught.value.failures) == {"bad-0", "bad-1"}
    assert "bad-0" in caught.value.message and "bad-1" in caught.value.message
    assert "different number of dimensions [8] than defined in the mapping [16]" in caught.value.failures["bad-0"]
    assert isinstance(caught.value, StoreError) and isinstance(caught.value, CbirError)
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


@pytest.mark.parametrize("mode", [EsSearchMode.exact, EsSearchMode.knn])
async def test_elasticsearch_search_ranks_and_scores_like_faiss(
    make_es_store: MakeEsStore, tmp_path: Path, mode: EsSearchMode
) -> None:
    docs = documents(300, seed=1)
    faiss_store = FaissStore(tmp_path / "index.npz")
    es_store = make_es_store(es_search_mode=mode)
    for store in (faiss_store, es_store):
        await store.open(dims=DIMS, model_version=MODEL)
        await store.upsert(docs)
        await store.flush()

    for query in unit_vectors(5, seed=2):
        for k in (1, 10, 400):  # 400 > the 300 documents: both return all of them
            expected = await faiss_store.search(query, k)
            got = await es_store.search(query, k)
            assert [hit.id for hit in got] == [hit.id for hit in expected]
            np.testing.assert_allclose([hit.score for hit in got], [hit.score for hit in expected], atol=1e-4)
            assert got == [replace(hit, score=g.score) for hit, g in zip(expected, got, strict=True)]
    assert len(expected) == 300


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
    assert await es_store.get(docs[4].id) == StoredImage(
        id=docs[4].id, filename=docs[4].filename, path=docs[4].path, label=docs[4].label, model_version=MODEL
    )

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
    for write in (lambda: reader.upsert(documents(1)), lambda: reader.delete(["doc-0000"]), reader.reset):
        with pytest.raises(StoreAuthError, match="403 security_exception") as caught:
            await write()
        message = caught.value.message
        assert f"is unauthorized for {principal}" in message and settings in message, message
        assert PASSWORD not in message and API_KEY_SECRET not in message and API_KEY not in message
    assert len(es_double.indices[reader.index].docs) == 4


async def test_elasticsearch_credentials_without_any_privilege_cannot_even_open(
    es_double: EsDouble, make_es_store: MakeEsStore
) -> None:
    es_double.secure(users={"cbir": PASSWORD}, role="monitoring_user")
    store = make_es_store(es_username="cbir", es_password=PASSWORD)
    with pytest.raises(StoreAuthError, match=r"action \[indices:admin/mappings/get\] is unauthorized") as caught:
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
