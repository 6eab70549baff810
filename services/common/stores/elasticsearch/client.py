"""The `AsyncElasticsearch` client of a store, built from `CBIR_ES_*`: URL, credentials (API key or basic auth),
timeouts and retries; and the URL as messages show it, without credentials."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elasticsearch import AsyncElasticsearch
from pydantic import AnyHttpUrl

from services.common.settings import StoreSettings

API_KEY_SETTING = "CBIR_ES_API_KEY"
BASIC_AUTH_SETTINGS = "CBIR_ES_USERNAME/CBIR_ES_PASSWORD"


@dataclass(frozen=True, slots=True)
class Connection:
    """A client, and what messages may say about it: the URL without credentials, and the settings naming the
    credentials it sends (None: it sends none)."""

    client: AsyncElasticsearch
    url: str
    credentials_from: str | None


def credentials(settings: StoreSettings) -> tuple[dict[str, Any], str | None]:
    """The client's auth keyword (an API key wins over basic auth; none when neither is set) and the settings
    it came from."""
    if settings.es_api_key is not None:
        return {"api_key": settings.es_api_key.get_secret_value()}, API_KEY_SETTING
    if settings.es_username is not None:
        password = settings.es_password.get_secret_value() if settings.es_password else ""
        return {"basic_auth": (settings.es_username, password)}, BASIC_AUTH_SETTINGS
    return {}, None


def shown_url(url: AnyHttpUrl) -> str:
    """`url` as messages and logs show it: scheme, host, port and path, never the user info it may carry."""
    return f"{url.scheme}://{url.host}:{url.port}{(url.path or '').rstrip('/')}"


def connect(settings: StoreSettings) -> Connection:
    """A client configured from `CBIR_ES_*` (it connects on its first request)."""
    auth, credentials_from = credentials(settings)
    client = AsyncElasticsearch(
        hosts=[str(settings.es_url)],
        request_timeout=settings.es_timeout_s,
        retry_on_timeout=True,
        max_retries=settings.es_max_retries,
        # 429s are left to the bulk helper, which backs off; the transport would not.
        retry_on_status=(502, 503, 504),
        **auth,
    )
    return Connection(client, shown_url(settings.es_url), credentials_from)
