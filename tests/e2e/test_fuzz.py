"""Schema-driven fuzzing (schemathesis) of both apps, served on localhost: no 5xx, and every
response conforms to the OpenAPI schema the app publishes (status codes, content types, bodies,
headers). Bounded: a few dozen examples per operation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from servers import serve_in_thread

pytestmark = pytest.mark.slow  # a served app per test and a few dozen examples per operation

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection]


@schemathesis.check
def only_announced_unavailability(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                                  case: schemathesis.Case) -> bool | None:
    """Before the index exists a 503 with Retry-After is the right answer; any other 5xx is a bug."""
    if response.status_code >= 500:
        assert response.status_code == 503, f"{response.status_code}: {response.text[:200]}"
        assert int(response.headers["retry-after"][0]) > 0
    return None


UNREADY_CHECKS = [check for check in CHECKS if check is not not_a_server_error] + [only_announced_unavailability]
FUZZ_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))


@pytest.fixture
def search_schema(indexed_state: Path):
    from services.serve.apps import gateway_app

    with serve_in_thread(gateway_app()) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


@pytest.fixture
def unready_search_schema(cbir_env: Path):
    """The gateway before `cbir index` ran: every search and health check is a 503."""
    from services.serve.apps import gateway_app

    with serve_in_thread(gateway_app()) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


@pytest.fixture
def embedder_schema(cbir_env: Path):
    from services.serve.apps import embedder_app

    with serve_in_thread(embedder_app()) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


search = schemathesis.pytest.from_fixture("search_schema")
unready_search = schemathesis.pytest.from_fixture("unready_search_schema")
embedder = schemathesis.pytest.from_fixture("embedder_schema")


@search.parametrize()
@FUZZ_SETTINGS
def test_search_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS, timeout=30)


@unready_search.parametrize()
@FUZZ_SETTINGS
def test_unready_search_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=UNREADY_CHECKS, timeout=30)


@embedder.parametrize()
@FUZZ_SETTINGS
def test_embedder_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS, timeout=30)
