"""An HTTP double of the Elasticsearch 8 REST endpoints that `ElasticsearchStore` calls.

It listens on a real localhost port, so the real `AsyncElasticsearch` client (aiohttp transport,
product check, compatibility headers, bulk helper) talks HTTP to it. Requests are validated the
way Elasticsearch validates them and answered with Elasticsearch's bodies and status codes:

    GET /                             the server's name and version (`version`)
    GET /_xpack                       x-pack's features: whether security is enabled
    HEAD/PUT/DELETE /{index}          exists, create (settings + mappings + aliases), delete
    GET/PUT /{index}/_mapping         read the mapping, update `_meta` / add fields
    POST /{index}/_refresh            make writes visible to _search and _count
    POST /_bulk, /{index}/_bulk       index, create and delete actions, per-item results, `refresh`
    GET/POST /{index}/_count
    GET/DELETE /{index}/_doc/{id}     realtime, like Elasticsearch; DELETE takes `refresh`
    PUT/POST /{index}/_create/{id}    create-only (409 when the id exists), `refresh`
    GET/POST /{index}/_mget
    GET/POST /{index}/_search         match_all, bool (filter, must_not), term, terms, ids, script_score
                                      (cosineSimilarity), top-level knn (with filter), from/size,
                                      sort on keyword fields with search_after, terms and missing aggs
    GET/POST /_msearch, /{index}/_msearch   NDJSON header/body pairs, one status per item
    GET /_cluster/health[/{index}]    wait_for_status and timeout; 408 when the wait times out
    POST /_aliases                    add (is_write_index), remove (must_exist), remove_index: one new state
    GET /_alias/{name}, /{index}/_alias   the aliases (index patterns with `*`)
    GET/POST /_security/user/_has_privileges   what the signed-in account may do

Every endpoint that takes an index also takes an alias, as IndexNameExpressionResolver resolves it: a
search, count, mapping, refresh or health of an alias covers every index behind it (HEAD answers 200); a
read of one document needs an alias of one index ("alias [a] has more than one index associated with
it [..], can't execute a single index op"); a write goes to the alias's write index (`is_write_index`,
or its only index) and fails without one ("no write index is defined for alias [a]", per bulk item).
A query parameter the endpoint does not take is a 400 (BaseRestHandler: "request [..] contains
unrecognized parameter: [..]"), an unknown path a 400 and a known one with another method a 405
(RestController).

How a real cluster behaves, and the double too:

- **Shards.** A document lives on shard `floorMod(murmur3(_id), routing_num_shards) / routing_factor`
  (Murmur3HashFunction over the id's UTF-16 code units; MetadataCreateIndexService's default
  routing_num_shards, 960 for 30 shards). Each shard searches alone and the coordinating node merges.
- **Ties.** Equal scores are ordered by index name, then shard, then Lucene doc id within the shard
  (the order documents were last written), as SearchPhaseController's merge (Lucene `TopDocs.merge`,
  shards in ShardId order) does.
- **Refresh.** A write is searchable after the index's next refresh: an explicit `_refresh` or
  `refresh=true`, or the scheduled one every `index.refresh_interval` (1s unless the index says otherwise;
  `-1` turns it off; `default_refresh_interval` stands in for an index template that sets another).
  `refresh=wait_for` answers once the next refresh has made the write searchable (RefreshListeners).
- **Errors of every shard.** What each shard refuses (the result window, `search_after` without a sort,
  a zero vector's cosine) fails the search as `search_phase_execution_exception` "all shards failed",
  with the status of its cause (SearchPhaseExecutionException; DefaultSearchContext.preProcess).
- **Approximate kNN.** Each shard searches a graph of its own vectors (a navigable small-world graph
  of each vector's nearest neighbours, greedy beam search with `ef = num_candidates` from the
  shard's first document), keeps its best `k` candidates, and the coordinator keeps the best `k` of
  all shards; `from`/`size` then page through those. A shard holding no more documents than
  `num_candidates`, or whose `filter` passes no more, is searched exactly, as Lucene falls back to an
  exact search (AbstractKnnVectorQuery). It is an approximation of the same kind, not a prediction of
  Elasticsearch's recall.
- **Index options.** A `dense_vector`'s `index_options` are checked as Elasticsearch 8.19 checks them (the eight
  types, the parameters each takes, `rescore_vector`'s bounds, bbq's 64 dims and int4's even dims, float only for
  the quantised ones) and stored with the defaults it fills in (`m` 16, `ef_construction` 100, bbq's oversample 3),
  an indexed float vector without any getting `int8_hnsw`, as GET _mapping shows them. The `*_flat` types search
  every vector of a shard; the `*_hnsw` types walk the graph above. Quantisation is not modelled: scores are the
  float cosine, as a search that rescores its candidates (`rescore_vector`) returns them.
- **Partial results.** `break_shards(3, 7)` makes those shards fail every search: the response is
  still 200, with `_shards.failed` and `_shards.failures` (ShardSearchFailure: shard, index, node,
  reason) and the other shards' hits; when every shard fails it is `search_phase_execution_exception`
  "all shards failed". `time_out_searches = n` answers the next n searches `timed_out: true` with the
  hits of the first half of the shards only.
- **Bad query vectors.** A zero vector is refused as DenseVectorFieldMapper refuses it for `cosine`
  ("does not support vectors with zero magnitude") in kNN, and as ScriptScoreQuery refuses the NaN
  score it gives in `script_score`; NaN or Infinity is not JSON, and the parser refuses it (400).
- **A fresh index.** With `primaries_start_s = s`, a new index's primaries start s seconds after it
  is created (create answers `shards_acknowledged: false`, as when its wait for active shards times
  out); until then bulk items answer 503 `unavailable_shards_exception` and searches fail on every
  shard, and `_cluster/health?wait_for_status=yellow` waits for them.

Where it is stricter than Elasticsearch 8.19, on purpose, the store must say what it means:
`dense_vector` needs `dims` (8.x would infer it from the first document), writes to a missing index
fail as they do with `action.auto_create_index: false`, and a bulk item to an inactive primary fails
at once instead of after the bulk's one-minute wait.

    with EsDouble() as es:
        client = AsyncElasticsearch(es.url)
        es.reject_bulk_requests = 1   # the next _bulk answers 429 as a whole
        es.reject_bulk_items = 2      # the next two bulk items answer 429 each
        es.stall_s = 5.0              # answer every request 5 s late (client timeouts)
        es.break_shards(3)            # shard 3 fails every search from now on
        es.primaries_start_s = 0.5    # indices created from now on need 0.5 s to start
        es.go_down()                  # close the port: connection refused from now on
        es.secure(users={"cbir": "pw"}, api_keys={"key-id": "key"})  # 401 unless one of these
        es.secure(users={"cbir": "pw"}, role="viewer")  # signed in, but 403 for every write
        es.secure(users={"cbir": "pw"}, index=["read", "write"])  # a role of these privileges
        es.version = "8.15.1"         # what GET / says the server is
        es.default_refresh_interval = "-1"   # indices created from now on refresh only when told

Secured, it answers as x-pack security does: 401 `security_exception` with the realms'
`WWW-Authenticate` challenge (in the body's `header` and as HTTP headers) for missing or wrong
credentials, 403 `security_exception` naming the action and the privileges that grant it for an
action the role lacks. Like Elasticsearch, it names the user or API key id, never the secret.
`_has_privileges` answers what the account holds (a privilege also holds the ones it implies: `all`
everything, `manage` the index administration ones, `write` the document ones); with security off it
answers 500 "Security is not enabled but a security rest handler is registered" (SecurityBaseRestHandler).

Sources read (github.com/elastic/elasticsearch): MultiSearchResponse.toXContent (an item is a search
response or an error, each with `status`), rest-api-spec msearch/10_basic.yml, ShardSearchFailure,
ScriptScoreQuery ("script_score script returned an invalid score [..] for doc [..]. Must be a
non-negative score!"), DenseVectorFieldMapper.checkVectorMagnitude and its tests (zero vectors);
TransportIndicesAliasesAction, IndicesAliasesResponse, AliasAction.Remove (must_exist), rest-api-spec
indices.update_aliases/40_must_exist.yml and bulk/10_basic.yml, IndexAbstraction.Alias (one write index),
KnnSearchBuilder.Builder.build (kNN defaults), TransportClusterHealthAction, BaseRestHandler.unrecognized,
RestHasPrivilegesActionTests / SecurityBaseRestHandler. The tests of each behaviour are in
tests/common/stores/elasticsearch/test_double.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import heapq
import json
import math
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
    **dict.fromkeys(("float", "double", "long", "integer"),
                    {"type", "index", "doc_values", "store", "null_value", "coerce", "ignore_malformed"}),
    "dense_vector": {"type", "dims", "similarity", "index", "index_options", "element_type"},
}
SIMILARITIES = {"cosine", "dot_product", "l2_norm", "max_inner_product"}
# The dense_vector index_options Elasticsearch 8.19 accepts, and the parameters each type takes besides `type`
# (DenseVectorFieldMapper.VectorIndexType.parseIndexOptions; `early_exit` and `bbq_disk` are 9.x only). Read in
# github.com/elastic/elasticsearch: server/src/main/java/org/elasticsearch/index/mapper/vectors/
# DenseVectorFieldMapper.java (VectorIndexType, *IndexOptions.toXContent, RescoreVector.fromIndexOptions),
# DenseVectorFieldMapperTests.testInvalidParameters, MappingParser.checkNoRemainingFields, and IndexVersions
# (rescore_vector and the bbq default oversample are in 8.x from ADD_RESCORE_PARAMS_TO_QUANTIZED_VECTORS_BACKPORT_8_X
# and DEFAULT_OVERSAMPLE_VALUE_FOR_BBQ_BACKPORT_8_X, both before 8.19).
HNSW_PARAMS = ("m", "ef_construction")
INDEX_OPTION_PARAMS: dict[str, tuple[str, ...]] = {
    "hnsw": HNSW_PARAMS,
    "int8_hnsw": (*HNSW_PARAMS, "confidence_interval", "rescore_vector"),
    "int4_hnsw": (*HNSW_PARAMS, "confidence_interval", "rescore_vector"),
    "bbq_hnsw": (*HNSW_PARAMS, "rescore_vector"),
    "flat": (),
    "int8_flat": ("confidence_interval", "rescore_vector"),
    "int4_flat": ("confidence_interval", "rescore_vector"),
    "bbq_flat": ("rescore_vector",),
}
INDEX_OPTION_TYPES = set(INDEX_OPTION_PARAMS)
QUANTISED_TYPES = INDEX_OPTION_TYPES - {"hnsw", "flat"}  # float vectors only
EVEN_DIMS_TYPES = {"int4_hnsw", "int4_flat"}  # "... only supports even dimensions; provided=7"
BBQ_TYPES, BBQ_MIN_DIMS = {"bbq_hnsw", "bbq_flat"}, 64  # "... does not support dimensions fewer than 64; provided=16"
HNSW_DEFAULT_M, HNSW_DEFAULT_EF_CONSTRUCTION = 16, 100  # Lucene99HnswVectorsFormat DEFAULT_MAX_CONN, DEFAULT_BEAM_WIDTH
BBQ_DEFAULT_OVERSAMPLE = 3.0  # DenseVectorFieldMapper.DEFAULT_OVERSAMPLE: a bbq index created by 8.19 rescores
ALIAS_PARAMS = {"is_write_index", "is_hidden", "filter", "routing", "index_routing", "search_routing"}
ALIAS_ACTION_PARAMS = {  # IndicesAliasesRequest.AliasActions' parsers, by action
    "add": {"index", "indices", "alias", "aliases", "must_exist", *ALIAS_PARAMS},
    "remove": {"index", "indices", "alias", "aliases", "must_exist"},
    "remove_index": {"index", "indices", "must_exist"},
}
MAPPING_ROOT_PARAMS = {"properties", "dynamic", "_meta", "_source"}
SEARCH_KEYS = {"query", "knn", "size", "from", "_source", "track_total_hits", "timeout", "sort", "search_after",
               "aggs", "aggregations"}
MSEARCH_HEADER_KEYS = {"index", "search_type", "preference", "routing", "request_cache", "allow_partial_search_results",
                       "ignore_unavailable", "expand_wildcards", "allow_no_indices"}  # fmt: skip
BOOL_KEYS = {"filter", "must_not", "boost", "_name"}
GRAPH_NEIGHBOURS = 12  # links per vector in a shard's kNN graph (HNSW's m is 16; fewer make misses visible)
NODE_ID = "cbir-es-1-nodeid0000"
KNN_KEYS = {"field", "query_vector", "k", "num_candidates", "boost", "filter", "similarity"}
# The challenge of the default realms (native/file, token service, API keys) of an 8.x cluster.
WWW_AUTHENTICATE = ['Basic realm="security", charset="UTF-8"', 'Bearer realm="security"', "ApiKey"]
# The index privileges Elasticsearch names in a 403 for each action the double serves.
ACTION_PRIVILEGES = {
    "cluster:monitor/main": "monitor,manage,all",
    "cluster:monitor/xpack/info": "monitor,manage,all",
    "cluster:monitor/health": "monitor,manage,all",
    "indices:admin/get": "view_index_metadata,manage,all",
    "indices:admin/mappings/get": "view_index_metadata,manage,all",
    "indices:admin/create": "create_index,manage,all",
    "indices:admin/delete": "delete_index,manage,all",
    "indices:admin/mapping/put": "manage,all",
    "indices:admin/refresh": "maintenance,manage,all",
    "indices:data/write/bulk": "create_doc,create,delete,index,write,all",
    "indices:data/write/delete": "delete,write,all",
    "indices:data/write/index": "create_doc,create,index,write,all",
    "indices:data/read/get": "read,all",
    "indices:data/read/mget": "read,all",
    "indices:data/read/search": "read,all",
    "indices:data/read/msearch": "read,all",
    "indices:admin/aliases": "manage,all",
    "indices:admin/aliases/get": "view_index_metadata,manage,all",
}
CLUSTER_ACTIONS = frozenset({"cluster:monitor/main", "cluster:monitor/xpack/info", "cluster:monitor/health"})
# What holding a privilege grants besides itself (the built-in privileges' action patterns nest so: `all` covers
# everything, `manage` indices:admin/* and indices:monitor/*, `write` every document write).
INDEX_PRIVILEGE_IMPLIES = {
    "manage": {"create_index", "delete_index", "view_index_metadata", "maintenance", "monitor"},
    "write": {"index", "create", "create_doc", "delete"},
    "index": {"create", "create_doc"},
    "create": {"create_doc"},
}
CLUSTER_PRIVILEGE_IMPLIES = {"manage": {"monitor"}}
Role = Literal["superuser", "viewer", "monitoring_user"]
# The built-in roles the double offers, as the (cluster, index) privileges they hold on the store's indices.
ROLE_PRIVILEGES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "superuser": (frozenset({"all"}), frozenset({"all"})),
    "viewer": (frozenset({"monitor"}), frozenset({"read", "view_index_metadata"})),
    "monitoring_user": (frozenset({"monitor"}), frozenset()),
}
API_KEY_OWNER = "cbir-admin"
# The query parameters each endpoint takes, as rest-api-spec/src/main/resources/rest-api-spec/api/<api>.json of 8.19
# lists them, besides those every endpoint takes (RestRequest's pretty, human, error_trace, filter_path); any other
# is a 400 (BaseRestHandler.unrecognized).
COMMON_PARAMS = frozenset({"pretty", "human", "error_trace", "filter_path"})
_WILDCARDS = ("ignore_unavailable", "allow_no_indices", "expand_wildcards")
_SOURCE = ("_source", "_source_excludes", "_source_includes")
_QUERY_STRING = ("q", "analyzer", "analyze_wildcard", "default_operator", "df", "lenient")
API_PARAMS: dict[str, tuple[str, ...]] = {
    "info": (),
    "xpack.info": ("categories", "accept_enterprise"),
    "bulk": ("wait_for_active_shards", "refresh", "routing", "timeout", "pipeline", "require_alias",
             "require_data_stream", "list_executed_pipelines", "include_source_on_error", *_SOURCE),
    "indices.exists": ("local", "flat_settings", "include_defaults", *_WILDCARDS),
    "indices.create": ("wait_for_active_shards", "timeout", "master_timeout"),
    "indices.delete": ("timeout", "master_timeout", *_WILDCARDS),
    "indices.get_mapping": ("master_timeout", "local", *_WILDCARDS),
    "indices.put_mapping": ("timeout", "master_timeout", "write_index_only", *_WILDCARDS),
    "indices.refresh": _WILDCARDS,
    "count": ("min_score", "preference", "routing", "terminate_after", "ignore_throttled", *_QUERY_STRING,
              *_WILDCARDS),
    "get": ("stored_fields", "preference", "realtime", "refresh", "routing", "version", "version_type", *_SOURCE),
    "delete": ("wait_for_active_shards", "refresh", "routing", "timeout", "if_seq_no", "if_primary_term", "version",
               "version_type"),
    "create": ("wait_for_active_shards", "refresh", "routing", "timeout", "version", "version_type", "pipeline",
               "include_source_on_error"),
    "mget": ("stored_fields", "preference", "realtime", "refresh", "routing", *_SOURCE),
    "search": ("allow_partial_search_results", "batched_reduce_size", "ccs_minimize_roundtrips", "docvalue_fields",
               "explain", "from", "ignore_throttled", "include_named_queries_score", "max_concurrent_shard_requests",
               "pre_filter_shard_size", "preference", "request_cache", "rest_total_hits_as_int", "routing", "scroll",
               "search_type", "seq_no_primary_term", "size", "sort", "stats", "stored_fields", "suggest_field",
               "suggest_mode", "suggest_size", "suggest_text", "terminate_after", "timeout", "track_scores",
               "track_total_hits", "typed_keys", "version", "force_synthetic_source", *_QUERY_STRING, *_SOURCE,
               *_WILDCARDS),
    "msearch": ("ccs_minimize_roundtrips", "ignore_throttled", "include_named_queries_score", "max_concurrent_searches",
                "max_concurrent_shard_requests", "pre_filter_shard_size", "rest_total_hits_as_int", "routing",
                "search_type", "typed_keys", *_WILDCARDS),
    "cluster.health": ("expand_wildcards", "level", "local", "master_timeout", "timeout", "wait_for_active_shards",
                       "wait_for_nodes", "wait_for_events", "wait_for_no_relocating_shards",
                       "wait_for_no_initializing_shards", "wait_for_status"),
    "indices.update_aliases": ("timeout", "master_timeout"),
    "indices.get_alias": ("local", "master_timeout", *_WILDCARDS),
    "security.has_privileges": (),
}
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
        self.root_causes: list[dict[str, Any]] | None = None  # None: the error is its own root cause

    def body(self) -> dict[str, Any]:
        causes = self.root_causes or [{k: v for k, v in self.error.items() if k != "caused_by"}]
        return {"error": {"root_cause": causes, **self.error}, "status": self.status}


def index_not_found(name: str) -> EsError:
    return EsError(
        404, "index_not_found_exception", f"no such index [{name}]",
        **{"resource.type": "index_or_alias", "resource.id": name}, index_uuid="_na_", index=name,
    )  # fmt: skip


def aliases_not_found(aliases: list[str]) -> EsError:
    """AliasesNotFoundException: "aliases [a, b] missing"."""
    return EsError(404, "aliases_not_found_exception", f"aliases [{', '.join(aliases)}] missing",
                   **{"resource.type": "aliases", "resource.id": aliases[0] if len(aliases) == 1 else aliases})


def authentication_error(reason: str, **extra: Any) -> EsError:
    """401 as x-pack security answers it; the `header` entry is also sent as HTTP headers."""
    return EsError(401, "security_exception", reason, **extra, header={"WWW-Authenticate": WWW_AUTHENTICATE})


def parsing_error(reason: str) -> EsError:
    return EsError(400, "parsing_exception", reason)


def illegal_argument(reason: str) -> EsError:
    return EsError(400, "illegal_argument_exception", reason)


def mapping_error(reason: str, cause: str = "mapper_parsing_exception") -> EsError:
    """400 as MapperService.parseMapping wraps what the mapping parser threw: "Failed to parse mapping: <reason>",
    caused by it. The root cause is the inner error when it is an ElasticsearchException (mapper_parsing_exception,
    parse_exception), else the wrapper: guessRootCauses stops above a plain Java exception (illegal_argument ...)."""
    error = EsError(400, "mapper_parsing_exception", f"Failed to parse mapping: {reason}",
                    caused_by={"type": cause, "reason": reason})
    if cause in ("mapper_parsing_exception", "parse_exception"):
        error.root_causes = [{"type": cause, "reason": reason}]
    return error


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
    doc_order: dict[str, int] = field(default_factory=dict)  # id -> seq_no of its last write (Lucene doc order)
    seq_no: int = 0
    active_at: float = 0.0  # time.monotonic() from which the primaries are started
    graphs: dict[tuple[str, int], ShardGraph] = field(default_factory=dict)  # per (field, shard), until a refresh
    refresh_at: float = 0.0  # time.monotonic() of the next scheduled refresh (refresh_interval_s after the last)
    changed: bool = False  # written since the last refresh
    waiting: list[asyncio.Future[None]] = field(default_factory=list)  # refresh=wait_for writes, until a refresh

    @property
    def refresh_interval_s(self) -> float | None:
        """`index.refresh_interval` in seconds; None when -1 (only explicit refreshes)."""
        value = _seconds(self.settings["index.refresh_interval"], "index.refresh_interval", allow_minus_one=True)
        return None if value < 0 else value

    def refresh(self) -> None:
        """Make every write searchable, and answer the writes waiting for it (Lucene's reopen, RefreshListeners)."""
        if self.changed:
            self.searchable = dict(self.docs)
            self.graphs.clear()
            self.changed = False
        for waiter in self.waiting:
            if not waiter.done():
                waiter.set_result(None)
        self.waiting.clear()

    @property
    def shards(self) -> int:
        return int(self.settings["index.number_of_shards"])

    @property
    def replicas(self) -> int:
        return int(self.settings["index.number_of_replicas"])

    @property
    def active(self) -> bool:
        return time.monotonic() >= self.active_at

    def shard_of(self, doc_id: str) -> int:
        """The shard Elasticsearch routes a document id to (OperationRouting / IndexRouting)."""
        routing_shards = routing_num_shards(self.shards)
        return (_murmur3_utf16(doc_id) % routing_shards) // (routing_shards // self.shards)

    def properties(self) -> dict[str, Any]:
        return self.mappings.get("properties", {})


def routing_num_shards(shards: int) -> int:
    """`index.number_of_routing_shards` by default: the shard count doubled up to 1024 or so, so the index
    can be split (MetadataCreateIndexService.calculateNumRoutingShards)."""
    return shards * 2 ** max(10 - (shards - 1).bit_length(), 1)


def _murmur3_utf16(text: str) -> int:
    """Murmur3HashFunction.hash(String): murmur3 x86 32-bit, seed 0, over each UTF-16 unit's two bytes
    (low byte first), as Java's signed int (Python's % is then Java's Math.floorMod)."""
    data = text.encode("utf-16-le")
    c1, c2, h, mask = 0xCC9E2D51, 0x1B873593, 0, 0xFFFFFFFF
    body = len(data) - len(data) % 4
    for i in range(0, body, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        h ^= (k * c2) & mask
        h = ((h << 13) | (h >> 19)) & mask
        h = (h * 5 + 0xE6546B64) & mask
    tail = data[body:]
    if tail:
        k = int.from_bytes(tail, "little")
        k = (k * c1) & mask
        k = ((k << 15) | (k >> 17)) & mask
        h ^= (k * c2) & mask
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h - (1 << 32) if h >= 1 << 31 else h


@dataclass
class ShardGraph:
    """One shard's vectors (in Lucene doc order) and each one's nearest neighbours: the graph its kNN
    search walks, standing in for the shard's HNSW graph."""

    ids: list[str]
    vectors: np.ndarray  # unit length
    neighbours: np.ndarray  # row -> the rows it links to

    @classmethod
    def build(cls, ids: list[str], vectors: np.ndarray) -> ShardGraph:
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        links = min(GRAPH_NEIGHBOURS, len(ids) - 1)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :links]
        return cls(ids=ids, vectors=unit, neighbours=neighbours)

    def search(self, query: np.ndarray, ef: int, accept: np.ndarray) -> list[int]:
        """The rows (passing `accept`) a greedy beam search of width `ef` finds from row 0, as Lucene's
        HNSW search would; an exact search when the filter passes at most `ef` rows, or when the walk
        visits more rows than the filter passes (Lucene's fallback)."""
        similarity = self.vectors @ query  # all at once, for speed; which rows are *found* follows the graph
        passing = int(accept.sum())
        if passing <= ef:
            return [int(row) for row in np.flatnonzero(accept)]
        visited = {0}
        candidates = [(-float(similarity[0]), 0)]
        found: list[tuple[float, int]] = [(float(similarity[0]), 0)] if accept[0] else []
        while candidates:
            negative, row = heapq.heappop(candidates)
            if len(found) >= ef and -negative < found[0][0]:
                break
            for neighbour in self.neighbours[row]:
                neighbour = int(neighbour)
                if neighbour in visited:
                    continue
                visited.add(neighbour)
                score = float(similarity[neighbour])
                if len(found) < ef or score > found[0][0]:
                    heapq.heappush(candidates, (-score, neighbour))
                    if accept[neighbour]:
                        heapq.heappush(found, (score, neighbour))
                        if len(found) > ef:
                            heapq.heappop(found)
            if len(visited) > passing:
                return [int(row) for row in np.flatnonzero(accept)]
        return [row for _, row in found]


@dataclass(frozen=True)
class Principal:
    """Who a request signed in as: the name `_has_privileges` answers and the words a 403 uses."""

    username: str
    described: str


@dataclass
class Security:
    """Who may sign in to a secured double, and the privileges the role they get holds."""

    users: dict[str, str]  # username -> password
    api_keys: dict[str, str]  # API key id -> its secret (sent as base64 of "id:secret")
    role: str
    cluster: frozenset[str]  # cluster privileges held
    index: frozenset[str]  # index privileges held (on every index: the double has no index patterns)

    def authenticate(self, authorization: str | None, uri: str) -> Principal:
        """The signed-in principal, or the 401 Elasticsearch answers."""
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() == "basic":
            user, _, password = _decode_pair(credentials)
            if self.users.get(user) != password:
                raise authentication_error(f"unable to authenticate user [{user}] for REST request [{uri}]")
            return Principal(user, f"user [{user}] with effective roles [{self.role}]")
        if scheme.lower() == "apikey":
            key_id, _, secret = _decode_pair(credentials)
            if self.api_keys.get(key_id) != secret:
                problem = (f"invalid credentials for API key [{key_id}]" if key_id in self.api_keys
                           else f"unable to find apikey with id {key_id}")  # fmt: skip
                raise authentication_error(
                    "unable to authenticate with provided credentials and anonymous access is not allowed for "
                    "this request", additional_unsuccessful_credentials=f"API key: {problem}",
                )  # fmt: skip
            return Principal(API_KEY_OWNER, f"API key id [{key_id}] of user [{API_KEY_OWNER}]")
        raise authentication_error(f"missing authentication credentials for REST request [{uri}]")

    def holds(self, kind: Literal["cluster", "index"], privilege: str) -> bool:
        """Whether the role holds `privilege`, itself or through one that implies it."""
        held, implies = ((self.cluster, CLUSTER_PRIVILEGE_IMPLIES) if kind == "cluster"
                         else (self.index, INDEX_PRIVILEGE_IMPLIES))  # fmt: skip
        return "all" in held or any(privilege == p or privilege in implies.get(p, ()) for p in held)

    def authorize(self, principal: Principal, action: str, index: str | None) -> None:
        kind: Literal["cluster", "index"] = "cluster" if action in CLUSTER_ACTIONS else "index"
        if any(self.holds(kind, privilege) for privilege in ACTION_PRIVILEGES[action].split(",")):
            return
        on_indices = f" on indices [{index}]" if index and kind == "index" else ""
        raise EsError(
            403, "security_exception",
            f"action [{action}] is unauthorized for {principal.described}{on_indices}, this action is granted by "
            f"the {kind} privileges [{ACTION_PRIVILEGES[action]}]",
        )  # fmt: skip


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
        self.aliases: dict[str, set[str]] = {}  # alias -> the indices it points at
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.reject_bulk_requests = 0
        self.reject_bulk_items = 0
        self.stall_s = 0.0
        self.primaries_start_s = 0.0  # how long a new index's primaries take to start
        self.broken_shards: dict[int, dict[str, Any]] = {}  # shard -> the failure every search of it reports
        self.time_out_searches = 0  # the next n searches time out half-way
        self.security: Security | None = None  # None: security off, every request is let in
        self.version = "8.19.0"  # the version GET / names
        self.default_refresh_interval = "1s"  # index.refresh_interval of indices created without one
        self.write_flags: dict[tuple[str, str], bool] = {}  # (alias, index) -> is_write_index, where it is set
        self.port = 0
        self._actions: dict[tuple[str, str], str] = {}  # (method, route) -> the action ES authorizes
        self._params: dict[tuple[str, str], frozenset[str]] = {}  # (method, route) -> its query parameters
        self._paths: list[tuple[re.Pattern[str], str]] = []  # every route's path and method, for 400 or 405
        self._refresher: asyncio.Task[None] | None = None
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
        if self._refresher is not None:
            self._call(_cancelled(self._refresher))
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
        role: Role = "superuser", cluster: list[str] | None = None, index: list[str] | None = None,
    ) -> None:
        """Require credentials from now on: 401 unless one of `users` or `api_keys` signs in, 403
        for an action the role lacks: the built-in `role`, or (with `cluster` or `index`) a role of
        those privileges."""  # fmt: skip
        held = ROLE_PRIVILEGES[role]
        if cluster is not None or index is not None:
            role, held = "cbir", (frozenset(cluster or ()), frozenset(index or ()))  # type: ignore[assignment]
        self.security = Security(users=dict(users or {}), api_keys=dict(api_keys or {}), role=role,
                                 cluster=held[0], index=held[1])

    def break_shards(self, *shards: int, error: dict[str, Any] | None = None) -> None:
        """Make `shards` fail every search from now on with `error` (a circuit breaker trip by default:
        the partial failure a loaded cluster gives most often)."""
        for shard in shards:
            self.broken_shards[shard] = error or {
                "type": "circuit_breaking_exception",
                "reason": "[parent] Data too large, data for [indices:data/read/search[phase/query]] would be "
                          "[1031798784/984mb], which is larger than the limit of [1020054732/972.7mb]",
                "bytes_wanted": 1031798784, "bytes_limit": 1020054732, "durability": "TRANSIENT",
            }  # fmt: skip

    def calls(self, path: str, *, method: str | None = None) -> int:
        """How many requests `path` received (with `method`, when given)."""
        return sum(p == path and method in (None, m) for m, p in self.requests)

    def _call(self, coroutine: Awaitable[Any]) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)  # type: ignore[arg-type]

    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._es_edge], client_max_size=200 * 1024**2)
        routes = [
            ("GET", "/", self._info, "cluster:monitor/main", "info"),
            ("HEAD", "/", self._info, "cluster:monitor/main", "info"),
            ("GET", "/_xpack", self._xpack_info, "cluster:monitor/xpack/info", "xpack.info"),
            ("POST", "/_bulk", self._bulk, "indices:data/write/bulk", "bulk"),
            ("PUT", "/_bulk", self._bulk, "indices:data/write/bulk", "bulk"),
            ("HEAD", "/{index}", self._index_exists, "indices:admin/get", "indices.exists"),
            ("PUT", "/{index}", self._create_index, "indices:admin/create", "indices.create"),
            ("DELETE", "/{index}", self._delete_index, "indices:admin/delete", "indices.delete"),
            ("GET", "/{index}/_mapping", self._get_mapping, "indices:admin/mappings/get", "indices.get_mapping"),
            ("PUT", "/{index}/_mapping", self._put_mapping, "indices:admin/mapping/put", "indices.put_mapping"),
            ("POST", "/{index}/_refresh", self._refresh, "indices:admin/refresh", "indices.refresh"),
            ("GET", "/{index}/_refresh", self._refresh, "indices:admin/refresh", "indices.refresh"),
            ("POST", "/{index}/_bulk", self._bulk, "indices:data/write/bulk", "bulk"),
            ("PUT", "/{index}/_bulk", self._bulk, "indices:data/write/bulk", "bulk"),
            ("GET", "/{index}/_count", self._count, "indices:data/read/search", "count"),
            ("POST", "/{index}/_count", self._count, "indices:data/read/search", "count"),
            ("GET", "/{index}/_doc/{id}", self._get_doc, "indices:data/read/get", "get"),
            ("DELETE", "/{index}/_doc/{id}", self._delete_doc, "indices:data/write/delete", "delete"),
            ("PUT", "/{index}/_create/{id}", self._create_doc, "indices:data/write/index", "create"),
            ("POST", "/{index}/_create/{id}", self._create_doc, "indices:data/write/index", "create"),
            ("GET", "/{index}/_mget", self._mget, "indices:data/read/mget", "mget"),
            ("POST", "/{index}/_mget", self._mget, "indices:data/read/mget", "mget"),
            ("GET", "/_msearch", self._msearch, "indices:data/read/msearch", "msearch"),
            ("POST", "/_msearch", self._msearch, "indices:data/read/msearch", "msearch"),
            ("GET", "/_cluster/health", self._cluster_health, "cluster:monitor/health", "cluster.health"),
            ("POST", "/_aliases", self._update_aliases, "indices:admin/aliases", "indices.update_aliases"),
            ("GET", "/_alias/{name}", self._get_alias, "indices:admin/aliases/get", "indices.get_alias"),
            ("GET", "/{index}/_alias", self._get_alias, "indices:admin/aliases/get", "indices.get_alias"),
            ("GET", "/_cluster/health/{index}", self._cluster_health, "cluster:monitor/health", "cluster.health"),
            ("GET", "/_security/user/_has_privileges", self._has_privileges, None, "security.has_privileges"),
            ("POST", "/_security/user/_has_privileges", self._has_privileges, None, "security.has_privileges"),
            ("GET", "/{index}/_msearch", self._msearch, "indices:data/read/msearch", "msearch"),
            ("POST", "/{index}/_msearch", self._msearch, "indices:data/read/msearch", "msearch"),
            ("GET", "/{index}/_search", self._search, "indices:data/read/search", "search"),
            ("POST", "/{index}/_search", self._search, "indices:data/read/search", "search"),
        ]
        for method, path, handler, action, api in routes:
            app.router.add_route(method, path, handler)
            if action is not None:
                self._actions[(method, path)] = action
            self._params[(method, path)] = COMMON_PARAMS | set(API_PARAMS[api])
            self._paths.append((re.compile("^" + re.sub(r"\\{\w+\\}", "[^/]+", re.escape(path)) + "$"), method))
        app.router.add_route("*", "/{tail:.*}", self._no_handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._refresher = asyncio.create_task(self._refresh_on_schedule(), name="es-double refresh")

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
            self._check_params(request)
            response = await handler(request)
        except EsError as exc:
            response = _json(exc.body(), status=exc.status)
            for name, values in exc.error.get("header", {}).items():
                for value in values:
                    response.headers.add(name, value)
        response.headers[PRODUCT_HEADER[0]] = PRODUCT_HEADER[1]
        return response

    def _check_params(self, request: web.Request) -> None:
        """A query parameter the endpoint does not take is refused, naming the near ones it does
        (BaseRestHandler.handleRequest and unrecognized)."""
        resource = request.match_info.route.resource
        allowed = self._params.get((request.method, resource.canonical)) if resource is not None else None
        if allowed is None:
            return
        unknown = sorted(set(request.query) - allowed)
        if unknown:
            raise illegal_argument(_unrecognized(request.path, unknown, allowed))

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
        """A path no endpoint has is a 400, one with other methods a 405 naming them (RestController)."""
        allowed = sorted({method for pattern, method in self._paths if pattern.match(request.path)})
        if allowed:
            reason = (f"Incorrect HTTP method for uri [{request.path_qs}] and method [{request.method}], "
                      f"allowed: [{', '.join(allowed)}]")  # fmt: skip
            return _json({"error": reason, "status": 405}, status=405)
        reason = f"no handler found for uri [{request.path_qs}] and method [{request.method}]"
        return _json({"error": reason, "status": 400}, status=400)

    def resolve_all(self, name: str) -> list[Index]:
        """Every index `name` names: itself, or all the indices of an alias, in name order
        (IndexNameExpressionResolver.concreteIndices, as searches, counts and index APIs resolve it)."""
        if name in self.indices:
            return [self.indices[name]]
        targets = self.aliases.get(name)
        if not targets:
            raise index_not_found(name)
        return [self.indices[target] for target in sorted(targets)]

    def resolve(self, name: str) -> Index:
        """The one index a read of one document names: itself, or the only index of an alias
        (IndexNameExpressionResolver.concreteSingleIndex)."""
        indices = self.resolve_all(name)
        if len(indices) > 1:
            raise illegal_argument(f"alias [{name}] has more than one index associated with it "
                                   f"[{', '.join(index.name for index in indices)}], can't execute a single index op")
        return indices[0]

    def write_index(self, name: str) -> Index:
        """The index a write to `name` goes to: itself, or the alias's write index (flagged `is_write_index`, or
        its only index unless flagged false): IndexNameExpressionResolver.concreteWriteIndex, IndexAbstraction.Alias."""
        indices = self.resolve_all(name)
        if name not in self.aliases:
            return indices[0]
        flags = {index.name: self.write_flags.get((name, index.name)) for index in indices}
        writers = [index for index in indices if flags[index.name]]
        if writers:
            return writers[0]
        if len(indices) == 1 and flags[indices[0].name] is None:
            return indices[0]
        raise illegal_argument(
            f"no write index is defined for alias [{name}]. The write index may be explicitly disabled using "
            "is_write_index=false or the alias points to multiple indices without one being designated as a "
            "write index")  # fmt: skip

    def _index(self, request: web.Request) -> Index:
        return self.resolve(request.match_info["index"])

    def _indices(self, request: web.Request) -> list[Index]:
        return self.resolve_all(request.match_info["index"])

    # -- indices --------------------------------------------------------------------------------

    async def _info(self, request: web.Request) -> web.StreamResponse:
        """GET / (RestMainAction, MainResponse): the node, the cluster and the version."""
        major = int(self.version.split(".")[0])
        body = {
            "name": "cbir-es-1", "cluster_name": "cbir", "cluster_uuid": "cbir-double-cluster-uuid0",
            "version": {"number": self.version, "build_flavor": "default", "build_type": "docker",
                        "build_hash": "0" * 40, "build_date": "2025-07-01T00:00:00.000000000Z",
                        "build_snapshot": False, "lucene_version": "9.12.2" if major < 9 else "10.2.2",
                        "minimum_wire_compatibility_version": f"{major - 1}.17.0" if major < 9 else "8.19.0",
                        "minimum_index_compatibility_version": f"{major - 1}.0.0"},
            "tagline": "You Know, for Search",
        }  # fmt: skip
        return _json(body) if request.method == "GET" else web.Response(headers={"Content-Type": JSON_TYPE})

    async def _xpack_info(self, request: web.Request) -> web.StreamResponse:
        """x-pack's info (TransportXPackInfoAction): `features.security.enabled` is xpack.security.enabled
        (SecurityInfoTransportAction); `categories` picks the parts."""
        body = {
            "build": {"hash": "0" * 40, "date": "2025-07-01T00:00:00.000000000Z"},
            "license": {"uid": "cbir-double-license", "type": "basic", "mode": "basic", "status": "active"},
            "features": {"security": {"available": True, "enabled": self.security is not None}},
            "tagline": "You know, for X",
        }
        wanted = request.query.get("categories", "build,license,features").split(",")
        return _json({key: value for key, value in body.items() if key in wanted or key == "tagline"})

    async def _has_privileges(self, request: web.Request) -> web.StreamResponse:
        """What the signed-in account holds of the privileges asked (TransportHasPrivilegesAction); with security off,
        the 500 of SecurityBaseRestHandler.checkFeatureAvailable."""
        if self.security is None:
            raise EsError(500, "illegal_state_exception",
                          "Security is not enabled but a security rest handler is registered")
        principal = self.security.authenticate(request.headers.get("Authorization"), request.path_qs)
        body = await _json_body(request)
        for key in set(body) - {"cluster", "index", "application"}:
            raise parsing_error(f"[has_privileges request] unknown field [{key}]")
        cluster = {name: self.security.holds("cluster", name) for name in body.get("cluster", [])}
        index: dict[str, dict[str, bool]] = {}
        for entry in body.get("index", []):
            if not entry.get("names") or not entry.get("privileges"):
                raise EsError(400, "action_request_validation_exception", "Validation Failed: 1: indices privileges "
                              "must refer to at least one index name and one privilege;")  # fmt: skip
            for name in entry["names"]:
                index.setdefault(name, {}).update(
                    {privilege: self.security.holds("index", privilege) for privilege in entry["privileges"]})
        held_all = all(cluster.values()) and all(all(held.values()) for held in index.values())
        return _json({"username": principal.username, "has_all_requested": held_all, "cluster": cluster,
                      "index": index, "application": {}})

    async def _index_exists(self, request: web.Request) -> web.StreamResponse:
        try:
            self._indices(request)
            exists = True
        except EsError:
            exists = False
        return web.Response(status=200 if exists else 404, headers={"Content-Type": JSON_TYPE})

    async def _create_index(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["index"]
        _check_index_name(name)
        body = await _json_body(request, optional=True)
        unknown = set(body) - {"settings", "mappings", "aliases"}
        if unknown:
            raise parsing_error(f"unknown key [{sorted(unknown)[0]}] for create index")
        if name in self.aliases:
            raise EsError(400, "invalid_index_name_exception", f"Invalid index name [{name}], already exists as alias",
                          index_uuid="_na_", index=name)  # fmt: skip
        if name in self.indices:
            existing = self.indices[name]
            raise EsError(
                400, "resource_already_exists_exception", f"index [{name}/{existing.uuid}] already exists",
                index_uuid=existing.uuid, index=name,
            )  # fmt: skip
        settings = _index_settings({"refresh_interval": self.default_refresh_interval, **body.get("settings", {})})
        mappings = body.get("mappings", {})
        _check_mappings(mappings)
        starting = self.primaries_start_s > 0
        aliases, flags = self._alias_state()
        for alias, spec in body.get("aliases", {}).items():
            for key in set(spec or {}) - ALIAS_PARAMS:
                raise illegal_argument(f"Unsupported field [{key}]")  # Alias.fromXContent
            if alias in self.indices:
                raise EsError(400, "invalid_alias_name_exception", f"Invalid alias name [{alias}]: an index or data "
                              "stream exists with the same name as the alias", index_uuid="_na_", index=alias)
            aliases.setdefault(alias, set()).add(name)
            if (spec or {}).get("is_write_index") is not None:
                flags[(alias, name)] = bool(spec["is_write_index"])
        self._commit_aliases(aliases, flags)  # before the index exists: a refused alias creates nothing
        now = time.monotonic()
        index = Index(name=name, settings=settings, mappings=mappings, active_at=now + self.primaries_start_s)
        index.refresh_at = now + (index.refresh_interval_s or 0.0)
        self.indices[name] = index
        # The create call waits for the primaries (wait_for_active_shards=1) and says when that timed out.
        return _json({"acknowledged": True, "shards_acknowledged": not starting, "index": name})

    async def _delete_index(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["index"]
        if name in self.aliases:
            raise illegal_argument(f"The provided expression [{name}] matches an alias, specify the corresponding "
                                   "concrete indices instead.")
        index = self._index(request)
        self._drop(index.name)
        return _json({"acknowledged": True})

    def _drop(self, name: str) -> None:
        """Delete an index; it takes its aliases with it."""
        index = self.indices.pop(name)
        index.refresh()  # writes waiting for its refresh are answered, as a closed shard answers its listeners
        aliases, flags = self._alias_state()
        for names in aliases.values():
            names.discard(name)
        self._commit_aliases(aliases, flags)

    # -- aliases --------------------------------------------------------------------------------

    def _alias_state(self) -> tuple[dict[str, set[str]], dict[tuple[str, str], bool]]:
        """A copy of the aliases and their `is_write_index` flags, to change and then commit whole."""
        return {alias: set(names) for alias, names in self.aliases.items()}, dict(self.write_flags)

    def _commit_aliases(self, aliases: dict[str, set[str]], flags: dict[tuple[str, str], bool]) -> None:
        """Make `aliases` the cluster's, unless an alias would have two write indices (the metadata's validation:
        IndexAbstraction.Alias, "alias [a] has more than one write index [x,y]", an IllegalStateException: 500)."""
        for alias, names in sorted(aliases.items()):
            writers = sorted(name for name in names if flags.get((alias, name)))
            if len(writers) > 1:
                raise EsError(500, "illegal_state_exception",
                              f"alias [{alias}] has more than one write index [{','.join(writers)}]")
        self.aliases = {alias: names for alias, names in aliases.items() if names}
        self.write_flags = {(alias, name): flag for (alias, name), flag in flags.items()
                            if name in self.aliases.get(alias, ())}  # fmt: skip

    async def _update_aliases(self, request: web.Request) -> web.StreamResponse:
        """The actions applied to one new cluster state, or none of them (TransportIndicesAliasesAction,
        MetadataIndexAliasesService). A `remove` that finds nothing is a failed action, reported in `action_results`
        with `errors: true` while the others apply (8.14+), unless it says `must_exist: true`: then the whole call
        is a 404 and nothing changes (rest-api-spec indices.update_aliases/40_must_exist.yml)."""
        body = await _json_body(request)
        actions = body.get("actions")
        if not isinstance(actions, list) or not actions:
            raise EsError(400, "action_request_validation_exception", "Validation Failed: 1: No action specified;")
        parsed = [_alias_action(action) for action in actions]
        aliases, flags = self._alias_state()
        doomed = {name for kind, names, _, _ in parsed if kind == "remove_index" for name in names}
        results: list[dict[str, Any]] = []
        applied = False
        for kind, names, wanted, spec in parsed:
            for name in names:
                if name not in self.indices:
                    raise index_not_found(name)
            result: dict[str, Any] = {"action": {"type": kind, "indices": sorted(names), "aliases": wanted},
                                      "status": 200}  # fmt: skip
            if kind == "add":
                for alias in wanted:
                    if alias in self.indices and alias not in doomed:  # the documented index-to-alias swap
                        raise EsError(400, "invalid_alias_name_exception", f"Invalid alias name [{alias}]: an index "
                                      "or data stream exists with the same name as the alias", index_uuid="_na_",
                                      index=alias)  # fmt: skip
                    for name in names:
                        aliases.setdefault(alias, set()).add(name)
                        if spec.get("is_write_index") is not None:
                            flags[(alias, name)] = bool(spec["is_write_index"])
                applied = True
            elif kind == "remove":
                removed = 0
                for alias in wanted:
                    for name in names:
                        if name in aliases.get(alias, set()):
                            aliases[alias].discard(name)
                            removed += 1
                        elif spec.get("must_exist") is True:  # AliasAction.Remove.apply
                            raise EsError(404, "resource_not_found_exception",
                                          f"required alias [{alias}] does not exist")
                if removed:
                    applied = True
                else:  # IndicesAliasesResponse.AliasActionResult.buildRemoveError
                    result.update(status=404, error=aliases_not_found(wanted).error)
            else:
                applied = True
            results.append(result)
        if not applied:  # no action left to apply: the whole call fails
            raise aliases_not_found(sorted({alias for _, _, wanted, _ in parsed for alias in wanted}))
        for name in doomed:
            for names in aliases.values():
                names.discard(name)
        self._commit_aliases(aliases, flags)
        for name in doomed:
            self.indices.pop(name).refresh()
        errors = any(result["status"] != 200 for result in results)
        return _json({"acknowledged": True, "errors": errors, **({"action_results": results} if errors else {})})

    async def _get_alias(self, request: web.Request) -> web.StreamResponse:
        """`GET /_alias/{name}` (404 when missing) or `GET /{index}/_alias` (an index, an alias's indices, or a `*`
        pattern); an `is_write_index` set on an alias is shown (AliasMetadata.toXContent)."""
        if "name" in request.match_info:
            alias = request.match_info["name"]
            if alias not in self.aliases:
                return _json({"error": f"alias [{alias}] missing", "status": 404}, status=404)
            return _json({name: {"aliases": {alias: self._alias_body(alias, name)}}
                          for name in sorted(self.aliases[alias])})  # fmt: skip
        pattern = request.match_info["index"]
        if "*" in pattern:
            expression = re.escape(pattern).replace(r"\*", ".*")
            names = [name for name in sorted(self.indices) if re.fullmatch(expression, name)]
        else:
            names = [index.name for index in self._indices(request)]
        return _json({name: {"aliases": {alias: self._alias_body(alias, name) for alias, targets
                                         in sorted(self.aliases.items()) if name in targets}}
                      for name in names})  # fmt: skip

    def _alias_body(self, alias: str, index: str) -> dict[str, Any]:
        flag = self.write_flags.get((alias, index))
        return {} if flag is None else {"is_write_index": flag}

    async def _get_mapping(self, request: web.Request) -> web.StreamResponse:
        return _json({index.name: {"mappings": index.mappings} for index in self._indices(request)})

    async def _put_mapping(self, request: web.Request) -> web.StreamResponse:
        indices = self._indices(request)
        body = await _json_body(request)
        _check_mappings(body)
        for index in indices:
            properties = index.mappings.setdefault("properties", {})
            for name, spec in body.get("properties", {}).items():
                current = properties.get(name)
                if current is not None and current != spec:
                    changed = sorted(k for k in set(current) | set(spec) if current.get(k) != spec.get(k))[0]
                    raise illegal_argument(
                        f"Mapper for [{name}] conflicts with existing mapper:\n\tCannot update parameter "
                        f"[{changed}] from [{current.get(changed)}] to [{spec.get(changed)}]"
                    )
        for index in indices:
            index.mappings.setdefault("properties", {}).update(body.get("properties", {}))
            for key in ("_meta", "dynamic"):
                if key in body:
                    index.mappings[key] = body[key]  # _meta is replaced whole, as ES does
        return _json({"acknowledged": True})

    async def _refresh(self, request: web.Request) -> web.StreamResponse:
        indices = self._indices(request)
        for index in indices:
            index.refresh()
        total = sum(index.shards * (1 + index.replicas) for index in indices)
        return _json({"_shards": {"total": total, "successful": sum(index.shards for index in indices), "failed": 0}})

    async def _refresh_on_schedule(self) -> None:
        """Each index refreshes every `index.refresh_interval` (IndexService's scheduled refresh task); a refresh
        with nothing written since the last only answers the writes waiting for one."""
        while True:
            now = time.monotonic()
            next_due = now + 0.1
            for index in list(self.indices.values()):
                interval = index.refresh_interval_s
                if interval is None:
                    continue
                if now >= index.refresh_at:
                    index.refresh()
                    index.refresh_at = now + interval
                next_due = min(next_due, index.refresh_at)
            await asyncio.sleep(max(next_due - time.monotonic(), 0.001))

    async def _refreshed_as_asked(self, indices: list[Index], request: web.Request) -> None:
        """`refresh=true` (or empty) refreshes the written indices now; `refresh=wait_for` answers once their next
        refresh has made the writes searchable (RefreshListeners); `false` does neither."""
        policy = _refresh_policy(request)
        if policy == "true":
            for index in indices:
                index.refresh()
        elif policy == "wait_for" and indices:
            loop = asyncio.get_running_loop()
            waiters = []
            for index in indices:
                waiter: asyncio.Future[None] = loop.create_future()
                index.waiting.append(waiter)
                waiters.append(waiter)
            await asyncio.gather(*waiters)

    # -- documents ------------------------------------------------------------------------------

    async def _bulk(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        if not request.content_type.endswith("x-ndjson"):
            raise illegal_argument("The bulk request must be terminated by a newline [\\n]")
        _refresh_policy(request)
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
        operations: list[tuple[str, str, str | None, dict[str, Any] | None]] = []  # op, index, id, source
        position = 0
        while position < len(lines):
            line_no = position + 1
            action = _bulk_action(lines[position], line_no)
            op, meta = next(iter(action.items()))
            position += 1
            name = meta.get("_index", default_index)
            if name is None:
                raise EsError(400, "action_request_validation_exception", "Validation Failed: 1: index is missing;")
            source = None
            if op in ("index", "create"):
                if position >= len(lines):
                    raise illegal_argument("The bulk request must be terminated by a newline [\\n]")
                source = _loads(lines[position])
                position += 1
            if meta.get("_id") == "":  # IndexRequest.validate, per item
                operations.append((op, name, "", None if op == "delete" else source))
                continue
            doc_id = meta.get("_id") if op == "delete" else meta.get("_id") or uuid.uuid4().hex[:20]
            operations.append((op, name, doc_id, source))
        per_shard = self._bulk_shard_requests(operations)
        items = []
        written: dict[str, Index] = {}
        for op, name, doc_id, source in operations:
            if doc_id == "":
                items.append({op: {"_index": name, "_id": "", "status": 400, "error": {
                    "type": "illegal_argument_exception", "reason": "if _id is specified it must not be empty"}}})
                continue
            try:
                index = self.write_index(name)  # a missing index is refused per item (auto_create_index: false)
            except EsError as exc:
                items.append({op: {"_index": name, "_id": doc_id, "status": exc.status, "error": exc.error}})
                continue
            inactive = self._inactive_primary(index, doc_id, per_shard)
            if inactive is not None:
                items.append({op: inactive})
                continue
            item = self._bulk_delete(index, doc_id) if source is None else self._bulk_write(op, index, doc_id, source)
            if item["status"] < 300:
                written[index.name] = index
            items.append({op: item})
        await self._refreshed_as_asked(list(written.values()), request)
        took = int((time.perf_counter() - started) * 1000)
        errors = any(next(iter(item.values()))["status"] >= 300 for item in items)
        return _json({"errors": errors, "took": took, "items": items})

    def _bulk_shard_requests(self, operations: list[tuple[str, str, str | None, Any]]) -> dict[tuple[str, int], int]:
        """How many items of this bulk go to each shard (Elasticsearch sends one BulkShardRequest each)."""
        counts: dict[tuple[str, int], int] = {}
        for _, name, doc_id, _ in operations:
            try:
                index = self.write_index(name)
            except EsError:
                continue
            if doc_id is not None:
                key = (index.name, index.shard_of(doc_id))
                counts[key] = counts.get(key, 0) + 1
        return counts

    def _inactive_primary(self, index: Index, doc_id: str | None, per_shard: dict[tuple[str, int], int]
                          ) -> dict | None:  # fmt: skip
        """The 503 item of a write to a primary that has not started yet (TransportReplicationAction)."""
        if index.active or doc_id is None:
            return None
        name, shard = index.name, index.shard_of(doc_id)
        reason = (f"[{name}][{shard}] primary shard is not active Timeout: [1m], request: [BulkShardRequest "
                  f"[[{name}][{shard}]] containing [{per_shard[(name, shard)]}] requests]")  # fmt: skip
        return {"_index": name, "_id": doc_id, "status": 503,
                "error": {"type": "unavailable_shards_exception", "reason": reason}}  # fmt: skip

    def _bulk_write(self, op: str, index: Index, doc_id: str | None, source: dict[str, Any]) -> dict[str, Any]:
        """An `index` item (writes, 201 created or 200 updated) or a `create` item (409 when the id exists)."""
        assert doc_id is not None
        head = {"_index": index.name, "_id": doc_id}
        if self.reject_bulk_items > 0:
            self.reject_bulk_items -= 1
            return {**head, "status": 429, "error": {
                "type": "es_rejected_execution_exception",
                "reason": "rejected execution of primary operation on EsThreadPoolExecutor"
                "[name = double/write, queue capacity = 10000, active threads = 2, queued tasks = 10000]",
            }}  # fmt: skip
        try:
            _check_document(index, doc_id, source)
        except EsError as exc:
            return {**head, "status": exc.status, "error": exc.error}
        if op == "create" and doc_id in index.docs:
            return {**head, "status": 409, "error": _version_conflict(index, doc_id).error}
        created = doc_id not in index.docs
        return {**head, **self._write(index, doc_id, source), "result": "created" if created else "updated",
                "status": 201 if created else 200}  # fmt: skip

    def _bulk_delete(self, index: Index, doc_id: str | None) -> dict[str, Any]:
        found = doc_id in index.docs
        written = self._write(index, doc_id, None)
        return {"_index": index.name, "_id": doc_id, **written, "result": "deleted" if found else "not_found",
                "status": 200 if found else 404}  # fmt: skip

    def _write(self, index: Index, doc_id: str | None, source: dict[str, Any] | None) -> dict[str, Any]:
        """Store (or, with no source, delete) a document; the bulk item's bookkeeping fields."""
        assert doc_id is not None
        version = index.versions.get(doc_id, 0) + 1
        index.versions[doc_id] = version
        if source is None:
            index.docs.pop(doc_id, None)
            index.doc_order.pop(doc_id, None)
        else:
            index.docs[doc_id] = source
            index.doc_order[doc_id] = index.seq_no  # an update is a new Lucene doc, after every other
        index.seq_no += 1
        index.changed = True
        shards = {"total": 1 + index.replicas, "successful": 1, "failed": 0}
        return {"_version": version, "_shards": shards, "_seq_no": index.seq_no - 1, "_primary_term": 1}

    async def _count(self, request: web.Request) -> web.StreamResponse:
        indices = self._indices(request)
        body = await _json_body(request, optional=True)
        if set(body) - {"query"} or body.get("query", {"match_all": {}}) != {"match_all": {}}:
            raise parsing_error("the double counts with match_all only")
        # A count is a search of every shard (TransportCountAction runs as a size-0 search): a shard that fails is
        # reported in `_shards` and its documents are missing from the count; when every one fails, it fails.
        failures = {(index.name, shard): (index, error) for index in indices
                    for shard, error in self._shard_failures(index).items()}  # fmt: skip
        total = sum(index.shards for index in indices)
        if len(failures) == total:
            raise all_shards_failed("query", failures)
        count = sum(1 for index in indices for doc_id in index.searchable
                    if (index.name, index.shard_of(doc_id)) not in failures)  # fmt: skip
        shards: dict[str, Any] = _shards_header(total, failed=len(failures))
        if failures:
            shards["failures"] = [_shard_failure(index, shard, error)
                                  for (_, shard), (index, error) in sorted(failures.items())]  # fmt: skip
        return _json({"count": count, "_shards": shards})

    async def _get_doc(self, request: web.Request) -> web.StreamResponse:
        index = self._index(request)
        doc_id = request.match_info["id"]
        if doc_id not in index.docs:
            return _json({"_index": index.name, "_id": doc_id, "found": False}, status=404)
        return _json({**self._doc_head(index, doc_id), "found": True,
                      **_source_part(index.docs[doc_id], request.query)})  # fmt: skip

    async def _delete_doc(self, request: web.Request) -> web.StreamResponse:
        index = self.write_index(request.match_info["index"])
        _refresh_policy(request)
        doc_id = request.match_info["id"]
        found = doc_id in index.docs
        written = self._write(index, doc_id, None)
        await self._refreshed_as_asked([index], request)
        body = {"_index": index.name, "_id": doc_id, **written, "result": "deleted" if found else "not_found"}
        return _json(body, status=200 if found else 404)

    async def _create_doc(self, request: web.Request) -> web.StreamResponse:
        """The create API: 409 `version_conflict_engine_exception` when the id exists (the check and the
        write are one step, as on the primary shard, so of two concurrent creates exactly one wins)."""
        index = self.write_index(request.match_info["index"])
        _refresh_policy(request)
        doc_id = request.match_info["id"]
        source = await _json_body(request)
        if not index.active:
            raise EsError(503, "unavailable_shards_exception",
                          f"[{index.name}][{index.shard_of(doc_id)}] primary shard is not active Timeout: [1m]")
        _check_document(index, doc_id, source)
        if doc_id in index.docs:
            raise _version_conflict(index, doc_id)
        written = self._write(index, doc_id, source)
        await self._refreshed_as_asked([index], request)
        return _json({"_index": index.name, "_id": doc_id, **written, "result": "created"}, status=201)

    async def _mget(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["index"]
        body = await _json_body(request)
        if set(body) - {"ids", "docs"}:
            raise parsing_error(f"unknown key [{sorted(set(body) - {'ids', 'docs'})[0]}] for a mget request")
        ids = body.get("ids") or [doc.get("_id") for doc in body.get("docs", [])]
        if not ids:
            raise EsError(400, "action_request_validation_exception", "Validation Failed: 1: no documents to get;")
        try:
            index: Index | None = self.resolve(name)
            refused = None
        except EsError as exc:  # each doc says why (TransportMultiGetAction)
            index, refused = None, exc.error
        docs = []
        for doc_id in ids:
            if index is None:
                docs.append({"_index": name, "_id": doc_id, "error": refused})
            elif doc_id in index.docs:
                docs.append({**self._doc_head(index, doc_id), "found": True,
                             **_source_part(index.docs[doc_id], request.query)})  # fmt: skip
            else:
                docs.append({"_index": index.name, "_id": doc_id, "found": False})
        return _json({"docs": docs})

    def _doc_head(self, index: Index, doc_id: str) -> dict[str, Any]:
        return {"_index": index.name, "_id": doc_id, "_version": index.versions[doc_id],
                "_seq_no": 0, "_primary_term": 1}  # fmt: skip

    # -- search ---------------------------------------------------------------------------------

    async def _search(self, request: web.Request) -> web.StreamResponse:
        indices = self._indices(request)
        body = await _json_body(request, optional=True)
        _check_search_body(body)
        if "size" not in body and "size" in request.query:
            body = {**body, "size": request.query["size"]}
        return _json(self._search_response(indices, body))

    async def _msearch(self, request: web.Request) -> web.StreamResponse:
        """NDJSON header/body pairs; every item answered on its own, an error item carrying its status
        (MultiSearchResponse.toXContent). The whole request fails only when it cannot be parsed."""
        started = time.perf_counter()
        text = await request.text() if request.can_read_body else ""
        if not text.endswith("\n"):
            raise illegal_argument("The msearch request must be terminated by a newline [\\n]")
        lines = [line for line in text.split("\n")[:-1]]
        if not any(lines):
            raise EsError(400, "action_request_validation_exception", "Validation Failed: 1: no requests added;")
        if len(lines) % 2:
            raise parsing_error("[msearch] every search needs a header line and a body line")
        searches = []
        for header_line, body_line in zip(lines[::2], lines[1::2], strict=True):
            header, body = _loads(header_line or "{}"), _loads(body_line)
            for key in set(header) - MSEARCH_HEADER_KEYS:
                raise illegal_argument(f"key [{key}] is not supported in the metadata section")
            _check_search_body(body)
            searches.append((header.get("index", request.match_info.get("index")), body))
        responses = []
        for name, body in searches:
            try:
                if name is None:
                    raise EsError(400, "action_request_validation_exception", "Validation Failed: 1: index is missing;")
                responses.append({**self._search_response(self.resolve_all(name), body), "status": 200})
            except EsError as exc:
                responses.append(exc.body())
        return _json({"took": int((time.perf_counter() - started) * 1000), "responses": responses})

    def _search_response(self, indices: list[Index], body: dict[str, Any]) -> dict[str, Any]:
        """One search over the shards of every index that answer: their hits merged, the others reported as
        failures; what every shard refuses fails the search (all shards failed)."""
        started = time.perf_counter()
        size = _int_param(body.get("size", 10), "size")
        start = _int_param(body.get("from", 0), "from")
        if "knn" in body and "query" in body:
            raise illegal_argument("the double does not combine [knn] with [query]")
        phase = "dfs" if "knn" in body else "query"
        failures = {(index.name, shard): (index, error) for index in indices
                    for shard, error in self._shard_failures(index).items()}  # fmt: skip
        answering = [(index, shard) for index in indices for shard in range(index.shards)
                     if (index.name, shard) not in failures]  # fmt: skip
        timed_out = False
        if self.time_out_searches > 0 and answering:
            self.time_out_searches -= 1
            timed_out = True  # the shards past the first half did not answer within `timeout`
            answering = answering[: max(len(answering) // 2, 1)]
        if not answering:
            raise all_shards_failed(phase, failures)
        sort_field = _sort_field(body["sort"]) if "sort" in body else None
        try:
            ranked = self._ranked_hits(indices, body, answering, size=size, start=start)
            if sort_field is not None:
                ranked = _sorted_after(indices, ranked, sort_field, body.get("search_after"))
        except ShardError as exc:
            every = {(index.name, shard): (index, exc.error) for index, shard in answering}
            raise all_shards_failed(phase, every, status=exc.status) from exc
        hits = [{"_index": index.name, "_id": doc_id, "_score": None if sort_field else score,
                 **_source_part(index.searchable[doc_id], {}, body.get("_source", True)),
                 **({"sort": [index.searchable[doc_id].get(sort_field)]} if sort_field else {})}
                for index, doc_id, score in ranked[start : start + size]]  # fmt: skip
        total = sum(index.shards for index in indices)
        shards: dict[str, Any] = _shards_header(total, failed=len(failures))
        if failures:
            shards["failures"] = [_shard_failure(index, shard, error)
                                  for (_, shard), (index, error) in sorted(failures.items())]  # fmt: skip
        response = {
            "took": int((time.perf_counter() - started) * 1000),
            "timed_out": timed_out,
            "_shards": shards,
            "hits": {
                "total": {"value": len(ranked), "relation": "eq"},
                "max_score": ranked[0][2] if ranked and sort_field is None else None,
                "hits": hits,
            },
        }
        aggregations = body.get("aggs", body.get("aggregations"))
        if aggregations is not None:
            response["aggregations"] = _aggregations(indices, ranked, aggregations)
        return response

    def _ranked_hits(self, indices: list[Index], body: dict[str, Any], answering: list[tuple[Index, int]], *,
                     size: int, start: int) -> list[Hit]:
        """The documents of the answering shards that match, best first (the coordinating node's merge). What each
        shard checks before it searches raises `ShardError`: the result window (DefaultSearchContext.preProcess,
        `index.max_result_window`) and `search_after` without a sort (SearchAfterBuilder.buildFieldDoc)."""
        for index in indices:
            limit = int(index.settings.get("index.max_result_window", MAX_RESULT_WINDOW))
            if start + size > limit:
                raise ShardError(
                    400, "illegal_argument_exception",
                    f"Result window is too large, from + size must be less than or equal to: [{limit}] but was "
                    f"[{start + size}]. See the scroll api for a more efficient way to request large data sets. "
                    "This limit can be set by changing the [index.max_result_window] index level setting.",
                )  # fmt: skip
        if "search_after" in body and "sort" not in body:
            raise ShardError(400, "illegal_argument_exception", "Sort must contain at least one field.")
        live = {(index.name, shard) for index, shard in answering}
        if "knn" in body:
            knn, found = _knn_request(body["knn"], size), []
            for index in indices:
                shards = [shard for name, shard in live if name == index.name]
                found += [(index, doc_id, score) for doc_id, score in _knn_scores(index, knn, shards).items()]
            return _ranked(found)[: knn["k"]]
        query = body.get("query", {"match_all": {}})
        return _ranked([(index, doc_id, score) for index in indices
                        for doc_id, score in _query_scores(index, query).items()
                        if (index.name, index.shard_of(doc_id)) in live])  # fmt: skip

    def _shard_failures(self, index: Index) -> dict[int, dict[str, Any]]:
        """The shards that cannot answer a search now, and why."""
        if not index.active:  # a fresh index whose primaries have not started: no copy to search
            return {shard: {"type": "no_shard_available_action_exception", "reason": None}
                    for shard in range(index.shards)}  # fmt: skip
        return {shard: error for shard, error in self.broken_shards.items() if shard < index.shards}

    async def _cluster_health(self, request: web.Request) -> web.StreamResponse:
        """Cluster health, waiting up to `timeout` for `wait_for_status` and for the indices named to exist: a
        missing one makes the health red and the wait time out, 408 (TransportClusterHealthAction.prepareResponse,
        ClusterHealthResponse.status())."""
        name = request.match_info.get("index")
        wanted = request.query.get("wait_for_status")
        if wanted is not None and wanted not in HEALTH_RANK:
            raise illegal_argument(f"unknown cluster health status [{wanted}]")
        deadline = time.monotonic() + _seconds(request.query.get("timeout", "30s"))

        def named() -> list[Index] | None:
            if name is None:
                return list(self.indices.values())
            try:
                return self.resolve_all(name)
            except EsError:
                return None  # not (yet) there

        def satisfied(indices: list[Index] | None) -> bool:
            return indices is not None and (wanted is None or HEALTH_RANK[_health(indices)] <= HEALTH_RANK[wanted])

        indices = named()
        while not satisfied(indices) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            indices = named()
        timed_out = not satisfied(indices)
        found = indices or []
        active = sum(index.shards for index in found if index.active)
        body = {
            "cluster_name": "cbir", "status": "red" if indices is None else _health(found), "timed_out": timed_out,
            "number_of_nodes": 1, "number_of_data_nodes": 1,
            "active_primary_shards": active, "active_shards": active, "relocating_shards": 0,
            "initializing_shards": sum(index.shards for index in found if not index.active),
            "unassigned_shards": sum(index.shards * index.replicas for index in found),
            "delayed_unassigned_shards": 0, "number_of_pending_tasks": 0, "number_of_in_flight_fetch": 0,
            "task_max_waiting_in_queue_millis": 0,
        }  # fmt: skip
        return _json(body, status=408 if timed_out else 200)


HEALTH_RANK = {"green": 0, "yellow": 1, "red": 2}


def _health(indices: list[Index]) -> str:
    if any(not index.active for index in indices):
        return "red"  # a primary is not active
    return "yellow" if any(index.replicas for index in indices) else "green"  # one node: replicas never assign


TIME_UNITS = {"nanos": 1e-9, "micros": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _seconds(value: Any, setting: str = "timeout", *, allow_minus_one: bool = False) -> float:
    """TimeValue.parseTimeValue: a number with its unit, or 0 or (where allowed) -1 alone."""
    text = str(value).strip()
    if text == "0" or (allow_minus_one and text == "-1"):
        return float(text)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(nanos|micros|ms|s|m|h|d)", text)
    if match is None:
        raise illegal_argument(f"failed to parse setting [{setting}] with value [{text}] as a time value: unit is "
                               "missing or unrecognized")  # fmt: skip
    return float(match.group(1)) * TIME_UNITS[match.group(2)]


class ShardError(EsError):
    """An error a shard raises while it searches: reported as a shard failure, not at the top level."""


Hit = tuple[Index, str, float]  # a matching document: its index, its id, its score


def all_shards_failed(phase: str, failures: dict[tuple[str, int], tuple[Index, dict[str, Any]]], *,
                      status: int | None = None) -> EsError:  # fmt: skip
    """`search_phase_execution_exception` "all shards failed": the same failure of many shards grouped into
    one entry (`grouped: true`), caused by the first one's root cause, the status that of the cause (503 when no
    shard copy was available) (AbstractSearchAsyncAction.executeNextPhase, SearchPhaseExecutionException)."""
    grouped: dict[str, tuple[Index, int, dict[str, Any]]] = {}
    for (_, shard), (index, error) in sorted(failures.items()):
        grouped.setdefault(json.dumps(error, sort_keys=True), (index, shard, error))
    first = next(iter(grouped.values()))[2]
    if status is None:
        status = {"circuit_breaking_exception": 429, "illegal_argument_exception": 400}.get(first["type"], 503)
    error = EsError(status, "search_phase_execution_exception", "all shards failed", phase=phase, grouped=True,
                    failed_shards=[_shard_failure(index, shard, e) for index, shard, e in grouped.values()],
                    caused_by={k: v for k, v in first.items() if k != "caused_by"})  # fmt: skip
    error.root_causes = [{k: v for k, v in e.items() if k != "caused_by"} for _, _, e in grouped.values()]
    return error


def _shard_failure(index: Index, shard: int, error: dict[str, Any]) -> dict[str, Any]:
    """ShardSearchFailure as the REST layer writes it."""
    return {"shard": shard, "index": index.name, "node": NODE_ID, "reason": error}


def _ranked(hits: list[Hit]) -> list[Hit]:
    """Best first; equal scores by index name and shard (the ShardId order of the search's shards), then Lucene doc
    id (the coordinating node's merge: Lucene TopDocs.merge)."""
    return sorted(hits, key=lambda hit: (-hit[2], hit[0].name, hit[0].shard_of(hit[1]), hit[0].doc_order[hit[1]]))


def _check_search_body(body: dict[str, Any]) -> None:
    for key in set(body) - SEARCH_KEYS:
        token = "START_OBJECT" if isinstance(body[key], dict) else "VALUE"
        raise parsing_error(f"Unknown key for a {token} in [{key}].")


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
    indexed = spec.get("index", True) not in (False, "false")
    options = spec.get("index_options")
    if options is not None and not indexed:
        raise mapping_error("Field [index_options] can only be specified for a field of type [dense_vector] when it "
                            "is indexed", "illegal_argument_exception")  # fmt: skip
    if options is None:
        # 8.14+ maps an indexed float vector as int8_hnsw unless told otherwise, and says so in its mapping.
        if indexed and spec.get("element_type", "float") == "float":
            spec["index_options"] = _index_options(name, {"type": "int8_hnsw"}, spec)
        return
    spec["index_options"] = _index_options(name, options, spec)


def _index_options(name: str, options: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """`options` checked as DenseVectorFieldMapper parses them, and written back as it serialises them (defaults
    filled in), so that GET _mapping answers what Elasticsearch answers."""
    if not isinstance(options, dict):
        raise mapping_error(f"class {_java_class(options)} cannot be cast to class java.util.Map",
                            "class_cast_exception")  # abridged: Java goes on to name the modules
    remaining = dict(options)
    kind = remaining.pop("type", None)
    if kind is None:
        raise mapping_error("[index_options] requires field [type] to be configured")
    kind = _java_str(kind)
    if kind not in INDEX_OPTION_TYPES:
        raise mapping_error(f"Unknown vector index options type [{kind}] for field [{name}]")
    parsed: dict[str, Any] = {"type": kind}
    for param in INDEX_OPTION_PARAMS[kind]:
        if param in remaining:
            value = remaining.pop(param)
            parsed[param] = (_rescore_vector(value) if param == "rescore_vector" else
                             _java_double(value) if param == "confidence_interval" else _java_int(value))
    if remaining:  # MappingParser.checkNoRemainingFields: two spaces, then " [key : value]" for each
        detail = "".join(f" [{key} : {_java_str(value)}]" for key, value in remaining.items())
        raise mapping_error(f"Mapping definition for [{name}] has unsupported parameters: {detail}")
    element_type = spec.get("element_type", "float")
    if kind in QUANTISED_TYPES and element_type != "float":
        raise mapping_error(f"[element_type] cannot be [{element_type}] when using index type [{kind}]",
                            "illegal_argument_exception")  # fmt: skip
    dims = spec["dims"]
    if kind in EVEN_DIMS_TYPES and dims % 2:
        raise mapping_error(f"{kind} only supports even dimensions; provided={dims}", "illegal_argument_exception")
    if kind in BBQ_TYPES and dims < BBQ_MIN_DIMS:
        raise mapping_error(f"{kind} does not support dimensions fewer than {BBQ_MIN_DIMS}; provided={dims}",
                            "illegal_argument_exception")  # fmt: skip
    if kind.endswith("hnsw"):
        parsed.setdefault("m", HNSW_DEFAULT_M)
        parsed.setdefault("ef_construction", HNSW_DEFAULT_EF_CONSTRUCTION)
    if kind.startswith("int4"):
        parsed.setdefault("confidence_interval", 0.0)  # int4's default: dynamic quantiles, always serialised
    if kind in BBQ_TYPES:
        parsed.setdefault("rescore_vector", {"oversample": BBQ_DEFAULT_OVERSAMPLE})
    order = ("type", "m", "ef_construction", "confidence_interval", "rescore_vector")  # as toXContent writes them
    return {key: parsed[key] for key in order if key in parsed}


def _rescore_vector(value: Any) -> dict[str, float]:
    """RescoreVector.fromIndexOptions: `oversample` 0 (off) or 1 to 10; other keys of the object are ignored."""
    if not isinstance(value, dict):
        raise mapping_error(f"[rescore_vector] should be a hash but was of type: class {_java_class(value)}",
                            "parse_exception")  # XContentMapValues.nodeMapValue
    if value.get("oversample") is None:
        raise mapping_error("Invalid rescore_vector value. Missing required field oversample",
                            "illegal_argument_exception")  # fmt: skip
    oversample = _java_double(value["oversample"])
    if oversample < 1 and oversample != 0:
        raise mapping_error("oversample must be greater than 1 or exactly 0", "illegal_argument_exception")
    if oversample > 10:
        raise mapping_error("oversample must be less than or equal to 10", "illegal_argument_exception")
    return {"oversample": oversample}


def _java_int(value: Any) -> int:
    """XContentMapValues.nodeIntegerValue: a number as it is, anything else through Integer.parseInt."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = _java_str(value)
    if re.fullmatch(r"[+-]?\d+", text) and -(2**31) <= int(text) < 2**31:
        return int(text)
    raise mapping_error(f'For input string: "{text}"', "number_format_exception")  # the double's wording for 16.5


def _java_double(value: Any) -> float:
    """XContentMapValues.nodeDoubleValue: a number as it is, anything else through Double.parseDouble."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return float(_java_str(value))
    except ValueError:
        raise mapping_error(f'For input string: "{_java_str(value)}"', "number_format_exception") from None


def _java_str(value: Any) -> str:
    """How Java's toString prints a parsed JSON value: true, 1, 0.9, {k=v}, [a, b]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}={_java_str(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_java_str(item) for item in value) + "]"
    return str(value)


def _java_class(value: Any) -> str:
    kinds = {bool: "java.lang.Boolean", int: "java.lang.Integer", float: "java.lang.Double", str: "java.lang.String",
             list: "java.util.ArrayList"}  # fmt: skip
    return kinds.get(type(value), "java.lang.Object")


def _alias_action(action: Any) -> tuple[str, list[str], list[str], dict[str, Any]]:
    """One action of an `_aliases` call as IndicesAliasesRequest.AliasActions parses it: its kind, indices, aliases
    and parameters; `must_exist` is for `remove` only (40_must_exist.yml, "Alias must_exist only on remove")."""
    if not isinstance(action, dict) or len(action) != 1:
        raise illegal_argument("Too many operations declared on operation entry")
    kind, spec = next(iter(action.items()))
    if kind not in ALIAS_ACTION_PARAMS:
        raise parsing_error(f"[alias_action] unknown field [{kind}]")
    if not isinstance(spec, dict):
        raise parsing_error(f"[{kind}] expected an object")
    for key in set(spec) - ALIAS_ACTION_PARAMS[kind]:
        raise parsing_error(f"[{kind}] unknown field [{key}]")
    if "must_exist" in spec and kind != "remove":
        raise illegal_argument(f"[must_exist] is unsupported for [{kind.upper()}]")
    def listed(one: str, many: str) -> list[Any]:  # `aliases: x` is `aliases: [x]` (a string array's one value)
        value = spec[one] if one in spec else spec.get(many) or []
        return [value] if isinstance(value, str) else list(value)

    names, wanted = listed("index", "indices"), listed("alias", "aliases")
    if not names:
        raise illegal_argument("One of [index] or [indices] is required")
    if kind != "remove_index" and not wanted:
        raise illegal_argument("One of [alias] or [aliases] is required")
    return kind, [str(name) for name in names], [str(alias) for alias in wanted], spec


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
    if op == "update":
        raise illegal_argument("the double does not implement bulk [update]")
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
        if spec["type"] in ("float", "double", "long", "integer") and not (
                value is None or (isinstance(value, int | float) and not isinstance(value, bool))):
            raise _parse_failure(name, spec, f"failed to parse field [{name}] of type [{spec['type']}]",
                                 "illegal_argument")
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
    """The searchable documents `query` matches, with their scores."""
    if not isinstance(query, dict) or len(query) != 1:
        raise parsing_error("[_na] query malformed, must start with start_object")
    kind, spec = next(iter(query.items()))
    if kind == "match_all":
        return dict.fromkeys(index.searchable, 1.0)
    if kind == "script_score":
        return _script_scores(index, spec)
    if kind == "bool":
        return _bool_matches(index, spec)
    if kind == "terms":
        return _terms_matches(index, spec)
    if kind == "term":
        return _term_matches(index, spec)
    if kind == "ids":
        if not isinstance(spec, dict) or set(spec) - {"values", "boost", "_name"}:
            raise parsing_error("[ids] query does not support the given fields")
        return dict.fromkeys((doc_id for doc_id in spec.get("values", []) if doc_id in index.searchable), 1.0)
    raise parsing_error(f"unknown query [{kind}]")


def _clauses(spec: Any) -> list[dict[str, Any]]:
    return spec if isinstance(spec, list) else [spec]


def _bool_matches(index: Index, spec: dict[str, Any]) -> dict[str, float]:
    """`filter` (all must match, no score) and `must_not` (none may): a filter-only bool scores 0."""
    for key in set(spec) - BOOL_KEYS:  # must and should exist too; the store sends neither
        raise parsing_error(f"[bool] query does not support [{key}] (the double runs filter and must_not only)")
    matched = set(index.searchable)
    for clause in _clauses(spec.get("filter", [])):
        matched &= set(_query_scores(index, clause))
    for clause in _clauses(spec.get("must_not", [])):
        matched -= set(_query_scores(index, clause))
    return dict.fromkeys(matched, 0.0)


def _terms_matches(index: Index, spec: dict[str, Any]) -> dict[str, float]:
    fields = [key for key in spec if key not in ("boost", "_name")]
    if len(fields) != 1:
        raise parsing_error("[terms] query does not support multiple fields")
    (field_name,) = fields
    values = spec[field_name]
    if not isinstance(values, list):
        raise parsing_error(f"[terms] query does not support [{field_name}]")
    if index.properties().get(field_name, {}).get("type") != "keyword":
        return {}  # an unmapped field matches nothing
    wanted = {str(value) for value in values}
    return {doc_id: 1.0 for doc_id, source in index.searchable.items()
            if source.get(field_name) is not None and str(source[field_name]) in wanted}  # null is never indexed


def _term_matches(index: Index, spec: dict[str, Any]) -> dict[str, float]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise parsing_error("[term] query doesn't support multiple fields, found [" + ", ".join(spec) + "]")
    ((field_name, value),) = spec.items()
    if isinstance(value, dict):
        value = value.get("value")
    if not isinstance(value, str | int | float | bool):
        raise parsing_error(f"[term] query does not support [{field_name}] with value [{value}]")
    return _terms_matches(index, {field_name: [value]})


def _sort_field(sort: Any) -> str:
    """The one keyword field of a `sort` the double runs: `[{"field": "asc"}]` or `["field"]`."""
    clauses = sort if isinstance(sort, list) else [sort]
    if len(clauses) != 1:
        raise parsing_error("the double sorts on one field")
    clause = clauses[0]
    name, order = (clause, "asc") if isinstance(clause, str) else next(iter(clause.items()))
    order = order.get("order", "asc") if isinstance(order, dict) else order
    if order != "asc":
        raise parsing_error("the double sorts ascending only")
    return str(name)


def _sorted_after(indices: list[Index], ranked: list[Hit], field_name: str, after: Any) -> list[Hit]:
    """Sorted by the field (documents without it last, as `missing: _last`), after the `search_after` value; each
    shard checks the field and the values (SortBuilder.buildSort, SearchAfterBuilder.buildFieldDoc)."""
    for index in indices:
        spec = index.properties().get(field_name)
        if spec is None:
            raise ShardError(400, "query_shard_exception", f"No mapping found for [{field_name}] in order to sort on")
        if spec.get("type") != "keyword" or spec.get("doc_values") is False:
            raise ShardError(400, "illegal_argument_exception",
                             f"Can't sort on field [{field_name}]; the double sorts keyword fields with doc values")

    def key(hit: Hit) -> tuple[bool, str]:
        value = hit[0].searchable[hit[1]].get(field_name)
        return value is None, "" if value is None else str(value)

    ordered = sorted(ranked, key=key)
    if after is None:
        return ordered
    if not isinstance(after, list) or len(after) != 1:
        count = len(after) if isinstance(after, list) else 1
        raise ShardError(400, "illegal_argument_exception", f"search_after has {count} value(s) but sort has 1.")
    return [hit for hit in ordered if key(hit) > (False, str(after[0]))]


def _aggregations(indices: list[Index], hits: list[Hit], aggregations: dict[str, Any]) -> dict[str, Any]:
    """`terms` (buckets by count, then key; `size`) and `missing` aggregations over the matched documents."""
    results: dict[str, Any] = {}
    for name, spec in aggregations.items():
        if not isinstance(spec, dict) or len(spec) != 1:
            raise parsing_error(f"Expected [START_OBJECT] under [{name}], the double runs one aggregation each")
        kind, params = next(iter(spec.items()))
        field_name = params.get("field")
        for index in indices:
            if index.properties().get(field_name, {}).get("type") != "keyword":
                raise illegal_argument(f"the double aggregates keyword fields, not [{field_name}]")
        values = [index.searchable[doc_id].get(field_name) for index, doc_id, _ in hits]
        if kind == "missing":
            results[name] = {"doc_count": sum(value is None for value in values)}
        elif kind == "terms":
            counts: dict[str, int] = {}
            for value in values:
                if value is not None:
                    counts[str(value)] = counts.get(str(value), 0) + 1
            ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            size = _int_param(params.get("size", 10), "size")
            results[name] = {"doc_count_error_upper_bound": 0,
                             "sum_other_doc_count": sum(count for _, count in ordered[size:]),
                             "buckets": [{"key": key, "doc_count": count} for key, count in ordered[:size]]}
        else:
            raise parsing_error(f"Unknown aggregation type [{kind}] (the double runs terms and missing)")
    return results


def _refresh_policy(request: web.Request) -> str:
    """The `refresh` parameter as WriteRequest.RefreshPolicy.parse reads it: true (also empty), false or wait_for."""
    value = request.query.get("refresh", "false")
    if value not in ("", "true", "false", "wait_for"):
        raise illegal_argument(f"Unknown value for refresh: [{value}].")
    return value or "true"


def _version_conflict(index: Index, doc_id: str) -> EsError:
    """A create of an id that exists (InternalEngine's VersionConflictEngineException)."""
    return EsError(409, "version_conflict_engine_exception",
                   f"[{doc_id}]: version conflict, document already exists (current version "
                   f"[{index.versions[doc_id]}])", index_uuid=index.uuid, shard=str(index.shard_of(doc_id)),
                   index=index.name)  # fmt: skip


def _shards_header(total: int, *, failed: int) -> dict[str, int]:
    return {"total": total, "successful": total - failed, "skipped": 0, "failed": failed}


def _unrecognized(path: str, unknown: list[str], allowed: frozenset[str]) -> str:
    """BaseRestHandler.unrecognized: each unknown parameter, with the allowed ones near it (Lucene's
    LevenshteinDistance above 0.5, nearest first) as "did you mean"."""
    parts = []
    for name in unknown:
        near = sorted(((1 - _edit_distance(name, candidate) / max(len(name), len(candidate)), candidate)
                       for candidate in allowed), key=lambda pair: (-pair[0], pair[1]))  # fmt: skip
        keys = [candidate for score, candidate in near if score > 0.5]
        hint = ""
        if len(keys) == 1:
            hint = f" -> did you mean [{keys[0]}]?"
        elif keys:
            hint = f" -> did you mean any of [{', '.join(keys)}]?"
        parts.append(f"[{name}]{hint}")
    return f"request [{path}] contains unrecognized parameter{'s' if len(unknown) > 1 else ''}: {', '.join(parts)}"


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, char_b in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (char_a != char_b))
    return row[-1]


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
    for doc_id, score in scores.items():
        if score < 0 or np.isnan(score):  # a zero query vector makes every cosine NaN
            raise ShardError(400, "illegal_argument_exception",
                             f"script_score script returned an invalid score [{_java_float(score)}] for doc "
                             f"[{index.doc_order[doc_id]}]. Must be a non-negative score!")  # fmt: skip
    return scores


def _script_error(reason: str, source: str | None, cause: str, cause_reason: str) -> EsError:
    return EsError(400, "script_exception", reason, script=source, lang="painless",
                   caused_by={"type": cause, "reason": cause_reason})  # fmt: skip


def _knn_request(knn: Any, size: int) -> dict[str, Any]:
    """A top-level `knn` as KnnSearchBuilder.Builder.build completes it (8.13+): `k` defaults to the search's size,
    `num_candidates` to round(min(1.5 × k, 10,000)); both then checked as its constructor checks them."""
    if not isinstance(knn, dict):
        raise parsing_error("[knn] must be an object (the double takes one knn clause)")
    for key in set(knn) - KNN_KEYS:
        raise parsing_error(f"[knn] unknown field [{key}]")
    for required in ("field", "query_vector"):
        if required not in knn:
            raise illegal_argument(f"[knn] requires [{required}]")
    k = _int_param(knn.get("k", size), "k")
    default_candidates = math.floor(min(MAX_NUM_CANDIDATES, 1.5 * k) + 0.5)  # Java's Math.round
    candidates = _int_param(knn.get("num_candidates", default_candidates), "num_candidates")
    if k < 1:
        raise illegal_argument("[k] must be greater than 0")
    if candidates < k:
        raise illegal_argument("[num_candidates] cannot be less than [k]")
    if candidates > MAX_NUM_CANDIDATES:
        raise illegal_argument(f"[num_candidates] cannot exceed [{MAX_NUM_CANDIDATES}]")
    return {**knn, "k": k, "num_candidates": candidates}


def _knn_scores(index: Index, knn: dict[str, Any], shards: list[int]) -> dict[str, float]:
    """Top-level kNN (`knn` completed by `_knn_request`) on one index: each shard's approximate search keeps its
    best `k` of `num_candidates`, and of those the best `k` are kept."""
    k, candidates = knn["k"], knn["num_candidates"]
    spec = index.properties().get(knn["field"])
    if spec is not None and spec.get("type") == "dense_vector" and not spec.get("index", True):
        raise illegal_argument(
            f"to perform knn search on field [{knn['field']}], its mapping must have [index] set to [true]"
        )
    _field_vectors(index, knn["field"], knn["query_vector"], [])  # the field and the query's dims
    query = np.asarray(knn["query_vector"], dtype=np.float32)
    if spec.get("similarity", "cosine") == "cosine" and not np.any(query):
        preview = ", ".join(_java_float(v) for v in knn["query_vector"][:5])
        raise ShardError(400, "illegal_argument_exception",
                         "The [cosine] similarity does not support vectors with zero magnitude. Preview of invalid "
                         f"vector: [{preview}{', ...' if len(knn['query_vector']) >= 5 else ''}]")  # fmt: skip
    passing = set(index.searchable)
    for clause in _clauses(knn.get("filter", [])):
        passing &= set(_query_scores(index, clause))
    unit = query / np.linalg.norm(query)
    # A flat type has no graph: each shard compares every vector (ES813FlatVectorFormat and its quantised kin).
    flat = spec.get("index_options", {}).get("type", "").endswith("flat")
    merged: dict[str, float] = {}
    for shard in shards:
        graph = _shard_graph(index, knn["field"], shard)
        if graph is None:
            continue
        accept = np.asarray([doc_id in passing for doc_id in graph.ids], dtype=bool)
        found = [int(row) for row in np.flatnonzero(accept)] if flat else graph.search(unit, candidates, accept)
        # Lucene's cosine similarity score: (1 + cos) / 2, always in [0, 1].
        scores = {graph.ids[row]: _as_float32((1.0 + _cosine(knn["query_vector"], graph.vectors[row])) / 2.0)
                  for row in found}  # fmt: skip
        merged.update((doc_id, score) for _, doc_id, score in _ranked([(index, d, v) for d, v in scores.items()])[:k])
    return {doc_id: score for _, doc_id, score in _ranked([(index, d, v) for d, v in merged.items()])[:k]}


def _shard_graph(index: Index, field_name: str, shard: int) -> ShardGraph | None:
    """The graph of one shard's searchable vectors, built once per refresh."""
    key = (field_name, shard)
    if key not in index.graphs:
        ids = sorted((doc_id for doc_id in index.searchable if index.shard_of(doc_id) == shard),
                     key=index.doc_order.__getitem__)  # fmt: skip
        if not ids:
            return None
        vectors = np.asarray([index.searchable[doc_id][field_name] for doc_id in ids], dtype=np.float32)
        index.graphs[key] = ShardGraph.build(ids, vectors)
    return index.graphs[key]


def _java_float(value: float) -> str:
    """How Java prints a float: NaN, Infinity, 0.0."""
    if np.isnan(value):
        return "NaN"
    if np.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(float(value))


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
    with np.errstate(invalid="ignore", divide="ignore"):  # a zero vector: NaN, as Painless computes it
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
    return _loads(text)


def _loads(text: str) -> dict[str, Any]:
    """A JSON object as Elasticsearch's parser reads it: NaN and Infinity are not JSON, and refused."""

    def non_numeric(token: str) -> float:
        raise EsError(400, "x_content_parse_exception", f"[1:1] Non-standard token '{token}': enable "
                      "`JsonReadFeature.ALLOW_NON_NUMERIC_NUMBERS` to allow")  # fmt: skip

    try:
        body = json.loads(text, parse_constant=non_numeric)
    except json.JSONDecodeError as exc:
        raise EsError(400, "x_content_parse_exception", f"[1:1] Unexpected character: {exc}") from exc
    if not isinstance(body, dict):
        raise parsing_error("request body must be an object")
    return body


def _json(body: Any, *, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, headers={"Content-Type": JSON_TYPE})
