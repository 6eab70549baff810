"""Who may add and delete images (services/search/access.py): a write key when keys are set, else only a
development server on loopback; and never a browser's cross-site request, whatever its key."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import HTTPException
from starlette.requests import Request

from services.search.access import verify_write_access, writes_open
from services.search.settings import SearchSettings

pytestmark = pytest.mark.anyio

KEY = "w-5be1c07d"
LOOPBACK = ("127.0.0.1", 8000)
PUBLISHED = ("0.0.0.0", 8000)

def request(*, server: tuple[str, int] | None = LOOPBACK, headers: dict[str, str] | None = None,
            **settings: Any) -> Request:
    """A request to a gateway running with `SearchSettings(**settings)`, to a server listening on `server`."""
    app = SimpleNamespace(state=SimpleNamespace(settings=SearchSettings(**settings)))
    host = f"{server[0]}:{server[1]}" if server else "search"
    sent = {"host": host} | {name.lower(): value for name, value in (headers or {}).items()}
    return Request({"type": "http", "method": "POST", "path": "/images", "app": app, "server": server,
                    "headers": [(name.encode(), value.encode()) for name, value in sent.items()]})


async def refusal(request: Request) -> HTTPException:
    with pytest.raises(HTTPException) as refused:
        await verify_write_access(request)
    return refused.value


# --- with write keys ----------------------------------------------------------------------------


async def test_with_write_keys_one_of_them_is_needed_anywhere() -> None:
    for environment in ("development", "production"):
        for key in (KEY, "w-other"):
            await verify_write_access(request(server=PUBLISHED, headers={"X-API-Key": key}, environment=environment,
                                              write_api_keys=["w-other", KEY]))


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "w-wrong"}, {"X-API-Key": ""}, {"X-API-Key": KEY.upper()}])
async def test_with_write_keys_a_missing_or_wrong_key_is_401_even_on_loopback(headers: dict[str, str]) -> None:
    refused = await refusal(request(server=LOOPBACK, headers=headers, write_api_keys=[KEY]))
    assert refused.status_code == 401 and "CBIR_WRITE_API_KEYS" in refused.detail
    assert refused.headers == {"WWW-Authenticate": "ApiKey"}


async def test_the_read_keys_do_not_open_writes() -> None:
    refused = await refusal(request(server=PUBLISHED, headers={"X-API-Key": "read"}, environment="production",
                                    api_keys=["read"]))
    assert refused.status_code == 403


# --- without write keys -------------------------------------------------------------------------


@pytest.mark.parametrize("server", [("127.0.0.1", 8000), ("127.0.0.2", 80), ("::1", 8000), ("localhost", 8000)])
async def test_without_keys_a_development_server_on_loopback_accepts_writes(server: tuple[str, int]) -> None:
    writing = request(server=server, environment="development")
    await verify_write_access(writing)
    assert writes_open(writing)


@pytest.mark.parametrize("server", [("0.0.0.0", 8000), ("192.168.1.20", 8000), ("::", 8000),
                                    ("/run/cbir.sock", 0), None])
async def test_without_keys_a_server_not_provably_on_loopback_refuses_writes(server: tuple[str, int] | None) -> None:
    writing = request(server=server, environment="development")
    refused = await refusal(writing)
    assert refused.status_code == 403 and "CBIR_WRITE_API_KEYS" in refused.detail
    assert not writes_open(writing)


async def test_without_keys_production_refuses_writes_even_on_loopback() -> None:
    writing = request(server=LOOPBACK, environment="production")
    assert (await refusal(writing)).status_code == 403
    assert not writes_open(writing)


async def test_writes_are_not_open_to_the_page_when_keys_are_set() -> None:
    assert not writes_open(request(server=LOOPBACK, write_api_keys=[KEY]))


# --- cross-site requests ------------------------------------------------------------------------


@pytest.mark.parametrize("origin", [
    "https://evil.example",
    "http://127.0.0.1:9000",  # another port is another origin
    "ftp://127.0.0.1:8000",  # not a web page's scheme
    "null",  # a sandboxed page or a file:// page
    "127.0.0.1:8000",  # no scheme
])
async def test_a_cross_site_write_is_refused_whatever_its_key(origin: str) -> None:
    refused = await refusal(request(server=LOOPBACK, headers={"Origin": origin, "X-API-Key": KEY},
                                    write_api_keys=[KEY]))
    assert refused.status_code == 403 and "cross-site write refused" in refused.detail and origin in refused.detail
    refused = await refusal(request(server=LOOPBACK, headers={"Origin": origin}))  # and with writes open
    assert refused.status_code == 403 and "cross-site" in refused.detail


@pytest.mark.parametrize("origin", ["http://127.0.0.1:8000", "https://127.0.0.1:8000", "HTTP://127.0.0.1:8000"])
async def test_the_server_s_own_page_may_write(origin: str) -> None:
    await verify_write_access(request(server=LOOPBACK, headers={"Origin": origin}))


async def test_the_host_is_compared_without_case() -> None:
    await verify_write_access(request(server=LOOPBACK, headers={"Host": "LocalHost:8000",
                                                                "Origin": "http://localhost:8000"}))


async def test_an_origin_of_cbir_cors_origins_may_write_with_its_key() -> None:
    allowed = "https://gallery.example"
    await verify_write_access(request(server=PUBLISHED, headers={"Origin": allowed, "X-API-Key": KEY},
                                      write_api_keys=[KEY], cors_origins=[allowed]))
    refused = await refusal(request(server=PUBLISHED, headers={"Origin": allowed, "X-API-Key": "w-wrong"},
                                    write_api_keys=[KEY], cors_origins=[allowed]))
    assert refused.status_code == 401  # the origin is allowed; the key still has to be right
