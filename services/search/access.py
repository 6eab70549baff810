"""Who may add and delete images: `CBIR_WRITE_API_KEYS`, or nobody but a developer on loopback.

Writes are refused (403) unless
- `CBIR_WRITE_API_KEYS` is set and the request's `X-API-Key` is one of them (401 otherwise), or
- no write key is set, `CBIR_ENVIRONMENT` is `development` and the server listens on a loopback
  address (so `cbir serve` on 127.0.0.1 works out of the box, and a published port never does);
and a browser's cross-site request is refused whatever its key: an `Origin` that is neither the
server's own nor one of `CBIR_CORS_ORIGINS` (a form on another site posting to this one).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

from services.common.http import api_key_valid


async def verify_write_access(request: Request) -> None:
    """Dependency of every route that adds or deletes images."""
    settings = request.app.state.settings
    origin = request.headers.get("origin")
    if origin is not None and not _same_origin(origin, request) and origin not in settings.cors_origins:
        raise HTTPException(403, f"cross-site write refused: origin {origin!r} is not this server's and not in "
                                 "CBIR_CORS_ORIGINS")
    if settings.write_api_keys:
        if not api_key_valid(request.headers.get("x-api-key"), settings.write_api_keys):
            raise HTTPException(401, "adding and deleting images needs an X-API-Key header holding one of "
                                     "CBIR_WRITE_API_KEYS", headers={"WWW-Authenticate": "ApiKey"})
        return
    if settings.environment != "development" or not _on_loopback(request):
        raise HTTPException(403, "writes are disabled: set CBIR_WRITE_API_KEYS to accept them (without keys, only "
                                 "a development server on a loopback address accepts them)")


def writes_open(request: Request) -> bool:
    """Whether this request could write without a key (what the web page offers)."""
    settings = request.app.state.settings
    return not settings.write_api_keys and settings.environment == "development" and _on_loopback(request)


def _on_loopback(request: Request) -> bool:
    server = request.scope.get("server")
    host = server[0] if server else ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a Unix socket path, or no address: not provably local
        return False


def _same_origin(origin: str, request: Request) -> bool:
    parts = urlsplit(origin)
    host = request.headers.get("host", "")
    return bool(parts.netloc) and parts.netloc.lower() == host.lower() and parts.scheme in ("http", "https")
