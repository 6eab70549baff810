"""An HTTP double of the Elasticsearch 8 REST endpoints that `ElasticsearchStore` calls.

It listens on a real localhost port, so the real `AsyncElasticsearch` client (aiohttp transport,
product check, compatibility headers, bulk helper) talks HTTP to it. Requests are validated the
way Elasticsearch validates them and answered with Elasticsearch's bodies and status codes:

    HEAD/PUT/DELETE /{index}          exists, create (settings + mappings), delete
    GET/PUT /{index}/_mapping         read the mapping, update `_meta` / add fields
    POST /{index}/_refresh            make writes visible to _search and _count
    POST /_bulk, /{index}/_bulk       index and delete actions, per-item results
    GET/POST /{index}/_count
    GET/DELETE /{index}/_doc/{id}     realtime, like Elasticsearch
    GET/POST /{index}/_mget
    GET/POST /{index}/_search         match_all, script_score (cosineSimilarity), top-level knn

Where it is stricter than Elasticsearch 8.19, on purpose, the store must say what it means:
`dense_vector` needs `dims` (8.x would infer it from the first document), `knn` needs `k` and
`num_candidates` (8.13+ would default them), and writes to a missing index fail as they do with
`action.auto_create_index: false`. kNN here is exact, not HNSW.

    with EsDouble() as es:
        client = AsyncElasticsearch(es.url)
        es.reject_bulk_requests = 1   # the next _bulk answers 429 as a whole
        es.reject_bulk_items = 2      # the next two bulk items answer 429 each
        es.stall_s = 5.0              # answer every request 5 s late (client timeouts)
        es.go_down()                  # close the port: connection refused from now on
        es.secure(users={"cbir": "pw"}, api_keys={"key-id": "key"})  # 401 unless one of these
        es.secure(users={"cbir": "pw"}, role="viewer")  # signed in, but 403 for every write

Secured, it answers as x-pack security does: 401 `security_exception` with the realms'
`WWW-Authenticate` challenge (in the body's `header` and as HTTP headers) for missing or wrong
credentials, 403 `security_exception` naming the action and the privileges that grant it for an
action the role lacks. Like Elasticsearch, it names the user or API key id, never the secret.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from aiohttp import web

PRODUCT_HEADER = ("X-Elastic-Product", "Elasticsearch")
JSON_TYPE = "application/vnd.elasticsearch+json;compatible-with=8"
MAX_DIMS = 4096
MAX_RESULT_WINDOW = 10_000
MAX_NUM_CANDIDATES = 10_000

KNOWN_SETTINGS = {"number_of_shards", "number_of_replicas", "refresh_interval", "max_result_window"}
FIELD_PARAMS = {
    "keyword": {"type", "index", "doc_values", "store", "ignore_above", "null_value", "norms"},
    "dense_vector": {"type", "dims", "similarity", "index", "index_options", "element_type"},
}
SIMILARITIES = {"cosine", "dot_product", "l2_norm", "max_inner_product"}
INDEX_OPTION_TYPES = {"hnsw", "int8_hnsw", "int4_hnsw", "bbq_hnsw", "flat", "int8_flat", "int4_flat", "bbq_flat"}
INDEX_OPTION_PARAMS = {"type", "m", "ef_construction", "confidence_interval", "rescore_vector"}
MAPPING_ROOT_PARAMS = {"properties", "dynamic", "_meta", "_source"}
SEARCH_KEYS = {"query", "knn", "size", "from", "_source", "track_total_hits", "timeout"}
KNN_KEYS = {"field", "query_vector", "k", "num_candidates", "boost", "filter", "similarity"}
# The challenge of the default realms (native/file, token service, API keys) of an 8.x cluster.
WWW_AUTHENTICATE = ['Basic realm="security", charset="UTF-8"', 'Bearer realm="security"', "ApiKey"]
# The index privileges Elasticsearch names in a 403 for each action the double serves.
ACTION_PRIVILEGES = {
    "indices:admin/get": "view_index_metadata,manage,all",
    "indices:admin/mappings/get": "view_index_metadata,manage,all",
    "indices:admin/create": "create_index,manage,all",
    "indices:admin/delete": "delete_index,manage,all",
    "indices:admin/mapping/put": "manage,all",
    "indices:admin/refresh": "maintenance,manage,all",
    "indices:data/write/bulk": "create_doc,create,delete,index,write,all",
    "indices:data/write/delete": "delete,write,all",
    "indices:data/read/get": "read,all",
    "indices:data/read/mget": "read,all",
    "indices:data/read/search": "read,all",
}
Role = Literal["superuser", "viewer", "monitoring_user"]
# What each built-in role may do on the store's index: everything, read it, nothing.
ROLE_ACTIONS: dict[str, frozenset[str]] = {
    "superuser": frozenset(ACTION_PRIVILEGES),
    "viewer": frozenset({"indices:admin/get", "indices:admin/mappings/get", "indices:data/read/get",
                         "indices:data/read/mget", "indices:data/read/search"}),  # fmt: skip
    "monitoring_user": frozenset(),
}
API_KEY_OWNER = "cbir-admin"
# The only Painless the double runs: `cosineSimilarity(params.X, 'field') [+ offset]`.
COSINE_SCRIPT = re.compile(
    r"^\s*cosineSimilarity\(\s*params\.(\w+)\s*,\s*'([\w.]+)'\s*\)\s*(?:\+\s*([0-9.]+)\s*)?$"
)


class EsError(Exception):
    """An error Elasticsearch would answer, with its status and error body."""

    def __init__(self, status: int, type: str, reason: str, **extra: Any) -> None:
        super().__init__(f"{status} {type}: {reason}")
        self.status = status
        self.error = {"type": type, "reason": reason, **extra}

    def body(self) -> dict[str, Any]:
        cause = {k: v for k, v in self.error.items() if k != "caused_by"}
        return {"error": {"root_cause": [cause], **self.error}, "status": self.status}


def index_not_found(name: str) -> EsError:
    return EsError(
        404, "index_not_found_exception", f"no such index [{name}]",
        **{"resource.type": "index_or_alias", "resource.id": name}, index_uuid="_na_", index=name,
    )  # fmt: skip


def authentication_error(reason: str, **extra: Any) -> EsError:
    """401 as x-pack security answers it; the `header` entry is also sent as HTTP headers."""
    return EsError(401, "security_exception", reason, **extra, header={"WWW-Authenticate": WWW_AUTHENTICATE})


def parsing_error(reason: str) -> EsError:
    return EsError(400, "parsing_exception", reason)


def illegal_argument(reason: str) -> EsError:
    return EsError(400, "illegal_argument_exception", reason)


def mapping_error(reason: str) -> EsError:
    return EsError(
        400, "mapper_parsing_exception", f"Failed to parse mapping: {reason}",
        caused_by={"type": "mapper_parsing_exception", "reason": reason},
    )  # fmt: skip


@dataclass
class Index:
    """One index: its settings and mapping, the live documents and the refreshed (searchable) view."""

    name: str
    settings: dict[str, str]
    mappings: dict[str, Any]
    uuid: str = field(default_factory=lambda: uuid.uuid4().hex[:22])
    docs: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> _source, realtime
    versions: dict[str, int] = field(default_factory=dict)
    searchable: dict[str, dict[str, Any]] = field(default_factory=dict)  # as of the last refresh
    seq_no: int = 0

    @property
    def shards(self) -> int:
        return int(self.settings["index.number_of_shards"])

    @property
    def replicas(self) -> int:
        return int(self.settings["index.number_of_replicas"])

    def shards_header(self) -> dict[str, int]:
        return {"total": self.shards, "successful": self.shards, "skipped": 0, "failed": 0}

    def properties(self) -> dict[str, Any]:
        return self.mappings.get("properties", {})


@dataclass
class Security:
    """Who may sign in to a secured double, and what the role they get may do."""

    users: dict[str, str]  # username -> password
    api_keys: dict[str, str]  # API key id -> its secret (sent as base64 of "id:secret")
    role: Role

    def authenticate(self, authorization: str | None, uri: str) -> str:
        """The principal as Elasticsearch names it in a 403, or the 401 it answers."""
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() == "basic":
            user, _, password = _decode_pair(credentials)
            if self.users.get(user) != password:
                raise authentication_error(f"unable to authenticate user [{user}] for REST request [{uri}]")
            return f"user [{user}] with effective roles [{self.role}]"
        if scheme.lower() == "apikey":
            key_id, _, secret = _decode_pair(credentials)
            if self.api_keys.get(key_id) != secret:
                problem = (f"invalid credentials for API key [{key_id}]" if key_id in self.api_keys
                           else f"unable to find apikey with id {key_id}")  # fmt: skip
                raise authentication_error(
                    "unable to authenticate with provided credentials and anonymous access is not allowed for "
                    "this request", additional_unsuccessful_credentials=f"API key: {problem}",
                )  # fmt: skip
            return f"API key id [{key_id}] of user [{API_KEY_OWNER}]"
        raise authentication_error(f"missing authentication credentials for REST request [{uri}]")

    def authorize(self, principal: str, action: str, index: str | None) -> None:
        if action in ROLE_ACTIONS[self.role]:
            return
        on_indices = f" on indices [{index}]" if index else ""
        raise EsError(
            403, "security_exception",
            f"action [{action}] is unauthorized for {principal}{on_indices}, this action is granted by the "
            f"index privileges [{ACTION_PRIVILEGES[action]}]",
        )  # fmt: skip


def _decode_pair(credentials: str) -> tuple[str, str, str]:
    """`user:password` or `id:secret` from base64, partitioned; empty when it does not decode."""
    try:
        return base64.b64decode(credentials, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", "", ""


class EsDouble:
    """The double, run on its own event loop in a thread; see the module docstring."""

    def __init__(self) -> None:
        self.indices: dict[str, Index] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.reject_bulk_requests = 0
        self.reject_bulk_items = 0
        self.stall_s = 0.0
        self.security: Security | None = None  # None: security off, every request is let in
        self.port = 0
        self._actions: dict[tuple[str, str], str] = {}  # (method, route) -> the action ES authorizes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> EsDouble:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="es-double", daemon=True)
        self._thread.start()
        self._call(self._serve())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.go_down()
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def go_down(self) -> None:
        """Close the port and every open connection: the server is down from now on."""
        if self._runner is not None:
            self._call(self._runner.cleanup())
            self._runner = None

    def secure(
        self, *, users: dict[str, str] | None = None, api_keys: dict[str, str] | None = None,
        role: Role = "superuser",
    ) -> None:
        """Require credentials from now on: 401 unless one of `users` or `api_keys` signs in, 403
        for an action `role` lacks."""  # fmt: skip
        self.security = Security(users=dict(users or {}), api_keys=dict(api_keys or {}), role=role)

    def calls(self, path: str, *, method: str | None = None) -> int:
        """How many requests `path` received (with `method`, when given)."""
        return sum(p == path and method in (None, m) for m, p in self.requests)

    def _call(self, coroutine: Awaitable[Any]) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)  # type: ignore[arg-type]

    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._es_edge], client_max_size=200 * 1024**2)
        routes = [
            ("POST", "/_bulk", self._bulk, "indices:data/write/bulk"),
            ("PUT", "/_bulk", self._bulk, "indices:data/write/bulk"),
            ("HEAD", "/{index}", self._index_exists, "indices:admin/get"),
            ("PUT", "/{index}", self._create_index, "indices:admin/create"),
            ("DELETE", "/{index}", self._delete_index, "indices:admin/delete"),
            ("GET", "/{index}/_mapping", self._get_mapping, "indices:admin/mappings/get"),
            ("PUT", "/{index}/_mapping", self._put_mapping, "indices:admin/mapping/put"),
            ("POST", "/{index}/_refresh", self._refresh, "indices:admin/refresh"),
            ("GET", "/{index}/_refresh", self._refresh, "indices:admin/refresh"),
            ("POST", "/{index}/_bulk", self._bulk, "indices:data/write/bulk"),
            ("PUT", "/{index}/_bulk", self._bulk, "indices:data/write/bulk"),
            ("GET", "/{index}/_count", self._count, "indices:data/read/search"),
            ("POST", "/{index}/_count", self._count, "indices:data/read/search"),
            ("GET", "/{index}/_doc/{id}", self._get_doc, "indices:data/read/get"),
            ("DELETE", "/{index}/_doc/{id}", self._delete_doc, "indices:data/write/delete"),
            ("GET", "/{index}/_mget", self._mget, "indices:data/read/mget"),
            ("POST", "/{index}/_mget", self._mget, "indices:data/read/mget"),
            ("GET", "/{index}/_search", self._search, "indices:data/read/search"),
            ("POST", "/{index}/_search", self._search, "indices:data/read/search"),
        ]
        for method, path, handler, action in routes:
            app.router.add_route(method, path, handler)
            self._actions[(method, path)] = action
        app.router.add_route("*", "/{tail:.*}", self._no_handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    # -- HTTP edge ------------------------------------------------------------------------------

    @web.middleware
    async def _es_edge(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Headers and errors as Elasticsearch answers them, for every endpoint."""
        self.requests.append((request.method, request.path))
        if self.stall_s:
            await asyncio.sleep(self.stall_s)
        try:
            self._check_security(request)
            _check_media_types(request)
            response = await handler(request)
        except EsError as exc:
            response = _json(exc.body(), status=exc.status)
            for name, values in exc.error.get("header", {}).items():
                for value in values:
                    response.headers.add(name, value)
        response.headers[PRODUCT_HEADER[0]] = PRODUCT_HEADER[1]
        return response

    def _check_security(self, request: web.Request) -> None:
        """Authenticate, then authorize the route's action, as a secured cluster does first."""
        if self.security is None:
            return
        principal = self.security.authenticate(request.headers.get("Authorization"), request.path_qs)
        resource = request.match_info.route.resource
        action = self._actions.get((request.method, resource.canonical)) if resource is not None else None
        if action is not None:
            self.security.authorize(principal, action, request.match_info.get("index"))

    async def _no_handler(self, request: web.Request) -> web.StreamResponse:
        reason = f"no handler found for uri [{request.path}] and method [{request.method}]"
        return _json({"error": reason, "status": 405}, status=405)

    def _index(self, request: web.Request) -> Index:
        name = request.match_info["index"]
        if name not in self.indices:
            raise index_not_found(name)
        return self.indices[name]

    # -- indices --------------------------------------------------------------------------------

    async def _index_exists(self, request: web.Request) -> web.StreamResponse:
        exists = request.match_info["index"] in self.indices
        return web.Response(status=200 if exists else 404, headers={"Content-Type": JSON_TYPE})

    async def _create_index(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["index"]
        _check_index_name(name)
        body = await _json_body(request, optional=True)
        unknown = set(body) - {"settings", "mappings", "aliases"}
        if unknown:
            raise parsing_error(f"unknown key [{sorted(unknown)[0]}] for create index")
        if name in self.indices:
            existing = self.indices[name]
            raise EsError(
                400, "resource_already_exists_exception", f"index [{name}/{existing.uuid}] already exists",
                index_uuid=existing.uuid, index=name,
            )  # fmt: skip
        settings = _index_settings(body.get("settings", {}))
        mappings = body.get("mappings", {})
        _check_mappings(mappings)
        self.indices[name] = Index(name=name, settings=settings, mappings=mappings)
        return _json({"acknowledged": True, "shards_acknowledged": True, "index": name})

    async def _delete_index(self, request: web.Request) -> web.StreamResponse:
        index = self._index(request)
        del self.indices[index.name]
        return _json({"acknowledged": True})

    async def _get_mapping(self, request: web.Request) -> web.StreamResponse:
        index = self._index(request)
        return _json({index.name: {"mappings": index.mappings}})

    async def _put_mapping(self, request: web.Request) -> web.StreamResponse:
        index = self._index(request)
        body = await _json_body(request)
        _check_mappings(body)
        properties = index.mappings.setdefault("properties", {})
        for name, spec in body.get("properties", {}).items():
            current = properties.get(name)
            if current is not None and current != spec:
                changed = sorted(k for k in set(current) | set(spec) if current.get(k) != spec.get(k))[0]
                raise illegal_argument(
                    f"Mapper for [{name}] conflicts with existing mapper:\n\tCannot update parameter "
                    f"[{changed}] from [{current.get(changed)}] to [{spec.get(changed)}]"
                )
            properties[name] = spec
        for key in ("_meta", "dynamic"):
            if key in body:
                index.mappings[key] = body[key]  # _meta is replaced whole, as ES does
        return _json({"acknowledged": True})

    async def _refresh(self, request: web.Request) -> web.StreamResponse:
        index = self._index(request)
        index.searchable = dict(index.docs)
        total = index.shards * (1 + index.replicas)
        return _json({"_shards": {"total": total, "successful": index.shards, "failed": 0}})

    # -- documents ------------------------------------------------------------------------------

    async def _bulk(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        if not request.content_type.endswith("x-ndjson"):
            raise illegal_argument("The bulk request must be terminated by a newline [\\n]")
        lines = (await request.text()).splitlines()
        if self.reject_bulk_requests > 0:
            self.reject_bulk_requests -= 1
            raise EsError(
                429, "es_rejected_execution_exception",
                "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, "
                "replica_bytes=0, all_bytes=0, coordinating_operation_bytes=1, "
                "max_coordinating_and_primary_bytes=0]",
            )  # fmt: skip
        default_index = request.match_info.get("index")
        items = []
        position = 0
        while position < len(lines):
            line_no = position + 1
            action = _bulk_action(lines[position], line_no)
            op, meta = next(iter(action.items()))
            position += 1
            name = meta.get("_index", default_index)
            if name is None:
                raise EsError(400, "action_request_validation_exception", "Validation Failed: 1: index is missing;")
            if op == "index":
                if position >= len(lines):
                    raise illegal_argument("The bulk request must be terminated by a newline [\\n]")
                source = json.loads(lines[position])
                position += 1
                items.append({"index": self._bulk_index(name, meta.get("_id"), source)})
            else:
                items.append({"delete": self._bulk_delete(name, meta.get("_id"))})
        took = int((time.perf_counter() - started) * 1000)
        errors = any(next(iter(item.values()))["status"] >= 300 for item in items)
        return _json({"errors": errors, "took": took, "items": items})

    def _bulk_index(self, name: str, doc_id: str | None, source: dict[str, Any]) -> dict[str, Any]:
        if doc_id is None:
            doc_id = uuid.uuid4().hex[:20]
        head = {"_index": name, "_id": doc_id}
        if self.reject_bulk_items > 0:
            self.reject_bulk_items -= 1
            return {**head, "status": 429, "error": {
                "type": "es_rejected_execution_exception",
                "reason": "rejected execution of primary operation on EsThreadPoolExecutor"
                "[name = double/write, queue capacity = 10000, active threads = 2, queued tasks = 10000]",
            }}  # fmt: skip
        index = self.indices.get(name)
        if index is None:
            return {**head, "status": 404, "error": index_not_found(name).error}
        try:
            _check_document(index, doc_id, source)
        except EsError as exc:
            return {**head, "status": exc.status, "error": exc.error}
        created = doc_id not in index.docs
        return {**head, **self._write(index, doc_id, source), "result": "created" if created else "updated",
                "status": 201 if created else 200}  # fmt: skip

    def _bulk_delete(self, name: str, doc_id: str | None) -> dict[str, Any]:
        index = self.indices.get(name)
        if index is None:
            return {"_index": name, "_id": doc_id, "status": 404, "error": index_not_found(name).error}
        found = doc_id in index.docs
        written = self._write(index, doc_id, None)
        return {"_index": name, "_id": doc_id, **written, "result": "deleted" if found else "not_found",
                "status": 200 if found else 404}  # fmt: skip

    def _write(self, index: Index, doc_id: str | None, source: dict[str, Any] | None) -> dict[str, Any]:
        """Store (or, with no source, delete) a document; the bulk item's bookkeeping fields."""
        assert doc_id is not None
        version = index.versions.get(doc_id, 0) + 1
        index.versions[doc_id] = version
        if source is None:
            index.docs.pop(doc_id, None)
        else:
            index.docs[doc_id] = source
        index.seq_no += 1
        shards = {"total": 1 + index.replicas, "successful": 1, "failed": 0}
        return {"_version": version, "_shards": shards, "_seq_no": index.seq_no - 1, "_primary_term": 1}

    async def _count(self, request: web.Request) -> web.StreamResponse:
        index = self._index(request)
        body = await _json_body(request, optional=True)
        if set(body) - {"query"} or body.get("query", {"match_all": {}}) != {"match_all": {}}:
            raise parsing_error("the double counts with match_all only")
        return _json({"count": len(index.searchable), "_shards": index.shards_header()})

    async def _get_doc(self, request: web.Request) -> web.StreamResponse:
        index = self._index(request)
        doc_id = request.match_info["id"]
        if doc_id not in index.docs:
            return _json({"_index": index.name, "_id": doc_id, "found": False}, status=404)
        return _json({**self._doc_head(index, doc_id), "found": True,
                      **_source_part(index.docs[doc_id], request.query)})  # fmt: skip

    async def _delete_doc(self, request: web.Request) -> web.StreamResponse:
        index = self._index(request)
        doc_id = request.match_info["id"]
        found = doc_id in index.docs
        written = self._write(index, doc_id, None)
        body = {"_index": index.name, "_id": doc_id, **written, "result": "deleted" if found else "not_found"}
        return _json(body, status=200 if found else 404)

    async def _mget(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["index"]
        body = await _json_body(request)
        if set(body) - {"ids", "docs"}:
            raise parsing_error(f"unknown key [{sorted(set(body) - {'ids', 'docs'})[0]}] for a mget request")
        ids = body.get("ids") or [doc.get("_id") for doc in body.get("docs", [])]
        if not ids:
            raise EsError(400, "action_request_validation_exception", "Validation Failed: 1: no documents to get;")
        index = self.indices.get(name)
        docs = []
        for doc_id in ids:
            if index is None:
                docs.append({"_index": name, "_id": doc_id, "error": index_not_found(name).error})
            elif doc_id in index.docs:
                docs.append({**self._doc_head(index, doc_id), "found": True,
                             **_source_part(index.docs[doc_id], request.query)})  # fmt: skip
            else:
                docs.append({"_index": name, "_id": doc_id, "found": False})
        return _json({"docs": docs})

    def _doc_head(self, index: Index, doc_id: str) -> dict[str, Any]:
        return {"_index": index.name, "_id": doc_id, "_version": index.versions[doc_id],
                "_seq_no": 0, "_primary_term": 1}  # fmt: skip

    # -- search ---------------------------------------------------------------------------------

    async def _search(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        index = self._index(request)
        body = await _json_body(request, optional=True)
        for key in set(body) - SEARCH_KEYS:
            token = "START_OBJECT" if isinstance(body[key], dict) else "VALUE"
            raise parsing_error(f"Unknown key for a {token} in [{key}].")
        size = _int_param(body.get("size", request.query.get("size", 10)), "size")
        start = _int_param(body.get("from", 0), "from")
        if start + size > MAX_RESULT_WINDOW:
            raise illegal_argument(
                f"Result window is too large, from + size must be less than or equal to: "
                f"[{MAX_RESULT_WINDOW}] but was [{start + size}]."
            )
        if "knn" in body and "query" in body:
            raise illegal_argument("the double does not combine [knn] with [query]")
        if "knn" in body:
            scored = _knn_scores(index, body["knn"])
        else:
            scored = _query_scores(index, body.get("query", {"match_all": {}}))
        ranked = sorted(scored.items(), key=lambda item: -item[1])
        page = ranked[start : start + size]
        hits = [
            {"_index": index.name, "_id": doc_id, "_score": score,
             **_source_part(index.searchable[doc_id], {}, body.get("_source", True))}
            for doc_id, score in page
        ]  # fmt: skip
        return _json({
            "took": int((time.perf_counter() - started) * 1000),
            "timed_out": False,
            "_shards": index.shards_header(),
            "hits": {
                "total": {"value": len(ranked), "relation": "eq"},
                "max_score": ranked[0][1] if ranked else None,
                "hits": hits,
            },
        })


# -- request checks -----------------------------------------------------------------------------


def _check_media_types(request: web.Request) -> None:
    """The 8.x client sends `compatible-with=8`; another version is refused as ES refuses it."""
    for header in ("Accept", "Content-Type"):
        value = request.headers.get(header, "")
        match = re.search(r"compatible-with=(\d+)", value)
        if match and match.group(1) not in ("7", "8"):
            raise EsError(
                400, "media_type_header_exception",
                f"Invalid media-type value on headers [{header}]",
                caused_by={"type": "status_exception", "reason": f"A compatible version is required on both "
                           f"Content-Type and Accept headers if either one has requested a compatible version "
                           f"and the compatible versions must match. {header}={value}"},
            )  # fmt: skip
    if request.can_read_body:
        kind = request.content_type
        if not (kind.endswith("json") or kind.endswith("x-ndjson")):
            raise EsError(406, "media_type_header_exception", f"Content-Type header [{kind}] is not supported")


def _check_index_name(name: str) -> None:
    if name != name.lower():
        raise EsError(400, "invalid_index_name_exception", f"Invalid index name [{name}], must be lowercase",
                      index_uuid="_na_", index=name)  # fmt: skip
    if name.startswith(("_", "-", "+")) or any(c in name for c in ' "*\\<|,>/?#:'):
        raise EsError(400, "invalid_index_name_exception", f"Invalid index name [{name}]",
                      index_uuid="_na_", index=name)  # fmt: skip


def _index_settings(raw: dict[str, Any]) -> dict[str, str]:
    """Flatten `{"index": {...}}`, `index.x` and `x` into `index.x`, checking names and values."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "index" and isinstance(value, dict):
            flat.update({f"index.{k}": v for k, v in value.items()})
        else:
            flat[key if key.startswith("index.") else f"index.{key}"] = value
    for key in flat:
        if key.removeprefix("index.") not in KNOWN_SETTINGS:
            raise illegal_argument(
                f"unknown setting [{key}] please check that any required plugins are installed, "
                "or check the breaking changes documentation for removed settings"
            )
    settings = {"index.number_of_shards": "1", "index.number_of_replicas": "1"}
    settings.update({k: str(v) for k, v in flat.items()})
    for key, low, high in (("index.number_of_shards", 1, 1024), ("index.number_of_replicas", 0, None)):
        value = int(settings[key])
        if value < low or (high is not None and value > high):
            bound = f"must be >= {low}" if value < low else f"must be <= {high}"
            raise illegal_argument(f"Failed to parse value [{value}] for setting [{key}] {bound}")
    return settings


def _check_mappings(mappings: dict[str, Any]) -> None:
    unknown = set(mappings) - MAPPING_ROOT_PARAMS
    if unknown:
        detail = ", ".join(f"{k} : {mappings[k]}" for k in sorted(unknown))
        raise mapping_error(f"Root mapping definition has unsupported parameters:  [{detail}]")
    if mappings.get("dynamic", True) not in (True, False, "true", "false", "strict", "runtime"):
        raise mapping_error(f"Could not convert [dynamic] to boolean: [{mappings['dynamic']}]")
    for name, spec in mappings.get("properties", {}).items():
        _check_field(name, spec)


def _check_field(name: str, spec: dict[str, Any]) -> None:
    kind = spec.get("type")
    if kind is None:
        raise mapping_error(f"No type specified for field [{name}]")
    if kind not in FIELD_PARAMS:
        raise mapping_error(f"No handler for type [{kind}] declared on field [{name}]")
    for param in spec:
        if param not in FIELD_PARAMS[kind]:
            raise mapping_error(f"unknown parameter [{param}] on mapper [{name}] of type [{kind}]")
    if kind != "dense_vector":
        return
    dims = spec.get("dims")
    if dims is None:
        raise mapping_error(f"Missing required parameter [dims] for field [{name}]")
    if not isinstance(dims, int) or not 1 <= dims <= MAX_DIMS:
        raise mapping_error(
            f"The number of dimensions for field [{name}] should be in the range [1, {MAX_DIMS}] but was [{dims}]"
        )
    similarity = spec.get("similarity", "cosine")
    if similarity not in SIMILARITIES:
        raise mapping_error(f"Unknown value [{similarity}] for field [similarity] - accepted values are "
                            f"{sorted(SIMILARITIES)}")  # fmt: skip
    options = spec.get("index_options")
    if options is not None:
        if options.get("type") not in INDEX_OPTION_TYPES:
            raise mapping_error(f"Unknown vector index options type [{options.get('type')}] for field [{name}]")
        for param in set(options) - INDEX_OPTION_PARAMS:
            raise mapping_error(f"Mapping definition for [{name}] has unsupported parameters:  [{param}]")


def _bulk_action(line: str, line_no: int) -> dict[str, Any]:
    try:
        action = json.loads(line)
    except json.JSONDecodeError as exc:
        raise parsing_error(f"Malformed action/metadata line [{line_no}]: {exc}") from exc
    if not isinstance(action, dict) or len(action) != 1:
        raise illegal_argument(f"Malformed action/metadata line [{line_no}], expected a simple value for field")
    op = next(iter(action))
    if op not in ("create", "delete", "index", "update"):
        raise illegal_argument(
            f"Malformed action/metadata line [{line_no}], expected one of [create, delete, index, update] "
            f"but found [{op}]"
        )
    if op in ("create", "update"):
        raise illegal_argument(f"the double does not implement bulk [{op}]")
    return action


def _check_document(index: Index, doc_id: str, source: dict[str, Any]) -> None:
    """Parse a document against the mapping as ES does; document_parsing_exception when it fails."""
    properties = index.properties()
    for name, value in source.items():
        spec = properties.get(name)
        if spec is None:
            if index.mappings.get("dynamic") == "strict":
                raise EsError(400, "strict_dynamic_mapping_exception",
                              f"[1:2] mapping set to strict, dynamic introduction of [{name}] within [_doc] "
                              "is not allowed")  # fmt: skip
            continue
        if spec["type"] == "keyword" and not isinstance(value, str | int | float | bool | None):
            raise _parse_failure(name, spec, f"failed to parse field [{name}] of type [keyword]", "illegal_state")
        if spec["type"] == "dense_vector":
            _check_vector(name, spec, doc_id, value)


def _check_vector(name: str, spec: dict[str, Any], doc_id: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, int | float) for v in value):
        raise _parse_failure(name, spec, f"Failed to parse object: expecting token of type [START_ARRAY] for "
                             f"field [{name}]", "parsing")  # fmt: skip
    if len(value) != spec["dims"]:
        raise _parse_failure(
            name, spec,
            f"The [dense_vector] field [{name}] in doc [document with id '{doc_id}'] has a different number of "
            f"dimensions [{len(value)}] than defined in the mapping [{spec['dims']}]",
            "illegal_argument",
        )  # fmt: skip
    if spec.get("similarity", "cosine") == "cosine" and not any(value):
        raise _parse_failure(name, spec, "The [cosine] similarity does not support vectors with zero magnitude. "
                             f"Preview of invalid vector: {value[:5]}", "illegal_argument")  # fmt: skip


def _parse_failure(name: str, spec: dict[str, Any], reason: str, cause: str) -> EsError:
    return EsError(
        400, "document_parsing_exception", f"[1:2] failed to parse: {reason}",
        caused_by={"type": f"{cause}_exception", "reason": reason},
    )  # fmt: skip


# -- search helpers -----------------------------------------------------------------------------


def _query_scores(index: Index, query: dict[str, Any]) -> dict[str, float]:
    if not isinstance(query, dict) or len(query) != 1:
        raise parsing_error("[_na] query malformed, must start with start_object")
    kind, spec = next(iter(query.items()))
    if kind == "match_all":
        return {doc_id: 1.0 for doc_id in index.searchable}
    if kind == "script_score":
        return _script_scores(index, spec)
    raise parsing_error(f"unknown query [{kind}]")


def _script_scores(index: Index, spec: dict[str, Any]) -> dict[str, float]:
    for key in set(spec) - {"query", "script", "min_score", "boost"}:
        raise parsing_error(f"[script_score] query does not support [{key}]")
    if "query" not in spec:
        raise parsing_error("[script_score] requires 'query' field")
    if "script" not in spec:
        raise parsing_error("[script_score] requires 'script' field")
    matched = _query_scores(index, spec["query"])
    script = spec["script"]
    source = script.get("source") if isinstance(script, dict) else script
    match = COSINE_SCRIPT.match(source or "")
    if match is None:
        raise _script_error("compile error", source, "illegal_argument_exception",
                            "the double runs only cosineSimilarity(params.x, 'field') [+ c]")  # fmt: skip
    param, field_name, offset = match.group(1), match.group(2), float(match.group(3) or 0.0)
    params = script.get("params", {}) if isinstance(script, dict) else {}
    if param not in params:
        raise _script_error("runtime error", source, "null_pointer_exception",
                            f'Cannot invoke "Object.getClass()" because "params.{param}" is null')  # fmt: skip
    vectors = _field_vectors(index, field_name, params[param], list(matched))
    scores = {doc_id: _as_float32(_cosine(params[param], vector) + offset) for doc_id, vector in vectors.items()}
    for score in scores.values():
        if score < 0:
            raise illegal_argument(f"script score function must not produce negative scores, but got: [{score}]")
    return scores


def _script_error(reason: str, source: str | None, cause: str, cause_reason: str) -> EsError:
    return EsError(400, "script_exception", reason, script=source, lang="painless",
                   caused_by={"type": cause, "reason": cause_reason})  # fmt: skip


def _knn_scores(index: Index, knn: dict[str, Any]) -> dict[str, float]:
    if not isinstance(knn, dict):
        raise parsing_error("[knn] must be an object (the double takes one knn clause)")
    for key in set(knn) - KNN_KEYS:
        raise parsing_error(f"[knn] unknown field [{key}]")
    for required in ("field", "query_vector", "k", "num_candidates"):
        if required not in knn:
            raise illegal_argument(f"[knn] requires [{required}] (the double does not default it)")
    k, candidates = _int_param(knn["k"], "k"), _int_param(knn["num_candidates"], "num_candidates")
    if k < 1:
        raise illegal_argument("[k] must be greater than 0")
    if candidates > MAX_NUM_CANDIDATES:
        raise illegal_argument(f"[num_candidates] cannot exceed [{MAX_NUM_CANDIDATES}]")
    if candidates < k:
        raise illegal_argument("[num_candidates] cannot be less than [k]")
    spec = index.properties().get(knn["field"])
    if spec is not None and spec.get("type") == "dense_vector" and not spec.get("index", True):
        raise illegal_argument(
            f"to perform knn search on field [{knn['field']}], its mapping must have [index] set to [true]"
        )
    vectors = _field_vectors(index, knn["field"], knn["query_vector"], list(index.searchable))
    # Lucene's cosine similarity score: (1 + cos) / 2, always in [0, 1].
    scores = {doc_id: _as_float32((1.0 + _cosine(knn["query_vector"], v)) / 2.0) for doc_id, v in vectors.items()}
    return dict(sorted(scores.items(), key=lambda item: -item[1])[:k])


def _field_vectors(index: Index, field_name: str, query: Any, doc_ids: list[str]) -> dict[str, np.ndarray]:
    spec = index.properties().get(field_name)
    if spec is None or spec.get("type") != "dense_vector":
        raise illegal_argument(f"field [{field_name}] does not exist in the mapping or is not a [dense_vector]")
    if not isinstance(query, list) or len(query) != spec["dims"]:
        got = len(query) if isinstance(query, list) else query
        raise illegal_argument(
            f"The query vector has a different number of dimensions [{got}] than the document vectors "
            f"[{spec['dims']}]."
        )
    return {doc_id: np.asarray(index.searchable[doc_id][field_name], dtype=np.float32) for doc_id in doc_ids}


def _cosine(query: list[float], vector: np.ndarray) -> float:
    q = np.asarray(query, dtype=np.float64)
    v = vector.astype(np.float64)
    return float(q @ v / (np.linalg.norm(q) * np.linalg.norm(v)))


def _as_float32(value: float) -> float:
    """Elasticsearch scores are Java floats."""
    return float(np.float32(value))


def _int_param(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise illegal_argument(f"[{name}] must be an integer, got [{value}]") from exc


def _source_part(source: dict[str, Any], query: Any, requested: Any = None) -> dict[str, Any]:
    """`{"_source": ...}` filtered by `_source` / `_source_includes` (query) or `_source` (body)."""
    if requested is None:
        flag = query.get("_source")
        includes = query.get("_source_includes")
        if flag is not None and flag.lower() in ("false", "true"):
            requested = flag.lower() == "true"
        elif flag is not None:
            requested = flag.split(",")
        elif includes is not None:
            requested = includes.split(",")
        else:
            requested = True
    if requested is False:
        return {}
    if requested is True:
        return {"_source": source}
    if isinstance(requested, dict):
        fields = requested.get("includes", list(source))
    else:
        fields = [requested] if isinstance(requested, str) else requested
    return {"_source": {k: v for k, v in source.items() if k in fields}}


async def _json_body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    text = await request.text() if request.can_read_body else ""
    if not text:
        if optional:
            return {}
        raise parsing_error("request body is required")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EsError(400, "x_content_parse_exception", f"[1:1] Unexpected character: {exc}") from exc
    if not isinstance(body, dict):
        raise parsing_error("request body must be an object")
    return body


def _json(body: Any, *, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, headers={"Content-Type": JSON_TYPE})
