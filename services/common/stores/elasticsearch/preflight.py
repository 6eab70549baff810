"""What the cluster must be and allow before a store writes to it: a server recent enough for the index it would
create (`GET /`), and the privileges its writes need (`_security/user/_has_privileges`), each refused with an error
that names what is missing instead of a 400 or a 403 halfway through a run.

    creating an index (`cbir index`)   cluster `monitor`; on the alias and its versioned indices `create_index`,
                                       `view_index_metadata`, `read`, `write`, `maintenance`; and the server's version
    writing documents (uploads)        `view_index_metadata`, `read`, `write`
    promoting (`cbir promote`)         the above and `manage` (the `_aliases` call)

Whether the cluster runs security at all is read first (`GET /_xpack`: `features.security.enabled`; a 403 to it
means security is on, a 400 or 404 that there is no x-pack): without security every privilege is held, and
`_has_privileges` would only answer 500 "Security is not enabled" (SecurityBaseRestHandler), which the client
takes for a failed node. The version each index option needs is in docs/elasticsearch.md.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any

from elasticsearch import ApiError, AsyncElasticsearch

from services.common.errors import StoreAuthError, StoreError
from services.common.stores.elasticsearch.client import API_KEY_SETTING, BASIC_AUTH_SETTINGS
from services.common.stores.elasticsearch.errors import IndexRef, translated
from services.common.stores.elasticsearch.mapping import INDEX_OPTIONS_SETTING

Version = tuple[int, int, int]

# The oldest server that accepts each CBIR_ES_INDEX_OPTIONS type as the store sends it. Every quantised type is sent
# with `rescore_vector` (mapping.RESCORE_OVERSAMPLE), which index options take from 8.19 on 8.x
# (elastic/elasticsearch#127644, the backport of #124581) and from 9.1 on 9.x; before that the type alone came in
# 8.12 (int8_hnsw), 8.13 (flat, int8_flat) and 8.16 (bbq_hnsw, bbq_flat). hnsw index_options exist since 8.0.
FLOAT_TYPE_SINCE: dict[str, Version] = {"hnsw": (8, 0, 0), "flat": (8, 13, 0)}
RESCORE_VECTOR_SINCE: dict[int, Version] = {8: (8, 19, 0), 9: (9, 1, 0)}  # by major version; later majors have it


class Access(Enum):
    """What a store is about to do, and so which privileges it needs."""

    write = "write documents"
    create = "create and fill an index"
    promote = "move the alias"


CLUSTER_PRIVILEGES: dict[Access, tuple[str, ...]] = {
    Access.write: (),
    Access.create: ("monitor",),  # GET / and _cluster/health (the wait for a new index's primaries)
    Access.promote: ("monitor",),
}
INDEX_PRIVILEGES: dict[Access, tuple[str, ...]] = {
    Access.write: ("view_index_metadata", "read", "write"),  # resolve the alias; get, search, index, delete
    Access.create: ("create_index", "view_index_metadata", "read", "write", "maintenance"),  # maintenance: _refresh
    Access.promote: ("create_index", "view_index_metadata", "read", "write", "maintenance", "manage"),
}


def privilege_request(access: Access, alias: str) -> dict[str, Any]:
    """The `_has_privileges` body of `access`, on the alias and every versioned index behind it."""
    return {"cluster": list(CLUSTER_PRIVILEGES[access]),
            "index": [{"names": [alias, f"{alias}-*"], "privileges": list(INDEX_PRIVILEGES[access])}]}


def missing_privileges(answer: dict[str, Any]) -> list[str]:
    """What a `_has_privileges` answer says is not held, grouped: `the cluster privileges [monitor]`, `the index
    privileges [create_index, write] on [cbir-images, cbir-images-*]`."""
    if answer.get("has_all_requested"):
        return []
    missing = []
    cluster = [name for name, held in answer.get("cluster", {}).items() if not held]
    if cluster:
        missing.append(f"the cluster privileges [{', '.join(cluster)}]")
    lacking_on: dict[tuple[str, ...], list[str]] = {}
    for index, privileges in answer.get("index", {}).items():
        lacking = tuple(name for name, held in privileges.items() if not held)
        if lacking:
            lacking_on.setdefault(lacking, []).append(index)
    missing += [f"the index privileges [{', '.join(lacking)}] on [{', '.join(names)}]"
                for lacking, names in lacking_on.items()]  # fmt: skip
    return missing


SECURITY_OFF = re.compile(r"Security is not enabled|Security must be explicitly enabled|no handler found for uri")


def security_off(exc: ApiError) -> bool:
    """A `_has_privileges` refusal that means the cluster runs without security (every request is let in): 500
    "Security is not enabled but a security rest handler is registered" (8.x), the 7.x "Security must be explicitly
    enabled", or no such endpoint (400 "no handler found")."""
    body = getattr(exc, "body", None)
    text = json.dumps(body) if isinstance(body, dict) else str(body)
    return exc.meta.status in (400, 500) and SECURITY_OFF.search(text) is not None


async def security_enabled(client: AsyncElasticsearch, ref: IndexRef) -> bool:
    """Whether the cluster authenticates and authorizes requests: x-pack's feature info (SecurityInfoTransportAction:
    `xpack.security.enabled`); refused (403) only by security itself; absent (400, 404) without x-pack."""
    with translated(ref, "asking whether security is enabled"):
        response = await client.options(ignore_status=(400, 403, 404)).xpack.info(categories="features")
    if response.meta.status == 403:
        return True
    if response.meta.status != 200:
        return False
    return bool(response.body.get("features", {}).get("security", {}).get("enabled", True))


async def check_privileges(client: AsyncElasticsearch, ref: IndexRef, access: Access) -> None:
    """Raise `StoreAuthError` naming every privilege `access` needs that the credentials lack (nothing to check on
    a cluster without security)."""
    if not await security_enabled(client, ref):
        return
    doing = f"checking the privileges to {access.value}"
    with translated(ref, doing):
        try:
            response = await client.security.has_privileges(**privilege_request(access, ref.alias))
        except ApiError as exc:
            if security_off(exc):
                return
            raise
    missing = missing_privileges(response.body)
    if missing:
        account = f"the account of {ref.credentials_from}" if ref.credentials_from else "the anonymous user"
        who = response.body.get("username")
        raise StoreAuthError(
            f"Elasticsearch at {ref.url}: {account}{f' ({who})' if who else ''} lacks {' and '.join(missing)}, "
            f"needed to {access.value}; grant them (docs/elasticsearch.md, Privileges), or set {API_KEY_SETTING} "
            f"or {BASIC_AUTH_SETTINGS} to credentials that have them"
        )


def parse_version(number: str) -> Version:
    """`8.19.0`, `9.1.0-SNAPSHOT` as (major, minor, patch)."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", number)
    if match is None:
        raise StoreError(f"cannot read the Elasticsearch version {number!r}")
    return int(match[1]), int(match[2]), int(match[3])


def required_version(index_options: str, major: int) -> Version:
    """The oldest server of major version `major` (or, before 8, at all) that accepts an index of `index_options` as
    the store creates it."""
    if index_options in FLOAT_TYPE_SINCE:
        return FLOAT_TYPE_SINCE[index_options]
    return RESCORE_VECTOR_SINCE.get(major, RESCORE_VECTOR_SINCE[8] if major < 8 else (major, 0, 0))


def check_server_version(info: dict[str, Any], index_options: str, *, url: str) -> None:
    """Raise `StoreError` when the server `GET /` describes cannot create the index `index_options` names.
    Serverless projects run the latest code whatever number they report."""
    version = info.get("version", {})
    if version.get("build_flavor") == "serverless":
        return
    number = str(version.get("number", "?"))
    found = parse_version(number)
    if found >= required_version(index_options, found[0]):
        return
    if index_options in FLOAT_TYPE_SINCE:
        what, needs = f"vectors of index_options {index_options!r}", ".".join(map(str, FLOAT_TYPE_SINCE[index_options]))
    else:
        what, needs = f"{index_options!r} vectors with rescore_vector", "8.19 or later (on 9.x, 9.1 or later)"
    raise StoreError(f"Elasticsearch at {url} is {number}; {INDEX_OPTIONS_SETTING}={index_options} creates {what}, "
                     f"which needs {needs}: upgrade the cluster, or set {INDEX_OPTIONS_SETTING}=hnsw")


async def check_server(client: AsyncElasticsearch, ref: IndexRef, index_options: str) -> None:
    """`check_server_version` on the server's own `GET /`."""
    with translated(ref, "reading the server's version"):
        response = await client.info()
    check_server_version(response.body, index_options, url=ref.url)
