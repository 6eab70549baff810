"""The client's exceptions and the cluster's refused items turned into `CbirError`s (services.common.errors) that
name the cluster, the index and the action: a missing index is `IndexNotReadyError`, refused credentials
`StoreAuthError`, an unreachable, overloaded or silent cluster `StoreUnavailableError`, any other refusal
`StoreError`. Pure: nothing here talks to the cluster."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from elasticsearch import (
    ApiError,
    AuthenticationException,
    AuthorizationException,
    ConnectionTimeout,
    TransportError,
    UnsupportedProductError,
)

from services.common.errors import CbirError, IndexNotReadyError, StoreAuthError, StoreError, StoreUnavailableError
from services.common.stores.elasticsearch.client import API_KEY_SETTING, BASIC_AUTH_SETTINGS

# Statuses that mean "not now" rather than "never": the caller may retry later (503).
UNAVAILABLE_STATUSES = frozenset({429, 502, 503, 504})
FAILURES_SHOWN = 10  # failed ids spelled out in an error message; all are on `.failures`
INDEX_NOT_FOUND = "index_not_found_exception"


@dataclass(frozen=True, slots=True)
class IndexRef:
    """The index a request names, as messages describe it: the cluster's URL (never with credentials), the alias
    the store serves behind, whether the index is a rebuild's (`versioned`), and the settings naming the
    credentials sent (None: none)."""

    url: str
    index: str
    alias: str
    versioned: bool = False
    credentials_from: str | None = None

    @property
    def where(self) -> str:
        return f"Elasticsearch index {self.index!r} at {self.url}"


def not_ready(ref: IndexRef) -> IndexNotReadyError:
    """There is no such index (yet): what builds it."""
    if ref.versioned:
        return IndexNotReadyError(f"there is no {ref.where}; build it with `cbir index --rebuild`")
    return IndexNotReadyError(f"there is no Elasticsearch index {ref.alias!r} at {ref.url} (nor an alias of "
                              "that name); build one with `cbir index`")


@contextlib.contextmanager
def translated(ref: IndexRef, doing: str) -> Iterator[None]:
    """Turn the client's exceptions into `CbirError`s that name the cluster and the action."""
    try:
        yield
    except ConnectionTimeout as exc:
        raise StoreUnavailableError(f"Elasticsearch at {ref.url} did not answer in time while {doing}: {exc}") from exc
    except UnsupportedProductError as exc:
        raise StoreError(f"the server at {ref.url} is not Elasticsearch: {exc}") from exc
    except TransportError as exc:
        raise StoreUnavailableError(f"cannot reach Elasticsearch at {ref.url} while {doing}: {exc}") from exc
    except ApiError as exc:
        raise api_error(exc, doing, ref) from exc


def api_error(exc: ApiError, doing: str, ref: IndexRef) -> CbirError:
    """The `CbirError` of an error answer of the API."""
    if isinstance(exc, AuthenticationException | AuthorizationException) and error_type(exc) != INDEX_NOT_FOUND:
        return auth_error(exc, doing, ref)
    return refusal(exc.meta.status, _body(exc), doing, ref)


def refusal(status: int, entry: Any, doing: str, ref: IndexRef) -> CbirError:
    """The `CbirError` of a refusal with `status` of an error body or an `_msearch` item (`entry`): not ready when
    the index is missing, unavailable when the status means "not now", else the store refused."""
    if error_type(entry) == INDEX_NOT_FOUND:
        return not_ready(ref)
    detail = f"{status} {reason(entry)}"  # the reason starts with the error type
    if status in UNAVAILABLE_STATUSES:
        return StoreUnavailableError(f"Elasticsearch at {ref.url} is overloaded or down while {doing} ({detail})")
    return StoreError(f"{ref.where} refused {doing}: {detail}")


def auth_error(exc: ApiError, doing: str, ref: IndexRef) -> StoreAuthError:
    """401: the credentials are missing or wrong; 403: they lack a privilege on the index.

    Elasticsearch's reason names the user or API key id, never the password or key.
    """
    body = _body(exc)
    detail = f"{exc.meta.status} {reason(body)}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("additional_unsuccessful_credentials"):
        detail += f"; {error['additional_unsuccessful_credentials']}"  # "API key: api key is expired"
    if isinstance(exc, AuthorizationException):
        account = f"the account of {ref.credentials_from}" if ref.credentials_from else "the anonymous user"
        return StoreAuthError(
            f"Elasticsearch at {ref.url} refused {doing}: {account} lacks a privilege on index "
            f"{ref.index!r} ({detail}); grant it, or set {API_KEY_SETTING} or {BASIC_AUTH_SETTINGS} "
            "to credentials that have it"
        )
    if ref.credentials_from is None:
        return StoreAuthError(
            f"Elasticsearch at {ref.url} requires credentials while {doing} ({detail}); "
            f"set {API_KEY_SETTING}, or {BASIC_AUTH_SETTINGS}"
        )
    return StoreAuthError(
        f"Elasticsearch at {ref.url} did not accept the credentials of {ref.credentials_from} "
        f"while {doing} ({detail}); correct {ref.credentials_from}"
    )


def error_type(source: BaseException | dict[str, Any] | None) -> str | None:
    """The `error.type` of an API error, or of an mget doc / bulk item / msearch item that carries one."""
    body = source if isinstance(source, dict) else _body(source)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("type")
    return None


def reason(entry: Any) -> str:
    """`type: reason` of an ES error, from an error body, a bulk item or an mget doc."""
    error = entry.get("error") if isinstance(entry, dict) else entry
    if isinstance(error, dict):
        text = f"{error.get('type', 'error')}: {error.get('reason', '')}"
        caused_by = error.get("caused_by")
        if isinstance(caused_by, dict) and caused_by.get("reason"):
            text += f" (caused by {caused_by.get('type')}: {caused_by['reason']})"
        return text
    if isinstance(entry, dict) and "status" in entry:
        return f"status {entry['status']}"
    return str(error)


def summary(failures: dict[str, str]) -> str:
    """The first `FAILURES_SHOWN` refused ids with their reasons, and how many more there are."""
    shown = [f"{doc_id} ({why})" for doc_id, why in list(failures.items())[:FAILURES_SHOWN]]
    more = len(failures) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def _body(exc: BaseException | None) -> Any:
    return getattr(exc, "body", None)
