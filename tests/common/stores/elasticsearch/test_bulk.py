"""Writes of the Elasticsearch store (services/common/stores/elasticsearch/bulk.py): the actions, which items count
as refused, and the 503 retries of an index whose primaries are still starting, against the HTTP double."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from elasticsearch import AsyncElasticsearch
from es_double import EsDouble
from factories import DIMS, make_documents

from services.common.stores.elasticsearch import bulk
from services.common.stores.elasticsearch.errors import IndexRef
from services.common.stores.elasticsearch.mapping import document_source, index_body

pytestmark = pytest.mark.anyio
INDEX = "cbir-test-v1"


def test_the_actions_write_a_document_or_delete_one() -> None:
    [doc] = make_documents(1)
    assert bulk.index_action(doc, INDEX) == {"_op_type": "index", "_index": INDEX, "_id": doc.id,
                                             "_source": document_source(doc)}
    assert bulk.delete_action("a", INDEX) == {"_op_type": "delete", "_index": INDEX, "_id": "a"}


def test_refused_items_are_those_not_2xx_and_a_missing_delete_only_when_asked() -> None:
    items = [{"_id": "ok", "status": 201, "result": "created"},
             {"_id": "gone", "status": 404, "result": "not_found"},
             {"_id": "bad", "status": 400, "error": {"type": "document_parsing_exception", "reason": "dims"}},
             {"_id": "busy", "status": 429}]
    assert bulk.refused(items) == {"gone": "status 404", "bad": "document_parsing_exception: dims",
                                   "busy": "status 429"}
    assert bulk.refused(items, missing_ok=True) == {"bad": "document_parsing_exception: dims", "busy": "status 429"}


@pytest.fixture
async def client(es_double: EsDouble) -> AsyncIterator[AsyncElasticsearch]:
    async with AsyncElasticsearch(es_double.url, max_retries=0) as client:
        await client.indices.create(index=INDEX, **index_body(dims=DIMS, model_version="v1", shards=3, replicas=0,
                                                              index_options="hnsw"))
        yield client


async def test_503_items_are_retried_with_backoff_and_the_last_answer_of_an_id_counts(
    es_double: EsDouble, client: AsyncElasticsearch
) -> None:
    documents = make_documents(20)
    es_double.indices[INDEX].active_at = time.monotonic() + 0.1  # as if someone had just created it
    actions = [bulk.index_action(doc, INDEX) for doc in documents]
    actions.append(bulk.index_action(documents[0], INDEX))  # the same id again: one result for it
    items = await bulk.bulk(client, IndexRef(url=es_double.url, index=INDEX, alias="cbir-test"), actions, "indexing",
                            max_retries=6, initial_backoff_s=0.01)  # 0.01 ... 0.32 s of backoff: 0.63 s in all
    assert sorted(item["_id"] for item in items) == sorted(doc.id for doc in documents)
    assert bulk.refused(items) == {} and es_double.calls("/_bulk") > 1
    assert set(es_double.indices[INDEX].docs) == {doc.id for doc in documents}


async def test_503_items_beyond_the_retries_are_returned_refused(es_double: EsDouble,
                                                                 client: AsyncElasticsearch) -> None:
    es_double.indices[INDEX].active_at = time.monotonic() + 60
    items = await bulk.bulk(client, IndexRef(url=es_double.url, index=INDEX, alias="cbir-test"),
                            [bulk.index_action(doc, INDEX) for doc in make_documents(4)], "indexing",
                            max_retries=1, initial_backoff_s=0.01)  # fmt: skip
    assert len(bulk.refused(items)) == 4 and all(int(item["status"]) == 503 for item in items)
    assert es_double.calls("/_bulk") == 2
