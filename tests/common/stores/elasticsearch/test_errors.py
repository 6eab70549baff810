"""The Elasticsearch store's errors (services/common/stores/elasticsearch/errors.py): the client's exceptions and
refused items as `CbirError`s naming the cluster, the index and the action, built here by hand, no cluster."""

from __future__ import annotations

from typing import Any

import pytest
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import (
    ApiError,
    AuthenticationException,
    AuthorizationException,
    BadRequestError,
    ConnectionError,
    ConnectionTimeout,
    NotFoundError,
    UnsupportedProductError,
)

from services.common.errors import CbirError, IndexNotReadyError, StoreAuthError, StoreError, StoreUnavailableError
from services.common.stores.elasticsearch.errors import (
    FAILURES_SHOWN,
    IndexRef,
    error_type,
    not_ready,
    reason,
    refusal,
    summary,
    translated,
)

URL = "http://es:9200"
REF = IndexRef(url=URL, index="cbir-images-v1", alias="cbir-images")
WHERE = f"Elasticsearch index 'cbir-images-v1' at {URL}"
PRIVILEGE = ("action [indices:data/write/bulk[s]] is unauthorized for user [reader] with effective roles [viewer] "
             "on indices [cbir-images-v1]")


def api_error(kind: type[ApiError], status: int, error: dict[str, Any] | None) -> ApiError:
    body = {"error": error, "status": status} if error is not None else None
    meta = ApiResponseMeta(status, "1.1", HttpHeaders(), 0.01, NodeConfig("http", "es", 9200))
    return kind(message=str(status), meta=meta, body=body)


def raised(exc: BaseException, ref: IndexRef = REF, doing: str = "indexing") -> CbirError:
    with pytest.raises(CbirError) as caught, translated(ref, doing):
        raise exc
    assert caught.value.__cause__ is exc  # the client's exception stays on the chain for the logs
    return caught.value


def test_a_reason_is_type_and_reason_with_its_cause() -> None:
    error = {"type": "mapper_parsing_exception", "reason": "failed to parse",
             "caused_by": {"type": "illegal_argument_exception", "reason": "dims [8] != [16]"}}
    assert reason({"error": error}) == ("mapper_parsing_exception: failed to parse "
                                        "(caused by illegal_argument_exception: dims [8] != [16])")
    assert reason({"_id": "a", "status": 429, "error": {"type": "es_rejected_execution_exception"}}) == \
        "es_rejected_execution_exception: "  # fmt: skip
    assert reason({"_id": "a", "status": 503}) == "status 503"  # an item with no error body
    assert reason({"error": "no such index"}) == "no such index"
    assert reason(None) == "None"


def test_the_error_type_is_read_from_an_exception_or_an_item() -> None:
    assert error_type(api_error(NotFoundError, 404, {"type": "index_not_found_exception"})) == \
        "index_not_found_exception"  # fmt: skip
    assert error_type({"_id": "a", "error": {"type": "version_conflict_engine_exception"}}) == \
        "version_conflict_engine_exception"  # fmt: skip
    assert error_type({"_id": "a", "found": False}) is None
    assert error_type(ValueError("no body")) is None


def test_a_summary_spells_out_the_first_failures_and_counts_the_rest() -> None:
    failures = {f"doc-{i}": "status 503" for i in range(FAILURES_SHOWN + 3)}
    text = summary(failures)
    assert text.startswith("doc-0 (status 503); doc-1 (status 503); ")
    assert f"doc-{FAILURES_SHOWN - 1} (status 503); and 3 more" in text and f"doc-{FAILURES_SHOWN} " not in text
    assert summary({"a": "x"}) == "a (x)"


def test_a_missing_index_says_what_builds_it() -> None:
    assert not_ready(REF).message == (f"there is no Elasticsearch index 'cbir-images' at {URL} (nor an alias of that "
                                      "name); build one with `cbir index`")
    rebuild = IndexRef(url=URL, index="cbir-images-v2", alias="cbir-images", versioned=True)
    assert not_ready(rebuild).message == (f"there is no Elasticsearch index 'cbir-images-v2' at {URL}; build it "
                                          "with `cbir index --rebuild`")


@pytest.mark.parametrize(("status", "expected"), [(429, StoreUnavailableError), (502, StoreUnavailableError),
                                                  (503, StoreUnavailableError), (504, StoreUnavailableError),
                                                  (400, StoreError), (409, StoreError), (500, StoreError)])
def test_a_refusal_is_unavailable_only_when_it_means_not_now(status: int, expected: type[CbirError]) -> None:
    error = refusal(status, {"error": {"type": "some_exception", "reason": "why"}}, "indexing", REF)
    assert type(error) is expected
    if expected is StoreError:
        assert error.message == f"{WHERE} refused indexing: {status} some_exception: why"
    else:
        assert error.message == (f"Elasticsearch at {URL} is overloaded or down while indexing "
                                 f"({status} some_exception: why)")


def test_the_transport_failures_are_unavailable_or_not_elasticsearch() -> None:
    slow = ConnectionTimeout("read timed out")
    timeout = raised(slow, doing="counting documents")
    assert isinstance(timeout, StoreUnavailableError)
    assert timeout.message == f"Elasticsearch at {URL} did not answer in time while counting documents: {slow}"
    down = raised(ConnectionError("connection refused"))
    assert isinstance(down, StoreUnavailableError) and down.message.startswith(f"cannot reach Elasticsearch at {URL} "
                                                                               "while indexing: ")
    other = raised(UnsupportedProductError("not es", api_error(ApiError, 200, None).meta, None))
    assert type(other) is StoreError and other.message == f"the server at {URL} is not Elasticsearch: not es"


def test_api_errors_are_translated_by_type_then_status() -> None:
    missing = raised(api_error(NotFoundError, 404, {"type": "index_not_found_exception", "reason": "no such index"}))
    assert isinstance(missing, IndexNotReadyError)
    full = raised(api_error(ApiError, 429, {"type": "es_rejected_execution_exception", "reason": "queue full"}))
    assert isinstance(full, StoreUnavailableError)
    assert "(429 es_rejected_execution_exception: queue full)" in full.message
    bad = raised(api_error(BadRequestError, 400, {"type": "parsing_exception", "reason": "unknown field"}))
    assert type(bad) is StoreError and bad.message == f"{WHERE} refused indexing: 400 parsing_exception: unknown field"


def test_no_credentials_refused_say_which_settings_to_set() -> None:
    error = raised(api_error(AuthenticationException, 401, {"type": "security_exception", "reason": "missing"}))
    assert isinstance(error, StoreAuthError)
    assert error.message == (f"Elasticsearch at {URL} requires credentials while indexing (401 security_exception: "
                             "missing); set CBIR_ES_API_KEY, or CBIR_ES_USERNAME/CBIR_ES_PASSWORD")


def test_wrong_credentials_name_the_settings_they_came_from_and_why() -> None:
    ref = IndexRef(url=URL, index="cbir-images-v1", alias="cbir-images", credentials_from="CBIR_ES_API_KEY")
    expired = {"type": "security_exception", "reason": "unable to authenticate with provided credentials",
               "additional_unsuccessful_credentials": "API key: api key is expired"}
    error = raised(api_error(AuthenticationException, 401, expired), ref)
    assert isinstance(error, StoreAuthError)
    assert error.message == (f"Elasticsearch at {URL} did not accept the credentials of CBIR_ES_API_KEY while "
                             "indexing (401 security_exception: unable to authenticate with provided credentials; "
                             "API key: api key is expired); correct CBIR_ES_API_KEY")


@pytest.mark.parametrize(("credentials_from", "account"), [("CBIR_ES_USERNAME/CBIR_ES_PASSWORD",
                                                            "the account of CBIR_ES_USERNAME/CBIR_ES_PASSWORD"),
                                                           (None, "the anonymous user")])
def test_a_missing_privilege_names_the_account_and_the_index(credentials_from: str | None, account: str) -> None:
    ref = IndexRef(url=URL, index="cbir-images-v1", alias="cbir-images", credentials_from=credentials_from)
    error = raised(api_error(AuthorizationException, 403, {"type": "security_exception", "reason": PRIVILEGE}), ref)
    assert isinstance(error, StoreAuthError)
    assert error.message == (f"Elasticsearch at {URL} refused indexing: {account} lacks a privilege on index "
                             f"'cbir-images-v1' (403 security_exception: {PRIVILEGE}); grant it, or set "
                             "CBIR_ES_API_KEY or CBIR_ES_USERNAME/CBIR_ES_PASSWORD to credentials that have it")


def test_what_is_not_a_client_error_passes_through() -> None:
    with pytest.raises(KeyError), translated(REF, "indexing"):
        raise KeyError("a bug is not the cluster's fault")
