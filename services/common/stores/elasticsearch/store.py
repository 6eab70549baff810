"""The cluster store: image documents in one Elasticsearch index, searched exactly
(`script_score` over every vector) or approximately (HNSW `knn`), scored like the FAISS store.

Indices are versioned: `cbir-images-<model version>` behind the alias `cbir-images` (`CBIR_ES_INDEX`).
A store resolves the alias once, when it opens, and reads and writes that concrete index from then on, so
a service never writes one model's vectors into another's index. `cbir index --rebuild` opens the index of
its own model version (`versioned=True`) without touching the alias; `cbir promote VERSION` carries the
uploads over and moves the alias in one atomic `_aliases` call (`promote`); a service whose index is no
longer the one behind the alias finds out within `VERIFY_EVERY_S` (`verify`) and answers 409 from then on
if its model is not the new index's. An index created before aliases (a concrete index named like the
alias) is moved behind one: `_reindex` into its versioned name, then one `_aliases` call that removes it
and adds the alias.

Elasticsearch does the sharding, replication and persistence; this module only states the
mapping, writes through the bulk helper, and turns every client error into a `CbirError`
(`_translated`): a missing index is `IndexNotReadyError`, refused credentials `StoreAuthError`,
an unreachable or overloaded cluster `StoreUnavailableError`.

What a real cluster does that a single process would not, and what the store does about it:

- **Partial results.** A search some shards fail still answers 200, with `_shards.failed` and
  the other shards' hits; one that ran past its `timeout` answers `timed_out: true`. The product
  promises exact rankings, so either is `StoreUnavailableError` (503 with Retry-After at the HTTP
  edge) naming how many shards failed and the first reasons, never a shorter list of hits.
- **Bad query vectors.** A zero, NaN or wrong-size vector is refused before anything is sent
  (`check_query_vector`); Elasticsearch would answer 400 (cosine of a zero vector), or the JSON
  would not even parse (NaN).
- **A fresh index.** The primaries of a new 30-shard index take a while to start, and until
  they have, bulk items fail with 503 `unavailable_shards_exception`: after creating the index
  the store waits for `_cluster/health?wait_for_status=yellow`, and retries 503 items (as the
  bulk helper retries 429s) with the same backoff.
- **Ties.** Elasticsearch orders equal scores by shard, then by Lucene doc id within the shard,
  so documents with the same score may come in another order than FAISS gives them; the scores
  and the set of hits at each score are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, get_args

import numpy as np
from elasticsearch import (
    ApiError,
    AsyncElasticsearch,
    AuthenticationException,
    AuthorizationException,
    BadRequestError,
    ConflictError,
    ConnectionTimeout,
    NotFoundError,
    TransportError,
    UnsupportedProductError,
)
from elasticsearch.helpers import async_streaming_bulk

from services.common.documents import DOCUMENT_SCHEMA, ImageDocument, StoredImage, StoreHit
from services.common.errors import (
    BulkWriteError,
    CbirError,
    ConfigError,
    IndexNotReadyError,
    StoreAuthError,
    StoreError,
    StoreMismatchError,
    StoreUnavailableError,
)
from services.common.scoring import ES_SCRIPT_SOURCE, score_from_es_knn
from services.common.settings import EsSearchMode, StoreSettings, default
from services.common.stores.base import (
    CollectionStats,
    StoreInfo,
    StoreQuery,
    VectorStore,
    check_compatible,
    check_query_vector,
)

logger = logging.getLogger(__name__)

VECTOR_FIELD = "features"  # ES_SCRIPT_SOURCE names this field too
STORED_FIELDS = [field.name for field in dataclasses.fields(StoredImage)]  # every field but the vector

BULK_CHUNK = 500  # documents per _bulk request: ~0.5 MB with 74-dim vectors
MGET_CHUNK = 1000  # ids per _mget request of the resume check
SCAN_PAGE = 1000  # documents per search_after page when listing documents
STATS_BUCKETS = 10_000  # most sources / labels /collection counts (terms aggregation size)
MAX_RESULT_WINDOW = 10_000  # index.max_result_window, and the ceiling of knn num_candidates
MAX_BACKOFF_S = 60.0
FAILURES_SHOWN = 10  # failed ids spelled out in an error message; all are on `.failures`
SHARD_REASONS_SHOWN = 3  # distinct shard failure reasons spelled out for a partial search
PRIMARIES_WAIT_S = 30  # how long a new index's primaries may take to start (the create API's own default)

# Statuses that mean "not now" rather than "never": the caller may retry later (503).
UNAVAILABLE_STATUSES = frozenset({429, 502, 503, 504})
API_KEY_SETTING = "CBIR_ES_API_KEY"
BASIC_AUTH_SETTINGS = "CBIR_ES_USERNAME/CBIR_ES_PASSWORD"
INDEX_OPTIONS_SETTING = "CBIR_ES_INDEX_OPTIONS"
# The dense_vector index_options types CBIR_ES_INDEX_OPTIONS may name: every type of Elasticsearch 8.19 but int4_hnsw
# and int4_flat, which need an even number of dims (CBIR_PCA_DIMS does not promise one).
INDEX_OPTIONS: tuple[str, ...] = get_args(StoreSettings.model_fields["es_index_options"].annotation)
BBQ_MIN_DIMS = 64  # DenseVectorFieldMapper.BBQ_MIN_DIMS: bbq_hnsw and bbq_flat refuse fewer dims
# Quantised vectors are compared approximately; `rescore_vector` has each shard rescore its best k × oversample
# candidates with the float vectors, so the hits and their scores are the float cosine's again. Elastic's kNN guide:
# int8 needs "minimal if any" rescoring, bbq 3-5x oversampling, more "for fewer dimensions" (ours are 74).
RESCORE_OVERSAMPLE = {"int8": 2.0, "bbq": 5.0}


def versioned_index(alias: str, model_version: str) -> str:
    """The concrete index of a model version behind `alias`: lower case, no character an index name refuses."""
    return f"{alias}-{re.sub(r'[^a-z0-9._-]', '-', model_version.lower())}"


class ElasticsearchStore(VectorStore):
    """One Elasticsearch index of `ImageDocument`s, searched by cosine similarity.

    >>> store = ElasticsearchStore.from_settings(StoreSettings())
    >>> await store.open(dims=74, model_version="abc")
    >>> await store.upsert(documents); await store.flush()
    >>> hits = await store.search(query_vector, k=10)
    >>> await store.close()

    Writes become visible to `count` and `search` after `flush` (an index refresh); `get` and
    `existing_ids` see them at once.
    """

    name = "elasticsearch"

    @property
    def index_kind(self) -> str:
        """`exact` (script_score over every vector) or `knn` (each shard's HNSW graph)."""
        return self.search_mode.value

    def __init__(
        self,
        client: AsyncElasticsearch,
        *,
        index: str,
        url: str,
        shards: int = default(StoreSettings, "es_shards"),
        replicas: int = default(StoreSettings, "es_replicas"),
        search_mode: EsSearchMode = default(StoreSettings, "es_search_mode"),
        num_candidates: int = default(StoreSettings, "es_num_candidates"),
        index_options: str = default(StoreSettings, "es_index_options"),
        max_retries: int = default(StoreSettings, "es_max_retries"),
        initial_backoff_s: float = 1.0,
        credentials_from: str | None = None,
        versioned: bool = False,
    ) -> None:
        self._client = client
        self.alias = index
        self.index = index  # what requests name: the concrete index once open
        self.versioned = versioned  # open the index of the model version given, beside the served one
        self.url = url  # for messages only: never holds credentials
        self.credentials_from = credentials_from  # the settings naming the credentials, for messages
        self.shards = shards
        self.replicas = replicas
        self.search_mode = EsSearchMode(search_mode)
        self.num_candidates = num_candidates
        if index_options not in INDEX_OPTIONS:
            raise ConfigError(f"{INDEX_OPTIONS_SETTING} {index_options!r} is not one of: {', '.join(INDEX_OPTIONS)}")
        self.index_options = index_options  # of an index this store creates; an existing one keeps its own
        self.max_retries = max_retries
        self.initial_backoff_s = initial_backoff_s
        self._dims: int | None = None
        self._model_version: str | None = None

    @classmethod
    def from_settings(
        cls, settings: StoreSettings, *, initial_backoff_s: float = 1.0, versioned: bool = False
    ) -> ElasticsearchStore:
        """A store with its own `AsyncElasticsearch` client, configured from `CBIR_ES_*`."""
        url = settings.es_url
        auth: dict[str, Any] = {}
        credentials_from = None
        if settings.es_api_key is not None:
            auth["api_key"] = settings.es_api_key.get_secret_value()
            credentials_from = API_KEY_SETTING
        elif settings.es_username is not None:
            password = settings.es_password.get_secret_value() if settings.es_password else ""
            auth["basic_auth"] = (settings.es_username, password)
            credentials_from = BASIC_AUTH_SETTINGS
        client = AsyncElasticsearch(
            hosts=[str(url)],
            request_timeout=settings.es_timeout_s,
            retry_on_timeout=True,
            max_retries=settings.es_max_retries,
            # 429s are left to the bulk helper, which backs off; the transport would not.
            retry_on_status=(502, 503, 504),
            **auth,
        )
        return cls(
            client,
            index=settings.es_index,
            url=f"{url.scheme}://{url.host}:{url.port}{(url.path or '').rstrip('/')}",
            shards=settings.es_shards,
            replicas=settings.es_replicas,
            search_mode=settings.es_search_mode,
            num_candidates=settings.es_num_candidates,
            index_options=settings.es_index_options,
            max_retries=settings.es_max_retries,
            initial_backoff_s=initial_backoff_s,
            credentials_from=credentials_from,
            versioned=versioned,
        )

    # -- the index ----------------------------------------------------------------------------

    async def open(self, *, dims: int, model_version: str, create: bool = True) -> None:
        """Resolve the index to use (the alias's, or with `versioned` the model version's), create it if needed
        and allowed (behind the alias when no index is served yet), then check it matches."""
        self.index = await self._target(model_version)
        mapping = await self._read_mapping()
        if mapping is None:
            if not create:
                raise self._not_ready()
            if await self._create_index(dims=dims, model_version=model_version, serve=await self._nothing_served()):
                self._dims, self._model_version = dims, model_version
                return
            mapping = await self._read_mapping()  # another process created it first
            if mapping is None:
                raise IndexNotReadyError(f"{self._where} was created and deleted while opening it")
        _check_vector_mapping(mapping, where=self._where)
        info = await self._info_from(mapping)
        check_compatible(info, dims=dims, model_version=model_version, where=self._where)
        vector = mapping["properties"][VECTOR_FIELD]
        self._note_index_options(vector)
        if info.model_version != model_version or info.schema != DOCUMENT_SCHEMA:
            # An empty index left by another model or schema: claim it, as the FAISS store does (adding the
            # fields this schema has is a mapping update Elasticsearch allows). Its vectors keep their index_options.
            mappings = self._index_body(dims=dims, model_version=model_version)["mappings"]
            with self._translated("recording the model version"):
                await self._client.indices.put_mapping(
                    index=self.index, meta=mappings["_meta"],
                    properties={**mappings["properties"], VECTOR_FIELD: vector},
                )  # fmt: skip
        self._dims, self._model_version = dims, model_version

    async def _target(self, model_version: str) -> str:
        if self.versioned:
            return versioned_index(self.alias, model_version)
        served = await self._alias_target()
        if served is not None:
            return served
        if await self._exists(self.alias):  # an index from before aliases
            return await self._move_behind_alias()
        return versioned_index(self.alias, model_version)

    async def served_index(self) -> str | None:
        """The concrete index the alias serves now (None: none yet)."""
        return await self._alias_target()

    async def _alias_target(self) -> str | None:
        """The concrete index behind the alias, None when there is no such alias."""
        with self._translated("resolving the alias"):
            response = await self._client.options(ignore_status=404).indices.get_alias(name=self.alias)
        if response.meta.status == 404:
            return None
        targets = sorted(response.body)
        if len(targets) != 1:
            raise StoreError(f"the alias {self.alias!r} at {self.url} points at {len(targets)} indices "
                             f"({', '.join(targets)}); point it at one (POST /_aliases)")
        return targets[0]

    async def _exists(self, name: str) -> bool:
        with self._translated("checking the index"):
            return bool(await self._client.indices.exists(index=name))

    async def _nothing_served(self) -> bool:
        return await self._alias_target() is None and not await self._exists(self.alias)

    async def _move_behind_alias(self) -> str:
        """Move the concrete index named like the alias to its versioned name, behind the alias: `_reindex`
        into a copy with its mapping, then one atomic `_aliases` call (add the alias, remove the old index)."""
        self.index = self.alias
        mapping = await self._read_mapping()
        version = (mapping or {}).get("_meta", {}).get("model_version") or "unversioned"
        target = versioned_index(self.alias, version)
        with self._translated(f"moving index {self.alias!r} behind an alias"):
            await self._client.options(ignore_status=400).indices.create(
                index=target, settings={"number_of_shards": self.shards, "number_of_replicas": self.replicas},
                mappings=mapping or {})
            await self._wait_for_primaries(target)
            await self._client.reindex(source={"index": self.alias}, dest={"index": target}, refresh=True,
                                       wait_for_completion=True)
            await self._client.indices.update_aliases(actions=[{"add": {"index": target, "alias": self.alias}},
                                                               {"remove_index": {"index": self.alias}}])
        logger.info("moved index %r to %r behind the alias %r", self.alias, target, self.alias)
        return target

    async def verify(self, model_version: str) -> None:
        """Raise `StoreMismatchError` when the alias has moved to an index of another model version than
        `model_version` (after `cbir promote`): this service must not go on searching the old index as if
        it were the served one. A move to an index of the same version is followed."""
        if self.versioned:
            return
        served = await self._alias_target()
        if served is None or served == self.index:
            return
        with self._translated("reading the served index's mapping"):
            response = await self._client.indices.get_mapping(index=served)
        served_version = next(iter(response.body.values()))["mappings"].get("_meta", {}).get("model_version")
        if served_version != model_version:
            raise StoreMismatchError(
                f"the alias {self.alias!r} now points at {served!r}, built by model version {served_version!r}; "
                f"this service's model is {model_version!r}: restart it with the model of {served_version!r}")
        logger.info("the alias %r moved to %r (the same model version); following it", self.alias, served)
        self.index = served

    async def promote(self, carry_over: Callable[[ElasticsearchStore], Awaitable[object]]) -> str | None:
        """Serve this (open, versioned) index: `carry_over(served)` first brings it up to date with the index
        the alias points at now, then one `_aliases` call moves the alias here. Returns the index served before."""
        served = await self._alias_target()
        if served == self.index:
            return served
        if served is not None:
            previous = ElasticsearchStore(self._client, index=served, url=self.url, shards=self.shards,
                                          replicas=self.replicas, credentials_from=self.credentials_from)
            await carry_over(previous)
            await self.flush()
        actions = ([{"remove": {"index": served, "alias": self.alias}}] if served is not None else []) + [
            {"add": {"index": self.index, "alias": self.alias}}]
        with self._translated("moving the alias"):
            await self._client.indices.update_aliases(actions=actions)
        logger.info("the alias %r now points at %r (was %r)", self.alias, self.index, served)
        return served

    async def info(self) -> StoreInfo:
        mapping = await self._read_mapping()
        if mapping is None:
            return StoreInfo(dims=None, model_version=None, count=0)
        return await self._info_from(mapping)

    async def flush(self) -> None:
        with self._translated("refreshing the index"):
            await self._client.indices.refresh(index=self.index)

    async def reset(self) -> None:
        """Delete the index, and create it empty again when the store is open.

        Before `open` this only deletes, so `reset(); open(...)` rebuilds for a new model.
        """
        target = await self._alias_target()
        if self.index == self.alias and target is not None:  # not open yet: the index the alias serves
            self.index = target
        served = target == self.index
        with self._translated("deleting the index"):
            await self._client.options(ignore_status=404).indices.delete(index=self.index)
        logger.info("deleted %s", self._where)
        if self._dims is not None and self._model_version is not None:
            await self._create_index(dims=self._dims, model_version=self._model_version, serve=served)

    async def close(self) -> None:
        await self._client.close()

    # -- documents ----------------------------------------------------------------------------

    async def upsert(self, documents: Sequence[ImageDocument]) -> None:
        if not documents:
            return
        model_version = self._require_open()
        for doc in documents:
            if doc.model_version != model_version:
                raise StoreMismatchError(
                    f"document {doc.id} is from model {doc.model_version!r}, "
                    f"the index holds {model_version!r}"
                )
        items = await self._bulk((self._index_action(doc) for doc in documents), "indexing")
        failures = {item["_id"]: _reason(item) for item in items if not _ok(item)}
        if failures:
            raise BulkWriteError(
                f"{self._where} refused {len(failures)} of {len(documents)} documents: "
                + _summary(failures),
                failures=failures,
            )

    async def delete(self, ids: Sequence[str]) -> int:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return 0
        actions = ({"_op_type": "delete", "_index": self.index, "_id": i} for i in unique)
        items = await self._bulk(actions, "deleting documents")
        # A delete of a missing document answers 404 "not_found": not an error, just not counted.
        failures = {
            item["_id"]: _reason(item)
            for item in items
            if not _ok(item) and item.get("result") != "not_found"
        }
        if failures:
            raise BulkWriteError(
                f"{self._where} failed to delete {len(failures)} documents: " + _summary(failures),
                failures=failures,
            )
        return sum(item.get("result") == "deleted" for item in items)

    async def add(self, document: ImageDocument) -> bool:
        """`op_type=create` with `refresh=wait_for`: of two concurrent adds of one id, Elasticsearch stores
        the first and answers the second 409, and the answer comes once a search can find the document
        (its translog is fsynced per request by default, so it is durable too)."""
        if document.model_version != self._require_open():
            raise StoreMismatchError(f"document {document.id} is from model {document.model_version!r}, "
                                     f"the index holds {self._model_version!r}")
        action = self._index_action(document)
        with self._translated("adding a document"):
            try:
                await self._client.create(index=self.index, id=document.id, document=action["_source"],
                                          refresh="wait_for")
            except ConflictError:
                return False
        return True

    async def remove(self, id: str) -> bool:
        """Delete from this index, and from the other versioned indices behind the alias (a rebuild's index
        being built), so that a deletion made during a rebuild is not undone by the promotion."""
        existed = await self._remove_from(self.index, id)
        with self._translated("listing the versioned indices"):
            response = await self._client.indices.get_alias(index=f"{self.alias}-*")
        for other in sorted(set(response.body) - {self.index}):
            await self._remove_from(other, id)
        return existed

    async def _remove_from(self, index: str, id: str) -> bool:
        with self._translated("deleting a document"):
            try:
                await self._client.delete(index=index, id=id, refresh="wait_for")
            except NotFoundError as exc:
                if isinstance(exc.body, dict) and exc.body.get("result") == "not_found":
                    return False
                raise
        return True

    async def count(self) -> int:
        with self._translated("counting documents"):
            response = await self._client.count(index=self.index)
        return int(response["count"])

    async def get(self, id: str) -> StoredImage | None:
        with self._translated("reading a document"):
            try:
                response = await self._client.get(
                    index=self.index, id=id, source_includes=STORED_FIELDS
                )
            except NotFoundError as exc:
                if isinstance(exc.body, dict) and exc.body.get("found") is False:  # no such document
                    return None
                raise
        return _stored(response["_source"])

    async def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {doc["_id"]: np.asarray(doc["_source"][VECTOR_FIELD], dtype=np.float32)
                async for doc in self._found(ids, "reading vectors", source_includes=[VECTOR_FIELD])}

    async def _found(self, ids: Sequence[str], doing: str, **source: Any) -> AsyncIterator[dict[str, Any]]:
        """The stored ones of `ids` (`_mget` in chunks, each doc checked for errors), with `source` as asked."""
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), MGET_CHUNK):
            with self._translated(doing):
                response = await self._client.mget(index=self.index, ids=unique[start:start + MGET_CHUNK], **source)
            for doc in response["docs"]:
                if _error_type(doc) == "index_not_found_exception":
                    raise self._not_ready()
                if "error" in doc:
                    raise StoreError(f"{self._where} could not look up {doc['_id']}: {_reason(doc)}")
                if doc.get("found"):
                    yield doc

    async def iter_documents(self, *, source: str | None = None) -> AsyncIterator[StoredImage]:
        """Pages of `SCAN_PAGE` documents sorted by id, each after the last id of the one before
        (`search_after`): no scroll context to keep open between pages."""
        query = {"term": {"source": source}} if source is not None else {"match_all": {}}
        after: list[str] | None = None
        while True:
            page: dict[str, Any] = {"query": query, "size": SCAN_PAGE, "sort": [{"id": "asc"}],
                                    "_source": STORED_FIELDS}
            if after is not None:
                page["search_after"] = after
            with self._translated("listing documents"):
                response = await self._client.search(index=self.index, **page)
            self._check_search_answer(response.body, "listing documents")
            hits = response["hits"]["hits"]
            for hit in hits:
                yield _stored(hit["_source"])
            if len(hits) < SCAN_PAGE:
                return
            after = hits[-1]["sort"]

    async def stats(self) -> CollectionStats:
        aggregations = {"sources": {"terms": {"field": "source", "size": STATS_BUCKETS}},
                        "labels": {"terms": {"field": "label", "size": STATS_BUCKETS}},
                        "unlabelled": {"missing": {"field": "label"}}}
        with self._translated("counting documents by source and label"):
            response = await self._client.search(index=self.index, size=0, aggs=aggregations, track_total_hits=True)
        self._check_search_answer(response.body, "counting documents by source and label")
        found = response["aggregations"]
        return CollectionStats(
            documents=int(response["hits"]["total"]["value"]),
            sources={bucket["key"]: bucket["doc_count"] for bucket in found["sources"]["buckets"]},
            labels=dict(sorted((bucket["key"], bucket["doc_count"]) for bucket in found["labels"]["buckets"])),
            unlabelled=int(found["unlabelled"]["doc_count"]),
        )

    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        return {doc["_id"] async for doc in self._found(ids, "checking which documents exist", source=False)}

    async def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        """Every query in one `_msearch` request; each answer checked for errors and partial results.

        Exact mode ranks the documents that pass the filter with `script_score`; kNN mode asks each
        shard for `num_candidates` candidates among them and keeps the best `offset + k`, of which
        `from`/`size` take the page, so deep pages need `CBIR_ES_NUM_CANDIDATES` to grow with them.
        """
        for query in queries:
            check_query_vector(query.vector, dims=self._dims, where=self._where)
        sent = [position for position, query in enumerate(queries) if _window(query) > 0]
        results: list[list[StoreHit]] = [[] for _ in queries]
        if not sent:
            return results
        searches: list[dict[str, Any]] = []
        for position in sent:
            searches += [{}, self._search_body(queries[position])]
        doing = f"searching ({self.search_mode.value}, {len(sent)} queries)"
        with self._translated(doing):
            response = await self._client.msearch(index=self.index, searches=searches)
        to_score = score_from_es_knn if self.search_mode is EsSearchMode.knn else float
        for position, answer in zip(sent, response["responses"], strict=True):
            self._check_search_answer(answer, doing)
            results[position] = [StoreHit(_stored(hit["_source"]), to_score(hit["_score"]))
                                 for hit in answer["hits"]["hits"]]
        return results

    def _search_body(self, query: StoreQuery) -> dict[str, Any]:
        """The `_msearch` body of one query in the configured mode (`ES_SCRIPT_SOURCE` already scores on
        the service's scale; kNN's `(1 + cos) / 2` is converted back by `score_from_es_knn`)."""
        size = _window(query)
        vector = np.asarray(query.vector, dtype=np.float32).ravel().tolist()
        page = {"from": query.offset, "size": size, "_source": STORED_FIELDS}
        allowed = _filter(query)
        if self.search_mode is EsSearchMode.knn:
            depth = query.offset + size
            knn: dict[str, Any] = {
                "field": VECTOR_FIELD,
                "query_vector": vector,
                "k": depth,
                "num_candidates": min(max(depth, self.num_candidates), MAX_RESULT_WINDOW),
            }
            if allowed is not None:
                knn["filter"] = allowed  # applied during the graph search, not after it
            return {"knn": knn, **page}
        script_score = {
            "query": allowed or {"match_all": {}},
            "script": {"source": ES_SCRIPT_SOURCE, "params": {"query_vector": vector}},
        }
        return {"query": {"script_score": script_score}, **page}

    def _check_search_answer(self, answer: dict[str, Any], doing: str) -> None:
        """Raise for an `_msearch` item that is an error, or that holds the hits of only some shards."""
        if "error" in answer:
            status = int(answer.get("status", 500))
            if _error_type(answer) == "index_not_found_exception":
                raise self._not_ready()
            detail = f"{status} {_reason(answer)}"
            if status in UNAVAILABLE_STATUSES:
                raise StoreUnavailableError(
                    f"Elasticsearch at {self.url} is overloaded or down while {doing} ({detail})"
                )
            raise StoreError(f"{self._where} refused {doing}: {detail}")
        shards = answer.get("_shards", {})
        failed = int(shards.get("failed", 0))
        if failed or answer.get("timed_out"):
            raise StoreUnavailableError(self._partial_message(shards, timed_out=bool(answer.get("timed_out"))))

    def _partial_message(self, shards: dict[str, Any], *, timed_out: bool) -> str:
        total, failed = shards.get("total", "?"), int(shards.get("failed", 0))
        parts = []
        if failed:
            reasons = list(dict.fromkeys(
                f"shard {failure.get('shard')}: {_reason({'error': failure.get('reason')})}"
                for failure in shards.get("failures", [])
            ))  # fmt: skip
            shown = "; ".join(reasons[:SHARD_REASONS_SHOWN]) + ("; ..." if len(reasons) > SHARD_REASONS_SHOWN else "")
            parts.append(f"{failed} of {total} shards failed" + (f" ({shown})" if shown else ""))
        if timed_out:
            parts.append("the search timed out before every shard answered")
        return (f"{self._where} answered with partial results: {' and '.join(parts)}; "
                "not serving an incomplete ranking, retry shortly")  # fmt: skip

    # -- helpers ------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"Elasticsearch index {self.index!r} at {self.url}"

    def _not_ready(self) -> IndexNotReadyError:
        if self.versioned:
            return IndexNotReadyError(f"there is no {self._where}; build it with `cbir index --rebuild`")
        return IndexNotReadyError(f"there is no Elasticsearch index {self.alias!r} at {self.url} (nor an alias of "
                                  "that name); build one with `cbir index`")

    def _require_open(self) -> str:
        if self._model_version is None:
            raise StoreError(f"{self._where} is not open; call open() first")
        return self._model_version

    def _index_body(self, *, dims: int, model_version: str) -> dict[str, Any]:
        keyword = {"type": "keyword"}
        return {
            "settings": {"number_of_shards": self.shards, "number_of_replicas": self.replicas},
            "mappings": {
                "dynamic": "strict",  # a typo in a field name fails loudly instead of mapping
                # info() works on an empty index; `schema` is DOCUMENT_SCHEMA of the documents it holds.
                "_meta": {"model_version": model_version, "schema": DOCUMENT_SCHEMA},
                "properties": {
                    "id": keyword,  # also the sort key of iter_documents
                    "filename": keyword,
                    "path": {"type": "keyword", "index": False},  # returned, never queried
                    "source": keyword,
                    "label": keyword,  # null when unknown: absent from the inverted index, as it should be
                    "predicted_label": keyword,
                    "confidence": {"type": "float", "index": False},
                    "size": {"type": "long", "index": False},
                    "mtime": {"type": "double", "index": False},
                    "model_version": keyword,
                    VECTOR_FIELD: {
                        "type": "dense_vector",
                        "dims": dims,
                        "similarity": "cosine",
                        "index": True,
                        "index_options": self._vector_index_options(),
                    },
                },
            },
        }

    def _vector_index_options(self) -> dict[str, Any]:
        """`index_options` of the vectors of a new index (CBIR_ES_INDEX_OPTIONS). The default, plain float `hnsw`,
        is named because 8.14+ would quantise to int8 unasked and kNN scores would drift ~1e-3 from the exact
        cosine the FAISS store reports; the quantised types rescore with the float vectors (RESCORE_OVERSAMPLE)."""
        options: dict[str, Any] = {"type": self.index_options}
        oversample = RESCORE_OVERSAMPLE.get(self.index_options.split("_")[0])
        if oversample is not None:
            options["rescore_vector"] = {"oversample": oversample}
        return options

    def _check_index_options(self, dims: int) -> None:
        """Refuse what Elasticsearch would refuse for these vectors, before asking it (a 400 would say less)."""
        if self.index_options.startswith("bbq") and dims < BBQ_MIN_DIMS:
            raise ConfigError(
                f"{INDEX_OPTIONS_SETTING}={self.index_options} needs vectors of at least {BBQ_MIN_DIMS} dims and "
                f"these have {dims} (Elasticsearch refuses fewer); choose hnsw or int8_hnsw, or more CBIR_PCA_DIMS"
            )

    def _note_index_options(self, vector: dict[str, Any]) -> None:
        """Say so when an existing index was built with other index_options than CBIR_ES_INDEX_OPTIONS names: a
        mapping keeps them for life, the setting applies to indices created from now on."""
        existing = (vector.get("index_options") or {}).get("type")
        if existing != self.index_options:
            logger.warning(
                "%s keeps its vector index_options %s; %s=%s applies to indices created from now on "
                "(delete the index or set another CBIR_ES_INDEX, then cbir index)",
                self._where, existing, INDEX_OPTIONS_SETTING, self.index_options,
            )  # fmt: skip

    async def _create_index(self, *, dims: int, model_version: str, serve: bool) -> bool:
        """Create the index (with `serve`, behind the alias); False when it already existed (a concurrent
        creator won)."""
        self._check_index_options(dims)
        body = self._index_body(dims=dims, model_version=model_version)
        if serve:
            body["aliases"] = {self.alias: {}}
        with self._translated("creating the index"):
            try:
                await self._client.indices.create(index=self.index, **body)
            except BadRequestError as exc:
                if _error_type(exc) != "resource_already_exists_exception":
                    raise
                return False
        await self._wait_for_primaries(self.index)
        logger.info(
            "created %s: %d shards, %d replicas, %d-dim cosine vectors (%s) of model %s",
            self._where, self.shards, self.replicas, dims, self.index_options, model_version,
        )  # fmt: skip
        return True

    async def _wait_for_primaries(self, index: str) -> None:
        """Wait until every primary of the new index has started (health yellow): until then each bulk
        item routed to a starting shard fails with 503 `unavailable_shards_exception`."""
        with self._translated("waiting for the new index's shards to start"):
            response = await self._client.options(
                request_timeout=PRIMARIES_WAIT_S + 10, ignore_status=408  # 408: the wait itself timed out
            ).cluster.health(index=index, wait_for_status="yellow", timeout=f"{PRIMARIES_WAIT_S}s")
        if response.body.get("timed_out"):
            raise StoreUnavailableError(
                f"the primaries of {self._where} did not start within {PRIMARIES_WAIT_S} s "
                f"(health {response.body.get('status')}, {response.body.get('initializing_shards')} initializing, "
                f"{response.body.get('unassigned_shards')} unassigned); check the cluster's disk and allocation"
            )

    async def _read_mapping(self) -> dict[str, Any] | None:
        """The index's mapping, or None when there is no such index."""
        with self._translated("reading the mapping"):
            response = await self._client.options(ignore_status=404).indices.get_mapping(
                index=self.index
            )
        if response.meta.status == 404:
            return None
        # Keyed by the concrete index name, which differs from self.index behind an alias.
        return next(iter(response.body.values()))["mappings"]

    async def _info_from(self, mapping: dict[str, Any]) -> StoreInfo:
        vector = mapping.get("properties", {}).get(VECTOR_FIELD, {})
        meta = mapping.get("_meta", {})
        return StoreInfo(dims=vector.get("dims"), model_version=meta.get("model_version"),
                         count=await self.count(), schema=meta.get("schema", 1))

    def _index_action(self, doc: ImageDocument) -> dict[str, Any]:
        return {
            "_op_type": "index",  # index, not create: re-indexing an id overwrites it
            "_index": self.index,
            "_id": doc.id,
            "_source": {
                **{name: getattr(doc, name) for name in STORED_FIELDS},
                VECTOR_FIELD: np.asarray(doc.vector, dtype=np.float32).ravel().tolist(),
            },
        }

    async def _bulk(self, actions: Iterable[dict[str, Any]], doing: str) -> list[dict[str, Any]]:
        """Send `actions` in chunks; the per-document results (the last answer for each id), 429s retried
        by the bulk helper and 503 items (a primary not started yet) by this loop, both with backoff."""
        pending = {action["_id"]: action for action in actions}  # the last action for an id is what counts
        results: dict[str, dict[str, Any]] = {}
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(self.initial_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            for item in await self._bulk_pass(pending.values(), doing):
                results[item["_id"]] = item
            pending = {doc_id: pending[doc_id] for doc_id, item in results.items()
                       if doc_id in pending and int(item.get("status", 0)) == 503}  # fmt: skip
            if not pending:
                break
            logger.warning("%s: %d documents refused with 503 by %s (%s); retrying",
                           doing, len(pending), self._where, _reason(results[next(iter(pending))]))  # fmt: skip
        return list(results.values())

    async def _bulk_pass(self, actions: Iterable[dict[str, Any]], doing: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        with self._translated(doing):
            async for _, result in async_streaming_bulk(
                self._client,
                actions,
                chunk_size=BULK_CHUNK,
                max_retries=self.max_retries,
                initial_backoff=self.initial_backoff_s,
                max_backoff=MAX_BACKOFF_S,
                raise_on_error=False,  # collected below; raising would also stop 429 retries
            ):
                (item,) = result.values()
                items.append(item)
        logger.debug("%s: %d documents sent to %s", doing, len(items), self._where)
        return items

    @contextlib.contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """Turn the client's exceptions into `CbirError`s that name the cluster and the action."""
        try:
            yield
        except ConnectionTimeout as exc:
            raise StoreUnavailableError(
                f"Elasticsearch at {self.url} did not answer in time while {doing}: {exc}"
            ) from exc
        except UnsupportedProductError as exc:
            raise StoreError(f"the server at {self.url} is not Elasticsearch: {exc}") from exc
        except TransportError as exc:
            raise StoreUnavailableError(
                f"cannot reach Elasticsearch at {self.url} while {doing}: {exc}"
            ) from exc
        except ApiError as exc:
            raise self._api_error(exc, doing) from exc

    def _api_error(self, exc: ApiError, doing: str) -> CbirError:
        status, kind = exc.meta.status, _error_type(exc)
        detail = f"{status} {_reason(_body(exc))}"  # the reason starts with the error type
        if kind == "index_not_found_exception":
            return self._not_ready()
        if isinstance(exc, AuthenticationException | AuthorizationException):
            return self._auth_error(exc, doing, detail)
        if status in UNAVAILABLE_STATUSES:
            return StoreUnavailableError(
                f"Elasticsearch at {self.url} is overloaded or down while {doing} ({detail})"
            )
        return StoreError(f"{self._where} refused {doing}: {detail}")

    def _auth_error(self, exc: ApiError, doing: str, detail: str) -> StoreAuthError:
        """401: the credentials are missing or wrong; 403: they lack a privilege on the index.

        Elasticsearch's reason names the user or API key id, never the password or key.
        """
        body = _body(exc)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("additional_unsuccessful_credentials"):
            detail += f"; {error['additional_unsuccessful_credentials']}"  # "API key: api key is expired"
        if isinstance(exc, AuthorizationException):
            account = f"the account of {self.credentials_from}" if self.credentials_from else "the anonymous user"
            return StoreAuthError(
                f"Elasticsearch at {self.url} refused {doing}: {account} lacks a privilege on index "
                f"{self.index!r} ({detail}); grant it, or set {API_KEY_SETTING} or {BASIC_AUTH_SETTINGS} "
                "to credentials that have it"
            )
        if self.credentials_from is None:
            return StoreAuthError(
                f"Elasticsearch at {self.url} requires credentials while {doing} ({detail}); "
                f"set {API_KEY_SETTING}, or {BASIC_AUTH_SETTINGS}"
            )
        return StoreAuthError(
            f"Elasticsearch at {self.url} did not accept the credentials of {self.credentials_from} "
            f"while {doing} ({detail}); correct {self.credentials_from}"
        )


def _check_vector_mapping(mapping: dict[str, Any], *, where: str) -> None:
    vector = mapping.get("properties", {}).get(VECTOR_FIELD)
    if not vector or vector.get("type") != "dense_vector" or vector.get("similarity") != "cosine":
        raise StoreMismatchError(
            f"{where} has no cosine dense_vector field {VECTOR_FIELD!r} (found {vector!r}); "
            "delete it or set CBIR_ES_INDEX to another name"
        )


def _window(query: StoreQuery) -> int:
    """How many hits of `query` can be asked for: Elasticsearch's from + size stops at 10,000."""
    return max(min(query.k, MAX_RESULT_WINDOW - query.offset), 0)


def _stored(source: dict[str, Any]) -> StoredImage:
    return StoredImage(**{name: source.get(name) for name in STORED_FIELDS})


def _filter(query: StoreQuery) -> dict[str, Any] | None:
    """The `bool` filter of a query's labels, predicted labels and excluded ids, or None when it has none."""
    clauses: dict[str, Any] = {}
    terms = [{"terms": {field_name: sorted(values)}}
             for field_name, values in (("label", query.labels), ("predicted_label", query.predicted_labels))
             if values is not None]
    if terms:
        clauses["filter"] = terms
    if query.exclude_ids:
        clauses["must_not"] = [{"ids": {"values": sorted(query.exclude_ids)}}]
    return {"bool": clauses} if clauses else None


def _body(exc: BaseException | None) -> Any:
    return getattr(exc, "body", None)


def _error_type(source: BaseException | dict[str, Any] | None) -> str | None:
    """The `error.type` of an API error, or of an mget doc / bulk item that carries one."""
    body = source if isinstance(source, dict) else _body(source)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("type")
    return None


def _ok(item: dict[str, Any]) -> bool:
    return 200 <= int(item.get("status", 500)) < 300


def _reason(entry: Any) -> str:
    """`type: reason` of an ES error, from an error body, a bulk item or an mget doc."""
    error = entry.get("error") if isinstance(entry, dict) else entry
    if isinstance(error, dict):
        reason = f"{error.get('type', 'error')}: {error.get('reason', '')}"
        caused_by = error.get("caused_by")
        if isinstance(caused_by, dict) and caused_by.get("reason"):
            reason += f" (caused by {caused_by.get('type')}: {caused_by['reason']})"
        return reason
    if isinstance(entry, dict) and "status" in entry:
        return f"status {entry['status']}"
    return str(error)


def _summary(failures: dict[str, str]) -> str:
    shown = [f"{doc_id} ({reason})" for doc_id, reason in list(failures.items())[:FAILURES_SHOWN]]
    more = len(failures) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
