"""What the store checks before its first write: the privileges each kind of write needs (named when missing, with
nothing sent), a server recent enough for the index options it would create, and a cluster without security
let through. The pure parts on hand-built answers, the store on the double."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from elasticsearch import ApiError
from es_double import EsDouble
from es_fixtures import es_settings, filled
from factories import DIMS, make_documents

from services.common.errors import StoreAuthError, StoreError
from services.common.stores.elasticsearch import ElasticsearchStore
from services.common.stores.elasticsearch.preflight import (
    Access,
    check_server_version,
    missing_privileges,
    privilege_request,
    required_version,
    security_off,
)

if TYPE_CHECKING:
    from es_fixtures import MakeEsStore

pytestmark = pytest.mark.anyio
URL = "http://es:9200"
PASSWORD = "pw-preflight"


def test_each_access_asks_for_its_privileges_on_the_alias_and_its_versioned_indices() -> None:
    assert privilege_request(Access.write, "cbir-images") == {
        "cluster": [], "index": [{"names": ["cbir-images", "cbir-images-*"],
                                  "privileges": ["view_index_metadata", "read", "write"]}]}  # fmt: skip
    creating = privilege_request(Access.create, "cbir-images")
    assert creating["cluster"] == ["monitor"]
    assert set(creating["index"][0]["privileges"]) == {"create_index", "view_index_metadata", "read", "write",
                                                       "maintenance"}
    assert "manage" in privilege_request(Access.promote, "cbir-images")["index"][0]["privileges"]


def test_the_missing_privileges_are_grouped_by_what_lacks_them() -> None:
    answer = {"username": "cbir", "has_all_requested": False, "cluster": {"monitor": False},
              "index": {"cbir-images": {"read": True, "write": False},
                        "cbir-images-*": {"read": True, "write": False}}}  # fmt: skip
    assert missing_privileges(answer) == ["the cluster privileges [monitor]",
                                          "the index privileges [write] on [cbir-images, cbir-images-*]"]
    assert missing_privileges({**answer, "has_all_requested": True}) == []


def api_error(status: int, body: object) -> ApiError:
    class Meta:
        pass

    meta = Meta()
    meta.status = status  # type: ignore[attr-defined]
    return ApiError("refused", meta, body)  # type: ignore[arg-type]


def test_a_cluster_without_security_is_recognised_and_a_refusal_is_not() -> None:
    # 8.x: SecurityBaseRestHandler.checkFeatureAvailable (RestHasPrivilegesActionTests.testSecurityDisabled); 7.x:
    # SecurityActionFilter's "Security must be explicitly enabled"; no endpoint at all: RestController's 400.
    disabled = {"error": {"type": "illegal_state_exception",
                          "reason": "Security is not enabled but a security rest handler is registered"}, "status": 500}
    assert security_off(api_error(500, disabled))
    assert security_off(api_error(500, {"error": {"type": "exception", "reason": "Security must be explicitly "
                                                  "enabled when using a [basic] license."}, "status": 500}))
    assert security_off(api_error(400, {"error": "no handler found for uri [/_security/user/_has_privileges] and "
                                                 "method [POST]", "status": 400}))
    assert not security_off(api_error(403, {"error": {"type": "security_exception", "reason": "unauthorized"}}))
    assert not security_off(api_error(500, {"error": {"type": "illegal_state_exception", "reason": "other"}}))


@pytest.mark.parametrize(
    ("number", "options", "accepted"),
    [
        ("8.0.0", "hnsw", True), ("8.12.2", "flat", False), ("8.13.0", "flat", True),
        ("8.18.3", "int8_hnsw", False), ("8.19.0", "int8_hnsw", True), ("8.19.0", "bbq_flat", True),
        ("9.0.4", "bbq_hnsw", False), ("9.1.0", "int8_flat", True), ("10.0.0", "int8_hnsw", True),
        ("7.17.20", "hnsw", False),
    ],
)  # fmt: skip
def test_a_server_too_old_for_the_index_options_is_named(number: str, options: str, accepted: bool) -> None:
    info = {"version": {"number": number, "build_flavor": "default"}}
    if accepted:
        check_server_version(info, options, url=URL)
        return
    with pytest.raises(StoreError, match=rf"Elasticsearch at {URL} is {number}; CBIR_ES_INDEX_OPTIONS={options} "
                                         r"creates .* which needs .*: upgrade the cluster, or set "
                                         r"CBIR_ES_INDEX_OPTIONS=hnsw"):  # fmt: skip
        check_server_version(info, options, url=URL)


def test_every_option_the_setting_offers_has_a_known_version_and_serverless_is_not_held_to_it() -> None:
    from services.common.stores.elasticsearch import INDEX_OPTIONS

    assert {options: required_version(options, 8) for options in INDEX_OPTIONS} == {
        "hnsw": (8, 0, 0), "flat": (8, 13, 0), "int8_hnsw": (8, 19, 0), "bbq_hnsw": (8, 19, 0),
        "int8_flat": (8, 19, 0), "bbq_flat": (8, 19, 0)}  # fmt: skip
    check_server_version({"version": {"number": "8.11.0", "build_flavor": "serverless"}}, "bbq_hnsw", url=URL)


# -- the store, on the double --------------------------------------------------------------------


@pytest.fixture
async def signed_in(es_double: EsDouble) -> AsyncIterator:
    """Stores that sign in as `cbir` (give the double its role with `es_double.secure` first)."""
    stores: list[ElasticsearchStore] = []

    def make(**overrides: object) -> ElasticsearchStore:
        settings = es_settings(es_double, es_username="cbir", es_password=PASSWORD, **overrides)
        store = ElasticsearchStore.from_settings(settings, initial_backoff_s=0.01)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


def written(es_double: EsDouble, since: int) -> list[tuple[str, str]]:
    return [(method, path) for method, path in es_double.requests[since:]
            if method in ("PUT", "DELETE") or (method == "POST" and path.endswith(("/_bulk", "/_aliases")))]


async def test_an_index_run_without_create_index_is_refused_naming_it_before_anything_is_written(
        es_double: EsDouble, signed_in) -> None:
    es_double.secure(users={"cbir": PASSWORD}, cluster=["monitor"], index=["read", "write", "view_index_metadata"])
    with pytest.raises(StoreAuthError) as caught:
        await signed_in().open(dims=DIMS, model_version="v1")
    assert caught.value.message == (
        f"Elasticsearch at {es_double.url}: the account of CBIR_ES_USERNAME/CBIR_ES_PASSWORD (cbir) lacks the index "
        "privileges [create_index, maintenance] on [cbir-test, cbir-test-*], needed to create and fill an index; "
        "grant them (docs/elasticsearch.md, Privileges), or set CBIR_ES_API_KEY or CBIR_ES_USERNAME/CBIR_ES_PASSWORD "
        "to credentials that have them")
    assert written(es_double, 0) == [] and es_double.indices == {}


async def test_without_monitor_the_wait_for_a_new_index_would_fail_so_it_is_named_first(
        es_double: EsDouble, signed_in) -> None:
    es_double.secure(users={"cbir": PASSWORD}, cluster=[], index=["all"])
    with pytest.raises(StoreAuthError, match=r"lacks the cluster privileges \[monitor\], needed to create"):
        await signed_in().open(dims=DIMS, model_version="v1")
    assert es_double.indices == {}


async def test_a_server_too_old_for_the_options_is_refused_before_the_index_is_created(
        es_double: EsDouble, make_es_store: MakeEsStore) -> None:
    es_double.version = "8.18.1"
    with pytest.raises(StoreError, match=r"is 8\.18\.1; CBIR_ES_INDEX_OPTIONS=int8_hnsw creates 'int8_hnsw' vectors "
                                         r"with rescore_vector, which needs 8\.19 or later"):  # fmt: skip
        await make_es_store(es_index_options="int8_hnsw").open(dims=DIMS, model_version="v1")
    assert es_double.calls("/", method="GET") == 1 and written(es_double, 0) == []
    await make_es_store(es_index_options="hnsw").open(dims=DIMS, model_version="v1")  # hnsw is older than that


async def test_a_cluster_without_security_is_asked_once_and_let_through(
        es_double: EsDouble, make_es_store: MakeEsStore) -> None:
    # x-pack's feature info says so (SecurityInfoTransportAction), so _has_privileges' 500 is never asked for.
    store = make_es_store()
    await filled(store, 4)
    await store.upsert(make_documents(2, prefix="more"))
    await store.delete(["more-0000"])
    assert es_double.calls("/_xpack") == 1  # creating covers the writes after it
    assert es_double.calls("/_security/user/_has_privileges") == 0 and es_double.calls("/", method="GET") == 1


async def test_an_account_that_may_not_read_the_feature_info_is_still_checked(
        es_double: EsDouble, signed_in) -> None:
    # GET /_xpack needs cluster `monitor`: its 403 is security's own, so security is on.
    es_double.secure(users={"cbir": PASSWORD}, cluster=[], index=["read", "view_index_metadata"])
    store = signed_in()
    with pytest.raises(StoreAuthError, match=r"lacks the index privileges \[write\] on \[cbir-test, cbir-test-\*\]"):
        await store.remove("doc-0000")
    assert es_double.calls("/_security/user/_has_privileges") == 1


async def test_promoting_without_manage_is_refused_before_carrying_anything_over(
        es_double: EsDouble, es_store: ElasticsearchStore) -> None:
    await filled(es_store, model_version="v1")
    rebuild = ElasticsearchStore.from_settings(es_settings(es_double, es_username="cbir", es_password=PASSWORD),
                                               versioned=True)
    await filled(rebuild, model_version="v2")
    es_double.secure(users={"cbir": PASSWORD}, cluster=["monitor"],
                     index=["create_index", "view_index_metadata", "read", "write", "maintenance"])
    carried: list[str] = []

    async def carry_over(served: ElasticsearchStore) -> None:
        carried.append(served.index)

    try:
        with pytest.raises(StoreAuthError, match=r"lacks the index privileges \[manage\] .* to move the alias"):
            await rebuild.promote(carry_over)
    finally:
        await rebuild.close()
    assert carried == [] and es_double.aliases == {"cbir-test": {"cbir-test-v1"}}
