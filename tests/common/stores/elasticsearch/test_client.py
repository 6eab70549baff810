"""The client of the Elasticsearch store (services/common/stores/elasticsearch/client.py): the credentials it
sends, the URL messages show, and a client that signs in to a secured double with them."""

from __future__ import annotations

import base64

import pytest
from es_double import EsDouble
from es_fixtures import es_settings
from pydantic import AnyHttpUrl

from services.common.settings import StoreSettings
from services.common.stores.elasticsearch.client import connect, credentials, shown_url

pytestmark = pytest.mark.anyio
PASSWORD = "s3cret-pa55"
KEY_SECRET = "k3y-s3cret"
API_KEY = base64.b64encode(f"key-id:{KEY_SECRET}".encode()).decode()


def settings(**values: object) -> StoreSettings:
    return StoreSettings(_env_file=None, **{"es_api_key": None, "es_username": None, "es_password": None,
                                            **values})  # type: ignore[call-arg]


def test_an_api_key_wins_over_basic_auth_and_none_means_no_credentials() -> None:
    assert credentials(settings(es_api_key=API_KEY, es_username="cbir", es_password=PASSWORD)) == (
        {"api_key": API_KEY}, "CBIR_ES_API_KEY")
    assert credentials(settings(es_username="cbir", es_password=PASSWORD)) == (
        {"basic_auth": ("cbir", PASSWORD)}, "CBIR_ES_USERNAME/CBIR_ES_PASSWORD")
    assert credentials(settings(es_username="cbir")) == ({"basic_auth": ("cbir", "")},
                                                         "CBIR_ES_USERNAME/CBIR_ES_PASSWORD")
    assert credentials(settings(es_password=PASSWORD)) == ({}, None)  # a password alone names nobody


@pytest.mark.parametrize(("url", "shown"), [
    ("http://elastic:url-password@es.example:9200/", "http://es.example:9200"),
    ("https://es.example/prefix/", "https://es.example:443/prefix"),
    ("http://127.0.0.1:9201", "http://127.0.0.1:9201"),
])  # fmt: skip
def test_the_url_is_shown_without_credentials(url: str, shown: str) -> None:
    assert shown_url(AnyHttpUrl(url)) == shown


@pytest.mark.parametrize("signed_in", [{"es_username": "cbir", "es_password": PASSWORD}, {"es_api_key": API_KEY}])
async def test_the_client_signs_in_with_the_credentials_set(es_double: EsDouble, signed_in: dict[str, str]) -> None:
    es_double.secure(users={"cbir": PASSWORD}, api_keys={"key-id": KEY_SECRET})
    connection = connect(es_settings(es_double, **signed_in))
    try:
        assert connection.url == es_double.url and connection.credentials_from in (
            "CBIR_ES_USERNAME/CBIR_ES_PASSWORD", "CBIR_ES_API_KEY")
        assert not await connection.client.indices.exists(index="nothing-yet")  # 404, not 401
    finally:
        await connection.client.close()
