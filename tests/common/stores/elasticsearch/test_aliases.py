"""Versioned Elasticsearch indices behind one alias: what a rebuild builds beside the served index, how
`promote` moves the alias in one call that applies whole or not at all (also with two promotes at once), how a
deletion reaches the index being built, how a store notices the alias moved to another model, and how an index
from before aliases is refused by every opener, writing nothing, and replaced by a rebuild and a promote."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from elasticsearch import AsyncElasticsearch
from es_double import EsDouble
from es_fixtures import es_settings, filled
from factories import DIMS, make_documents

from services.common.errors import StoreError, StoreLayoutError, StoreMismatchError
from services.common.stores.elasticsearch import ElasticsearchStore, aliases, versioned_index
from services.common.stores.elasticsearch.aliases import alias_actions, check_aliases_answer
from services.common.stores.elasticsearch.errors import IndexRef
from services.common.stores.elasticsearch.mapping import document_source, index_body

if TYPE_CHECKING:
    from es_fixtures import MakeEsStore

pytestmark = pytest.mark.anyio
ALIAS = "cbir-test"  # es_settings' CBIR_ES_INDEX


@pytest.fixture
async def make_versioned(es_double: EsDouble) -> AsyncIterator:
    stores: list[ElasticsearchStore] = []

    def make(**overrides: object) -> ElasticsearchStore:
        store = ElasticsearchStore.from_settings(es_settings(es_double, **overrides), initial_backoff_s=0.01,
                                                 versioned=True)
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


# -- all or nothing -----------------------------------------------------------------------------


def test_the_alias_leaves_the_served_index_only_if_it_is_still_there_and_its_successor_is_the_write_index() -> None:
    ref = IndexRef(url="http://es:9200", index="cbir-test-v2", alias=ALIAS)
    assert alias_actions(ref, served="cbir-test-v1") == [
        {"remove": {"index": "cbir-test-v1", "alias": ALIAS, "must_exist": True}},
        {"add": {"index": "cbir-test-v2", "alias": ALIAS, "is_write_index": True}}]
    assert alias_actions(ref, served=None) == [{"add": {"index": "cbir-test-v2", "alias": ALIAS,
                                                        "is_write_index": True}}]
    # An index from before aliases is removed in the same call, which lets the alias take its name.
    assert alias_actions(ref, served=ALIAS)[0] == {"remove_index": {"index": ALIAS}}


def test_an_answer_of_partial_success_is_an_error_naming_the_failed_action() -> None:
    # The 200 of rest-api-spec indices.update_aliases/40_must_exist.yml "Partial success with must_exist == false"
    # (8.14+): the add applied, the remove found nothing.
    ref = IndexRef(url="http://es:9200", index="cbir-test-v2", alias=ALIAS)
    answer = {"acknowledged": True, "errors": True, "action_results": [
        {"action": {"type": "add", "indices": ["cbir-test-v2"], "aliases": [ALIAS]}, "status": 200},
        {"action": {"type": "remove", "indices": ["cbir-test-v1"], "aliases": [ALIAS]}, "status": 404,
         "error": {"type": "aliases_not_found_exception", "reason": "aliases [cbir-test] missing"}}]}
    with pytest.raises(StoreError, match=r"applied only part of moving the alias 'cbir-test' to 'cbir-test-v2': "
                                         r"remove \['cbir-test-v1'\]: 404 aliases_not_found_exception"):
        check_aliases_answer(answer, ref)
    check_aliases_answer({"acknowledged": True, "errors": False}, ref)


async def promote_together(stores: list[ElasticsearchStore], monkeypatch: pytest.MonkeyPatch
                           ) -> list[str | None | BaseException]:  # fmt: skip
    """Promote `stores` at once: every one has read what is served (and carried over) before any moves the alias."""
    all_read = asyncio.Barrier(len(stores))
    move_alias = aliases.move_alias

    async def move_when_all_have_read(*args: object, **kwargs: object) -> None:
        await asyncio.wait_for(all_read.wait(), timeout=10)
        await move_alias(*args, **kwargs)  # type: ignore[arg-type]

    async def carry_over(served: ElasticsearchStore) -> None:
        return None

    monkeypatch.setattr(aliases, "move_alias", move_when_all_have_read)
    return await asyncio.gather(*(store.promote(carry_over) for store in stores), return_exceptions=True)


async def test_two_promotes_at_once_leave_the_alias_on_one_index_a_gateway_opens(
        es_double: EsDouble, es_store, make_es_store: MakeEsStore, make_versioned,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Without must_exist, the later call's remove finds nothing, its add applies, and the alias is on two indices
    # (40_must_exist.yml, 8.14+); with it the later call is a 404 that changes nothing.
    await filled(es_store, model_version="v1")
    rebuilds = [make_versioned(), make_versioned()]
    await filled(rebuilds[0], model_version="v2")
    await filled(rebuilds[1], model_version="v3")
    outcomes = await promote_together(rebuilds, monkeypatch)
    [winner] = [store for store, outcome in zip(rebuilds, outcomes, strict=True) if outcome == "cbir-test-v1"]
    [refused] = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert isinstance(refused, StoreLayoutError)
    assert f"moved while {next(s.index for s in rebuilds if s is not winner)!r} was being promoted" in refused.message
    assert f"points at {winner.index!r} now" in refused.message and "changed nothing" in refused.message
    assert es_double.aliases == {ALIAS: {winner.index}}
    gateway = make_es_store()
    await gateway.open(dims=DIMS, model_version=winner.index.removeprefix("cbir-test-"), create=False)
    assert gateway.index == winner.index and await gateway.count() == 6


async def test_two_first_promotes_at_once_leave_the_alias_on_one_index(
        es_double: EsDouble, make_versioned, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing served yet: both calls only add, and the second write index is refused (500 illegal_state_exception,
    # IndexAbstraction.Alias: "alias [..] has more than one write index").
    async with AsyncElasticsearch(es_double.url, max_retries=0) as client:
        for version in ("v2", "v3"):
            await client.indices.create(index=f"cbir-test-{version}", **index_body(
                dims=DIMS, model_version=version, shards=2, replicas=0, index_options="hnsw"))
    rebuilds = [make_versioned(), make_versioned()]
    for store, version in zip(rebuilds, ("v2", "v3"), strict=True):
        await store.open(dims=DIMS, model_version=version, create=False)
    outcomes = await promote_together(rebuilds, monkeypatch)
    assert sorted(map(type, outcomes), key=str) == sorted([type(None), StoreLayoutError], key=str)
    assert len(es_double.aliases[ALIAS]) == 1


@pytest.fixture
def both_found_nothing_served(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every opener finds no index served, as two that looked at the same moment would."""

    async def nothing(*_: object) -> bool:
        return True

    monkeypatch.setattr(aliases, "nothing_served", nothing)


async def test_two_rebuilds_creating_the_first_index_at_once_put_one_behind_the_alias(
        es_double: EsDouble, make_versioned, both_found_nothing_served: None) -> None:
    # Both create their index with the alias as its write index: the second create is refused (a second write
    # index, 500) and creates nothing, and that rebuild's index is created beside the served one instead.
    first, second = make_versioned(), make_versioned()
    await first.open(dims=DIMS, model_version="v2")
    await second.open(dims=DIMS, model_version="v3")
    assert set(es_double.indices) == {"cbir-test-v2", "cbir-test-v3"}
    assert es_double.aliases == {ALIAS: {"cbir-test-v2"}}


async def test_two_index_runs_of_different_models_at_once_serve_one_and_name_it_to_the_other(
        es_double: EsDouble, make_es_store: MakeEsStore, both_found_nothing_served: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await make_es_store().open(dims=DIMS, model_version="v2")

    async def resolved_before_it(client: object, ref: object, model_version: str) -> str:
        return versioned_index(ALIAS, model_version)  # what the alias gave before the other index was created

    monkeypatch.setattr(aliases, "resolve_index", resolved_before_it)
    with pytest.raises(StoreLayoutError, match=r"^'cbir-test-v2' was put behind the alias 'cbir-test' while"):
        await make_es_store().open(dims=DIMS, model_version="v3")
    assert set(es_double.indices) == {"cbir-test-v2"} and es_double.aliases == {ALIAS: {"cbir-test-v2"}}


# -- an index from before aliases -----------------------------------------------------------------

WRITES = ("PUT", "DELETE")
WRITE_ENDPOINTS = ("/_bulk", "/_aliases", "/_reindex", "/_refresh", "/_mapping")


def writes(requests: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The requests that change something on the cluster."""
    return [(method, path) for method, path in requests
            if method in WRITES or path.endswith(WRITE_ENDPOINTS) or "/_create/" in path or "/_doc/" in path]


async def old_layout(es_double: EsDouble, documents: list) -> None:
    """What earlier versions made: a concrete index named CBIR_ES_INDEX, filled."""
    async with AsyncElasticsearch(es_double.url, max_retries=0) as client:
        await client.indices.create(index=ALIAS, **index_body(dims=DIMS, model_version="v1", shards=30, replicas=0,
                                                              index_options="hnsw"))
        await client.bulk(operations=[line for doc in documents
                                      for line in ({"index": {"_index": ALIAS, "_id": doc.id}}, document_source(doc))],
                          refresh=True)  # fmt: skip


async def test_an_index_from_before_aliases_is_refused_by_every_opener_which_writes_nothing(
        es_double: EsDouble, make_es_store: MakeEsStore) -> None:
    documents = make_documents(5, model_version="v1")
    await old_layout(es_double, documents)
    before = len(es_double.requests)
    for opening in (lambda store: store.open(dims=DIMS, model_version="v1", create=True),  # cbir index
                    lambda store: store.open(dims=DIMS, model_version="v1", create=False),  # a gateway
                    lambda store: store.open(dims=DIMS, model_version="v2", create=True),  # another model
                    lambda store: store.reset()):  # an index run told to rebuild on a mismatch
        with pytest.raises(StoreLayoutError) as refused:
            await opening(make_es_store())
        assert "'cbir-test' at http://127.0.0.1:" in refused.value.message
        assert "`cbir index --rebuild`" in refused.value.message and "`cbir promote VERSION`" in refused.value.message
    assert writes(es_double.requests[before:]) == []
    assert set(es_double.indices) == {ALIAS} and es_double.aliases == {}
    assert set(es_double.indices[ALIAS].docs) == {doc.id for doc in documents}


async def test_a_rebuild_then_a_promote_replace_an_index_from_before_aliases(
        es_double: EsDouble, make_es_store: MakeEsStore, make_versioned) -> None:
    await old_layout(es_double, make_documents(5, model_version="v1"))
    rebuild = make_versioned()
    await filled(rebuild, 5, model_version="v1")  # `cbir index --rebuild`: beside it, not behind the alias
    assert rebuild.index == "cbir-test-v1" and es_double.aliases == {}
    carried: list[str] = []

    async def carry_over(served: ElasticsearchStore) -> None:
        carried.append(served.index)
        assert await served.count() == 5  # the uploads are still there to carry over

    before = len(es_double.requests)
    assert await rebuild.promote(carry_over) == ALIAS  # `cbir promote v1`
    assert carried == [ALIAS]
    assert [r for r in es_double.requests[before:] if r[1] == "/_aliases"] == [("POST", "/_aliases")]
    assert es_double.aliases == {ALIAS: {"cbir-test-v1"}} and set(es_double.indices) == {"cbir-test-v1"}
    gateway = make_es_store()
    await gateway.open(dims=DIMS, model_version="v1", create=False)
    assert gateway.index == "cbir-test-v1" and await gateway.count() == 5


async def test_an_alias_on_two_indices_is_refused_naming_them(es_double: EsDouble, es_store: ElasticsearchStore,
                                                              make_versioned) -> None:
    await filled(es_store, model_version="v1")
    await filled(make_versioned(), model_version="v2")
    async with AsyncElasticsearch(es_double.url, max_retries=0) as client:
        await client.indices.update_aliases(actions=[{"add": {"index": "cbir-test-v2", "alias": ALIAS}}])
    with pytest.raises(StoreError, match=r"the alias 'cbir-test' at .* points at 2 indices \(cbir-test-v1, "
                                         r"cbir-test-v2\); point it at one"):  # fmt: skip
        await es_store.served_index()
