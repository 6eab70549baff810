"""Versioned Elasticsearch indices behind one alias: what a rebuild builds beside the served index, how
`promote` moves the alias in one atomic call, how a deletion reaches the index being built, how a store
notices the alias moved to another model, and how an index from before aliases is moved behind one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from elasticsearch import AsyncElasticsearch
from es_double import EsDouble
from es_fixtures import es_settings, filled
from factories import DIMS, make_documents

from services.common.errors import StoreError, StoreMismatchError
from services.common.stores.elasticsearch import ElasticsearchStore, versioned_index
from services.common.stores.elasticsearch.mapping import document_source, index_body

if TYPE_CHECKING:
    from es_fixtures import MakeEsStore

pytestmark = pytest.mark.anyio
ALIAS = "cbir-test"  # es_settings' CBIR_ES_INDEX


@pytest.fixture
async def make_versioned(es_double: EsDouble) -> AsyncIterator:
    stores: list[ElasticsearchStore] = []

    def make() -> ElasticsearchStore:
        store = ElasticsearchStore.from_settings(es_settings(es_double), initial_backoff_s=0.01, versioned=True)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def test_the_first_index_is_versioned_and_behind_the_alias(es_double: EsDouble, es_store) -> None:
    await filled(es_store, model_version="v1")
    assert es_store.index == versioned_index(ALIAS, "v1") == "cbir-test-v1"
    assert es_double.aliases == {ALIAS: {"cbir-test-v1"}}
    assert versioned_index(ALIAS, "VGG16/10c w2.5") == "cbir-test-vgg16-10c-w2.5"


async def test_a_rebuild_fills_its_own_index_and_leaves_the_alias_alone(
        es_double: EsDouble, es_store, make_versioned) -> None:
    await filled(es_store, model_version="v1")
    rebuild = make_versioned()
    await filled(rebuild, 4, model_version="v2", prefix="new")
    assert rebuild.index == "cbir-test-v2" and es_double.aliases == {ALIAS: {"cbir-test-v1"}}
    assert await rebuild.served_index() == "cbir-test-v1"
    assert await es_store.count() == 6 and await rebuild.count() == 4


async def test_a_deletion_during_a_rebuild_reaches_the_index_being_built(es_store, make_versioned) -> None:
    await filled(es_store, model_version="v1")
    rebuild = make_versioned()
    await filled(rebuild, model_version="v2")  # the same ids: the same collection, another model
    assert await es_store.remove("doc-0003") is True
    assert await es_store.get("doc-0003") is None and await rebuild.get("doc-0003") is None
    assert await rebuild.count() == 5


async def test_promote_carries_over_then_moves_the_alias_in_one_call(
        es_double: EsDouble, es_store, make_versioned) -> None:
    await filled(es_store, model_version="v1")
    rebuild = make_versioned()
    await filled(rebuild, model_version="v2")
    carried: list[str] = []

    async def carry_over(served: ElasticsearchStore) -> None:
        carried.append(served.index)
        assert es_double.aliases == {ALIAS: {"cbir-test-v1"}}  # before the alias moves

    before = len(es_double.requests)
    assert await rebuild.promote(carry_over) == "cbir-test-v1"
    assert carried == ["cbir-test-v1"]
    assert es_double.aliases == {ALIAS: {"cbir-test-v2"}}
    assert [r for r in es_double.requests[before:] if r[1] == "/_aliases"] == [("POST", "/_aliases")]
    assert await rebuild.promote(carry_over) == "cbir-test-v2" and carried == ["cbir-test-v1"]  # nothing to do


async def test_a_store_notices_the_alias_moved_to_another_models_index(
        es_store, make_es_store: MakeEsStore, make_versioned) -> None:
    await filled(es_store, model_version="v1")
    await es_store.verify("v1")  # still served
    rebuild = make_versioned()
    await filled(rebuild, model_version="v2")

    async def nothing(served: ElasticsearchStore) -> None:
        return None

    await rebuild.promote(nothing)
    with pytest.raises(StoreMismatchError, match="now points at 'cbir-test-v2'.*'v2'"):
        await es_store.verify("v1")
    with pytest.raises(StoreMismatchError, match="v2"):  # reopening with the old model is refused too
        await make_es_store().open(dims=DIMS, model_version="v1", create=False)
    await make_es_store().open(dims=DIMS, model_version="v2", create=False)


async def test_an_index_from_before_aliases_is_moved_behind_one(es_double: EsDouble,
                                                                make_es_store: MakeEsStore) -> None:
    # What earlier versions made: a concrete index named CBIR_ES_INDEX, filled. (Whether this move stays is
    # for the Elasticsearch issue to settle; until then it works as it did.)
    documents = make_documents(5, model_version="v1")
    async with AsyncElasticsearch(es_double.url, max_retries=0) as client:
        await client.indices.create(index=ALIAS, **index_body(dims=DIMS, model_version="v1", shards=30, replicas=0,
                                                              index_options="hnsw"))
        await client.bulk(operations=[line for doc in documents
                                      for line in ({"index": {"_index": ALIAS, "_id": doc.id}}, document_source(doc))],
                          refresh=True)  # fmt: skip
    store = make_es_store()
    before = len(es_double.requests)
    await store.open(dims=DIMS, model_version="v1", create=False)
    assert store.index == "cbir-test-v1" and es_double.aliases == {ALIAS: {"cbir-test-v1"}}
    assert ALIAS not in es_double.indices and await store.count() == 5
    assert await store.get("doc-0003") == documents[3].stored()
    assert [r for r in es_double.requests[before:] if r[1] in ("/_reindex", "/_aliases")] == [
        ("POST", "/_reindex"), ("POST", "/_aliases")]


async def test_an_alias_on_two_indices_is_refused_naming_them(es_double: EsDouble, es_store: ElasticsearchStore,
                                                              make_versioned) -> None:
    await filled(es_store, model_version="v1")
    await filled(make_versioned(), model_version="v2")
    async with AsyncElasticsearch(es_double.url, max_retries=0) as client:
        await client.indices.update_aliases(actions=[{"add": {"index": "cbir-test-v2", "alias": ALIAS}}])
    with pytest.raises(StoreError, match=r"the alias 'cbir-test' at .* points at 2 indices \(cbir-test-v1, "
                                         r"cbir-test-v2\); point it at one"):  # fmt: skip
        await es_store.served_index()
