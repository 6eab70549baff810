"""An index on the cluster (services/common/stores/elasticsearch/indices.py), against the HTTP double: created
once and waited for, its mapping read back through an alias, deleted whether or not it exists."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from elasticsearch import AsyncElasticsearch
from es_double import EsDouble
from factories import DIMS

from services.common.errors import StoreUnavailableError
from services.common.stores.elasticsearch import indices
from services.common.stores.elasticsearch.errors import IndexRef
from services.common.stores.elasticsearch.mapping import index_body

pytestmark = pytest.mark.anyio
BODY = index_body(dims=DIMS, model_version="v1", shards=3, replicas=0, index_options="hnsw")


@pytest.fixture
async def client(es_double: EsDouble) -> AsyncIterator[AsyncElasticsearch]:
    async with AsyncElasticsearch(es_double.url, max_retries=0) as client:
        yield client


def ref(es_double: EsDouble, index: str = "cbir-test-v1") -> IndexRef:
    return IndexRef(url=es_double.url, index=index, alias="cbir-test")


async def test_an_index_is_created_once_and_its_primaries_waited_for(es_double: EsDouble,
                                                                     client: AsyncElasticsearch) -> None:
    es_double.primaries_start_s = 0.2
    assert await indices.create_index(client, ref(es_double), BODY) is True
    assert es_double.indices["cbir-test-v1"].active  # started before create_index returned
    assert es_double.calls("/_cluster/health/cbir-test-v1") == 1
    assert await indices.create_index(client, ref(es_double), BODY) is False  # a concurrent creator won


async def test_primaries_that_never_start_are_unavailable_after_the_wait(
    es_double: EsDouble, client: AsyncElasticsearch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(indices, "PRIMARIES_WAIT_S", 0.2)
    es_double.primaries_start_s = 60
    expected = r"the primaries of Elasticsearch index 'cbir-test-v1' at .* did not start within 0.2 s \(health red"
    with pytest.raises(StoreUnavailableError, match=expected + r", 3 initializing"):
        await indices.create_index(client, ref(es_double), BODY)


async def test_a_mapping_is_read_through_an_alias_and_none_when_missing(es_double: EsDouble,
                                                                        client: AsyncElasticsearch) -> None:
    assert await indices.read_mapping(client, ref(es_double)) is None
    await indices.create_index(client, ref(es_double), {**BODY, "aliases": {"cbir-test": {}}})
    mapping = await indices.read_mapping(client, ref(es_double, "cbir-test"))
    assert mapping is not None and mapping["_meta"] == {"model_version": "v1", "schema": 2}
    assert mapping["properties"]["features"]["dims"] == DIMS
    assert await indices.index_exists(client, ref(es_double), "cbir-test-v1")
    assert not await indices.index_exists(client, ref(es_double), "cbir-test-v2")


async def test_deleting_an_index_that_is_not_there_is_no_error(es_double: EsDouble,
                                                                client: AsyncElasticsearch) -> None:
    await indices.delete_index(client, ref(es_double))
    await indices.create_index(client, ref(es_double), BODY)
    await indices.delete_index(client, ref(es_double))
    assert "cbir-test-v1" not in es_double.indices
