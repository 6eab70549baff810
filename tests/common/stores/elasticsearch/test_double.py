"""The Elasticsearch double (tests/es_double.py) disagrees with the store where Elasticsearch 8.19 would: each test
drives it with the real client and holds it to the behaviour of the Elasticsearch source or REST API YAML test it
names (github.com/elastic/elasticsearch; `rest-api-spec/...yml` under rest-api-spec/src/yamlRestTest/resources/
rest-api-spec/test/, Java classes under server/ and x-pack/plugin/). A double that agreed with the store where the
cluster would not could only hide the store's mistakes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from elasticsearch import ApiError, AsyncElasticsearch
from es_double import EsDouble

pytestmark = pytest.mark.anyio

VECTOR = {"type": "dense_vector", "dims": 3, "similarity": "cosine", "index_options": {"type": "hnsw"}}
MAPPINGS = {"properties": {"f": VECTOR, "tag": {"type": "keyword"}}}


@pytest.fixture
async def client(es_double: EsDouble) -> AsyncIterator[AsyncElasticsearch]:
    async with AsyncElasticsearch(es_double.url, max_retries=0, request_timeout=10) as es:
        yield es


async def refused(call: Any) -> dict[str, Any]:
    """The error body of a call Elasticsearch refuses, with its status."""
    with pytest.raises(ApiError) as caught:
        await call
    return {"status": caught.value.meta.status, **caught.value.body}


async def two_indices_behind(client: AsyncElasticsearch, alias: str = "both") -> None:
    """`a` (docs a1, a2) and `b` (b1), refreshed, both behind `alias`."""
    for name, ids in (("a", ("a1", "a2")), ("b", ("b1",))):
        await client.indices.create(index=name, settings={"number_of_shards": 2}, mappings=MAPPINGS)
        await client.bulk(operations=[line for doc_id in ids
                                      for line in ({"index": {"_index": name, "_id": doc_id}},
                                                   {"f": [1.0, 0.5, 0.0], "tag": name})], refresh=True)  # fmt: skip
    await client.indices.update_aliases(actions=[{"add": {"index": "a", "alias": alias}},
                                                 {"add": {"index": "b", "alias": alias}}])


# -- aliases of several indices ------------------------------------------------------------------


async def test_an_alias_of_two_indices_is_searched_counted_and_exists_as_both(client: AsyncElasticsearch) -> None:
    # IndexNameExpressionResolver.concreteIndices: a search, count or mapping of an alias covers every index behind
    # it (server/src/internalClusterTest/java/org/elasticsearch/aliases/IndexAliasesIT.java searches such aliases).
    await two_indices_behind(client)
    found = await client.search(index="both", query={"match_all": {}})
    assert sorted((hit["_index"], hit["_id"]) for hit in found["hits"]["hits"]) == [("a", "a1"), ("a", "a2"),
                                                                                   ("b", "b1")]
    assert found["_shards"] == {"total": 4, "successful": 4, "skipped": 0, "failed": 0}
    assert (await client.count(index="both"))["count"] == 3
    assert (await client.indices.exists(index="both")).meta.status == 200
    assert set((await client.indices.get_mapping(index="both")).body) == {"a", "b"}
    answer = await client.msearch(index="both", searches=[{}, {"query": {"match_all": {}}, "size": 0}])
    assert answer["responses"][0]["hits"]["total"]["value"] == 3


async def test_a_single_document_read_through_an_alias_of_two_indices_is_refused(client: AsyncElasticsearch) -> None:
    # IndexNameExpressionResolver.concreteSingleIndex (get): "alias [..] has more than one index associated with it
    # [..], can't execute a single index op"; _mget answers it per document (TransportMultiGetAction).
    await two_indices_behind(client)
    error = await refused(client.get(index="both", id="a1"))
    assert error["status"] == 400 and error["error"]["type"] == "illegal_argument_exception"
    assert error["error"]["reason"] == ("alias [both] has more than one index associated with it [a, b], can't "
                                        "execute a single index op")
    [doc] = (await client.mget(index="both", ids=["a1"]))["docs"]
    assert doc["error"]["type"] == "illegal_argument_exception" and "more than one index" in doc["error"]["reason"]


async def test_a_write_through_an_alias_of_two_indices_fails_per_item_without_a_write_index(
        client: AsyncElasticsearch, es_double: EsDouble) -> None:
    # rest-api-spec bulk/10_basic.yml "Return item-level error when no write index defined for an alias".
    await two_indices_behind(client)
    answer = await client.bulk(operations=[{"index": {"_index": "both", "_id": "x"}}, {"tag": "x"}])
    [item] = answer["items"]
    assert answer["errors"] is True and item["index"]["status"] == 400
    assert item["index"]["error"]["type"] == "illegal_argument_exception"
    assert item["index"]["error"]["reason"] == (
        "no write index is defined for alias [both]. The write index may be explicitly disabled using "
        "is_write_index=false or the alias points to multiple indices without one being designated as a write index")
    error = await refused(client.create(index="both", id="y", document={"tag": "y"}))
    assert error["status"] == 400 and "no write index is defined for alias [both]" in error["error"]["reason"]
    # Flagged as the write index (IndexAbstraction.Alias.getWriteIndex), `b` takes the alias's writes.
    await client.indices.update_aliases(actions=[{"add": {"index": "b", "alias": "both", "is_write_index": True}}])
    answer = await client.bulk(operations=[{"index": {"_index": "both", "_id": "x"}}, {"tag": "x"}])
    assert answer["items"][0]["index"]["_index"] == "b" and "x" in es_double.indices["b"].docs
    assert (await client.indices.get_alias(name="both")).body == {
        "a": {"aliases": {"both": {}}}, "b": {"aliases": {"both": {"is_write_index": True}}}}


async def test_an_alias_never_has_two_write_indices(client: AsyncElasticsearch, es_double: EsDouble) -> None:
    # IndexAbstraction.Alias (Metadata validation): "alias [..] has more than one write index [..]", an
    # IllegalStateException, 500; the call changes nothing. Index creation with the alias is refused the same way
    # (MetadataCreateIndexServiceTests.testClusterStateCreateIndexThrowsWriteIndexValidationException).
    for name in ("a", "b", "c"):
        await client.indices.create(index=name)
    await client.indices.update_aliases(actions=[{"add": {"index": "a", "alias": "w", "is_write_index": True}}])
    error = await refused(client.indices.update_aliases(
        actions=[{"add": {"index": "b", "alias": "w", "is_write_index": True}}]))
    assert error["status"] == 500 and error["error"]["type"] == "illegal_state_exception"
    assert error["error"]["reason"] == "alias [w] has more than one write index [a,b]"
    error = await refused(client.indices.create(index="d", aliases={"w": {"is_write_index": True}}))
    assert error["status"] == 500 and "more than one write index [a,d]" in error["error"]["reason"]
    assert es_double.aliases == {"w": {"a"}} and "d" not in es_double.indices
    # Moved in one call (remove, then add), the write index changes: one at a time.
    await client.indices.update_aliases(actions=[{"remove": {"index": "a", "alias": "w"}},
                                                 {"add": {"index": "c", "alias": "w", "is_write_index": True}}])
    assert es_double.aliases == {"w": {"c"}}


# -- _aliases: all or nothing only with must_exist ------------------------------------------------


async def test_a_remove_that_must_exist_makes_the_call_all_or_nothing(client: AsyncElasticsearch,
                                                                      es_double: EsDouble) -> None:
    # rest-api-spec indices.update_aliases/40_must_exist.yml "Remove alias with must_exist"; the 404 is
    # AliasAction.Remove.apply's ResourceNotFoundException.
    await client.indices.create(index="test_index")
    await client.indices.update_aliases(actions=[{"add": {"index": "test_index", "aliases": "test_alias1"}}])
    await client.indices.update_aliases(actions=[
        {"remove": {"index": "test_index", "alias": "test_alias1", "must_exist": True}},
        {"add": {"index": "test_index", "alias": "test_alias2"}}])
    assert es_double.aliases == {"test_alias2": {"test_index"}}
    error = await refused(client.indices.update_aliases(actions=[
        {"remove": {"index": "test_index", "alias": "test_alias1", "must_exist": True}},
        {"add": {"index": "test_index", "alias": "test_alias3"}}]))
    assert error["status"] == 404 and error["error"]["type"] == "resource_not_found_exception"
    assert error["error"]["reason"] == "required alias [test_alias1] does not exist"
    assert es_double.aliases == {"test_alias2": {"test_index"}}  # test_alias3 was not added


@pytest.mark.parametrize("must_exist", [False, None])
async def test_a_remove_that_finds_nothing_otherwise_is_a_partial_success(
        client: AsyncElasticsearch, es_double: EsDouble, must_exist: bool | None) -> None:
    # 40_must_exist.yml "Partial success with must_exist == false" and "... == null (default)" (8.14+): 200,
    # errors: true, one result per action, the add applied.
    await client.indices.create(index="test_index")
    remove: dict[str, Any] = {"index": "test_index", "aliases": "test_non_existing"}
    if must_exist is not None:
        remove["must_exist"] = must_exist
    answer = await client.indices.update_aliases(actions=[{"add": {"index": "test_index", "aliases": "test_alias1"}},
                                                          {"remove": remove}])
    assert answer.meta.status == 200 and answer["errors"] is True
    first, second = answer["action_results"]
    assert first == {"action": {"type": "add", "indices": ["test_index"], "aliases": ["test_alias1"]}, "status": 200}
    assert second["action"] == {"type": "remove", "indices": ["test_index"], "aliases": ["test_non_existing"]}
    assert second["status"] == 404 and second["error"]["type"] == "aliases_not_found_exception"
    assert es_double.aliases == {"test_alias1": {"test_index"}}
    # "No action_results field if all actions successful"
    answer = await client.indices.update_aliases(actions=[{"add": {"index": "test_index", "aliases": "other"}}])
    assert answer.body == {"acknowledged": True, "errors": False}
    # A call whose every action found nothing fails whole (TransportIndicesAliasesAction: AliasesNotFoundException).
    error = await refused(client.indices.update_aliases(actions=[{"remove": remove}]))
    assert error["status"] == 404 and error["error"]["reason"] == "aliases [test_non_existing] missing"


async def test_must_exist_is_only_for_remove(client: AsyncElasticsearch) -> None:
    # 40_must_exist.yml "Alias must_exist only on remove": bad_request for add and remove_index.
    await client.indices.create(index="test_index")
    for action in ({"add": {"index": "test_index", "aliases": "test_alias1", "must_exist": True}},
                   {"remove_index": {"index": "test_index", "must_exist": True}}):
        assert (await refused(client.indices.update_aliases(actions=[action])))["status"] == 400


# -- bulk create ----------------------------------------------------------------------------------


async def test_bulk_create_writes_a_new_id_and_refuses_an_existing_one(client: AsyncElasticsearch) -> None:
    # rest-api-spec bulk/10_basic.yml "Empty _id with op_type create"; an existing id is InternalEngine's
    # version_conflict_engine_exception, 409, per item.
    await client.indices.create(index="test", mappings=MAPPINGS)
    answer = await client.bulk(refresh=True, operations=[
        {"index": {"_index": "test", "_id": ""}}, {"tag": "1"},
        {"index": {"_index": "test", "_id": "id"}}, {"tag": "2"},
        {"create": {"_index": "test"}}, {"tag": "4"},
        {"create": {"_index": "test", "_id": "id"}}, {"tag": "5"}])
    index, _, created, conflict = (next(iter(item.values())) for item in answer["items"])
    assert answer["errors"] is True
    assert index["status"] == 400 and index["error"]["reason"] == "if _id is specified it must not be empty"
    assert created["result"] == "created" and created["status"] == 201
    assert conflict["status"] == 409 and conflict["error"]["type"] == "version_conflict_engine_exception"
    assert conflict["error"]["reason"] == "[id]: version conflict, document already exists (current version [1])"
    assert (await client.count(index="test"))["count"] == 2


# -- searches -------------------------------------------------------------------------------------


async def test_knn_without_k_or_num_candidates_defaults_them_from_the_size(client: AsyncElasticsearch) -> None:
    # KnnSearchBuilder.Builder.build (8.13+): k defaults to the search's size (10), num_candidates to
    # round(min(1.5 × k, 10,000)); then checked as its constructor checks them.
    await client.indices.create(index="v", settings={"number_of_shards": 1}, mappings=MAPPINGS)
    await client.bulk(refresh=True, operations=[line for i in range(12) for line in (
        {"index": {"_index": "v", "_id": f"d{i}"}}, {"f": [1.0, i / 10, 0.5]})])
    knn = {"field": "f", "query_vector": [1.0, 0.0, 0.0]}
    assert len((await client.search(index="v", knn=knn))["hits"]["hits"]) == 10
    assert len((await client.search(index="v", knn=knn, size=4))["hits"]["hits"]) == 4
    assert len((await client.search(index="v", knn={**knn, "k": 3}, size=12))["hits"]["hits"]) == 3
    error = await refused(client.search(index="v", knn={**knn, "k": 8, "num_candidates": 5}))
    assert error["error"]["reason"] == "[num_candidates] cannot be less than [k]"


async def test_what_every_shard_refuses_fails_the_search_as_all_shards_failed(client: AsyncElasticsearch) -> None:
    # DefaultSearchContext.preProcess (the result window) and SearchAfterBuilder.buildFieldDoc (search_after without
    # a sort) throw on each shard; AbstractSearchAsyncAction answers "all shards failed", caused by the first
    # shard's root cause, with its status (SearchPhaseExecutionException.status).
    await client.indices.create(index="v", settings={"number_of_shards": 3}, mappings=MAPPINGS)
    error = await refused(client.search(index="v", from_=9_995, size=10))
    assert error["status"] == 400 and error["error"]["type"] == "search_phase_execution_exception"
    assert error["error"]["reason"] == "all shards failed" and error["error"]["grouped"] is True
    window = ("Result window is too large, from + size must be less than or equal to: [10000] but was [10005]. "
              "See the scroll api for a more efficient way to request large data sets. This limit can be set by "
              "changing the [index.max_result_window] index level setting.")
    assert error["error"]["caused_by"] == {"type": "illegal_argument_exception", "reason": window}
    assert error["error"]["root_cause"] == [{"type": "illegal_argument_exception", "reason": window}]
    assert [failure["shard"] for failure in error["error"]["failed_shards"]] == [0]  # the same failure, grouped
    error = await refused(client.search(index="v", search_after=["x"]))
    assert error["error"]["type"] == "search_phase_execution_exception"
    assert error["error"]["caused_by"]["reason"] == "Sort must contain at least one field."
    [item] = (await client.msearch(index="v", searches=[{}, {"from": 9_995, "size": 10}]))["responses"]
    assert item["status"] == 400 and item["error"]["type"] == "search_phase_execution_exception"


async def test_a_count_some_shards_fail_is_short_and_says_so(client: AsyncElasticsearch, es_double: EsDouble) -> None:
    # RestCountAction runs a size-0 search: a failed shard is in `_shards.failures` and its documents are missing.
    await client.indices.create(index="v", settings={"number_of_shards": 4}, mappings=MAPPINGS)
    await client.bulk(refresh=True, operations=[line for i in range(20) for line in (
        {"index": {"_index": "v", "_id": f"d{i}"}}, {"tag": "t"})])
    es_double.break_shards(1)
    answer = await client.count(index="v")
    on_shard_1 = sum(es_double.indices["v"].shard_of(f"d{i}") == 1 for i in range(20))
    assert answer["count"] == 20 - on_shard_1 and on_shard_1 > 0
    assert answer["_shards"]["failed"] == 1 and answer["_shards"]["failures"][0]["shard"] == 1


# -- refresh --------------------------------------------------------------------------------------


async def test_an_unrefreshed_write_becomes_searchable_within_about_a_second(client: AsyncElasticsearch) -> None:
    # IndexService's scheduled refresh every index.refresh_interval, 1s unless set (IndexSettings).
    await client.indices.create(index="v", mappings=MAPPINGS)
    written = time.monotonic()
    await client.bulk(operations=[{"index": {"_index": "v", "_id": "a"}}, {"tag": "a"}])
    while (await client.count(index="v"))["count"] == 0:
        assert time.monotonic() - written < 5, "never refreshed"
        await asyncio.sleep(0.05)
    assert time.monotonic() - written < 2.5


async def test_wait_for_answers_once_a_refresh_made_the_write_searchable(client: AsyncElasticsearch,
                                                                        es_double: EsDouble) -> None:
    # RefreshListeners: refresh=wait_for holds the answer until the next refresh, the scheduled one or any other;
    # with index.refresh_interval -1 only an explicit refresh comes.
    await client.indices.create(index="v", settings={"refresh_interval": "-1"}, mappings=MAPPINGS)
    waiting = asyncio.create_task(client.bulk(refresh="wait_for", operations=[{"index": {"_index": "v", "_id": "a"}},
                                                                              {"tag": "a"}]))  # fmt: skip
    deadline = time.monotonic() + 5
    while "a" not in es_double.indices["v"].docs:  # written, and held until a refresh
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert not waiting.done() and (await client.count(index="v"))["count"] == 0
    await client.indices.refresh(index="v")
    answer = await asyncio.wait_for(waiting, timeout=5)
    assert answer["errors"] is False and (await client.count(index="v"))["count"] == 1
    # With the default interval, the answer comes with the next scheduled refresh, and the write is searchable.
    await client.indices.create(index="w", mappings=MAPPINGS)
    await client.bulk(refresh="wait_for", operations=[{"index": {"_index": "w", "_id": "b"}}, {"tag": "b"}])
    assert (await client.count(index="w"))["count"] == 1


# -- the REST layer -------------------------------------------------------------------------------


async def test_a_query_parameter_the_endpoint_does_not_take_is_refused(client: AsyncElasticsearch,
                                                                       es_double: EsDouble) -> None:
    # BaseRestHandler.handleRequest / unrecognized: 400, naming the near ones as "did you mean".
    await client.indices.create(index="v")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{es_double.url}/v/_search?refrsh=true&size=1") as response:
            body = await response.json(content_type=None)
        assert response.status == 400 and body["error"]["type"] == "illegal_argument_exception"
        assert body["error"]["reason"] == "request [/v/_search] contains unrecognized parameter: [refrsh]"
        async with session.post(f"{es_double.url}/_bulk?refrsh=true&color=red", data="\n",
                                headers={"Content-Type": "application/x-ndjson"}) as response:
            body = await response.json(content_type=None)
        assert body["error"]["reason"] == ("request [/_bulk] contains unrecognized parameters: [color], [refrsh] -> "
                                           "did you mean [refresh]?")
        # RestController: an unknown path is a 400, a known one with another method a 405.
        async with session.get(f"{es_double.url}/v/_nothing/x/y") as response:
            assert response.status == 400
        async with session.delete(f"{es_double.url}/v/_search") as response:
            assert response.status == 405 and "allowed: [GET, POST]" in (await response.json())["error"]


async def test_health_of_a_missing_index_is_red_and_times_out(client: AsyncElasticsearch) -> None:
    # TransportClusterHealthAction.prepareResponse: a named index that does not exist makes the status red and is
    # waited for until the timeout; then ClusterHealthResponse.status() is 408.
    started = time.monotonic()
    answer = await client.options(ignore_status=408).cluster.health(index="missing", timeout="200ms")
    assert answer.meta.status == 408 and answer["status"] == "red" and answer["timed_out"] is True
    assert time.monotonic() - started >= 0.2
    await client.indices.create(index="here", settings={"number_of_replicas": 0})
    assert (await client.cluster.health(index="here", timeout="200ms"))["status"] == "green"


async def test_the_root_names_the_version(client: AsyncElasticsearch, es_double: EsDouble) -> None:
    # RestMainAction / MainResponse.toXContent.
    es_double.version = "8.18.2"
    info = await client.info()
    assert info["version"]["number"] == "8.18.2" and info["tagline"] == "You Know, for Search"


async def test_has_privileges_answers_each_privilege_and_500_without_security(
        client: AsyncElasticsearch, es_double: EsDouble) -> None:
    # x-pack/plugin/security/src/test/java/org/elasticsearch/xpack/security/rest/action/user/
    # RestHasPrivilegesActionTests.testSecurityDisabled: 500, "Security is not enabled but a security rest handler
    # is registered" (SecurityBaseRestHandler.checkFeatureAvailable).
    asked = {"cluster": ["monitor"], "index": [{"names": ["cbir-*"], "privileges": ["create_index", "write"]}]}
    error = await refused(client.security.has_privileges(**asked))
    assert error["status"] == 500 and error["error"]["type"] == "illegal_state_exception"
    assert error["error"]["reason"] == "Security is not enabled but a security rest handler is registered"
    # TransportHasPrivilegesAction: each privilege held itself or through one that covers it (manage covers
    # create_index).
    es_double.secure(users={"cbir": "pw"}, cluster=[], index=["manage", "read"])
    async with AsyncElasticsearch(es_double.url, basic_auth=("cbir", "pw"), max_retries=0) as signed_in:
        answer = await signed_in.security.has_privileges(**asked)
    assert answer.body == {"username": "cbir", "has_all_requested": False, "cluster": {"monitor": False},
                           "index": {"cbir-*": {"create_index": True, "write": False}}, "application": {}}
