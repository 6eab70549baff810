"""`ElasticsearchStore`: the `VectorStore` interface on one Elasticsearch index, searched exactly (`script_score`
over every vector) or approximately (HNSW `knn`), scored like the FAISS store.

The store keeps the state (the concrete index it opened, its dims and model version) and talks to the cluster
through the parts beside it: client.py builds the client, aliases.py resolves and moves the alias, indices.py and
mapping.py create and read the index, bulk.py writes, queries.py builds searches and checks their answers,
preflight.py checks the server and the privileges before the first write, and errors.py turns every client error
into a `CbirError`. A bad query vector (zero, NaN or of the wrong size) is refused before anything is sent
(`check_query_vector`): Elasticsearch would answer 400 (the cosine of a zero vector), or the JSON would not even
parse (NaN).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import numpy as np
from elasticsearch import AsyncElasticsearch, ConflictError, NotFoundError

from services.common.documents import DOCUMENT_SCHEMA, ImageDocument, StoredImage, StoreHit
from services.common.errors import BulkWriteError, IndexNotReadyError, StoreError, StoreLayoutError
from services.common.settings import EsSearchMode, StoreSettings, default
from services.common.stores.base import (
    CollectionStats,
    StoreInfo,
    StoreQuery,
    VectorStore,
    check_compatible,
    check_model_version,
    check_query_vector,
)
from services.common.stores.elasticsearch import aliases, bulk, indices, preflight
from services.common.stores.elasticsearch.client import connect
from services.common.stores.elasticsearch.errors import IndexRef, error_type, not_ready, reason, summary, translated
from services.common.stores.elasticsearch.mapping import (
    STORED_FIELDS,
    VECTOR_FIELD,
    check_index_options,
    check_vector_mapping,
    claimed_mapping,
    index_body,
    note_index_options,
    require_known_index_options,
    store_info,
    stored_image,
)
from services.common.stores.elasticsearch.preflight import Access
from services.common.stores.elasticsearch.queries import (
    check_search_answer,
    check_shards,
    collection_stats,
    hits_of,
    listing_page,
    msearch_body,
    stats_body,
    window,
)

logger = logging.getLogger(__name__)

MGET_CHUNK = 1000  # ids per _mget request of the resume check
SCAN_PAGE = 1000  # documents per search_after page when listing documents


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
        # Of an index this store creates; an existing one keeps its own.
        self.index_options = require_known_index_options(index_options)
        self.max_retries = max_retries
        self.initial_backoff_s = initial_backoff_s
        self._dims: int | None = None
        self._model_version: str | None = None
        self._granted: set[str] = set()  # privileges `preflight` found held ("cluster:" prefixed), and "server"

    @classmethod
    def from_settings(
        cls, settings: StoreSettings, *, initial_backoff_s: float = 1.0, versioned: bool = False
    ) -> ElasticsearchStore:
        """A store with its own `AsyncElasticsearch` client, configured from `CBIR_ES_*`."""
        connection = connect(settings)
        return cls(
            connection.client,
            index=settings.es_index,
            url=connection.url,
            shards=settings.es_shards,
            replicas=settings.es_replicas,
            search_mode=settings.es_search_mode,
            num_candidates=settings.es_num_candidates,
            index_options=settings.es_index_options,
            max_retries=settings.es_max_retries,
            initial_backoff_s=initial_backoff_s,
            credentials_from=connection.credentials_from,
            versioned=versioned,
        )

    # -- the index ----------------------------------------------------------------------------

    async def open(self, *, dims: int, model_version: str, create: bool = True) -> None:
        """Resolve the index to use (the alias's, or with `versioned` the model version's), create it if needed
        and allowed (behind the alias when no index is served yet), then check it matches. Raises
        `StoreLayoutError`, having written nothing, for a concrete index named like the alias."""
        self.index = await aliases.resolve_index(self._client, self._ref, model_version)
        mapping = await indices.read_mapping(self._client, self._ref)
        if mapping is None:
            if not create:
                raise not_ready(self._ref)
            await self._before_writing(Access.create)
            serve = await aliases.nothing_served(self._client, self._ref)
            if await self._create_index(dims=dims, model_version=model_version, serve=serve):
                self._dims, self._model_version = dims, model_version
                return
            mapping = await indices.read_mapping(self._client, self._ref)  # another process created it first
            if mapping is None:
                raise IndexNotReadyError(f"{self._where} was created and deleted while opening it")
        check_vector_mapping(mapping, where=self._where)
        info = store_info(mapping, count=await self.count())
        check_compatible(info, dims=dims, model_version=model_version, where=self._where)
        vector = mapping["properties"][VECTOR_FIELD]
        note_index_options(vector, self.index_options, where=self._where)
        if info.model_version != model_version or info.schema != DOCUMENT_SCHEMA:
            # An empty index left by another model or schema: claim it, as the FAISS store does (adding the
            # fields this schema has is a mapping update Elasticsearch allows). Its vectors keep their index_options.
            await self._before_writing(Access.write)
            with translated(self._ref, "recording the model version"):
                await self._client.indices.put_mapping(index=self.index,
                                                       **claimed_mapping(vector, model_version=model_version))
        self._dims, self._model_version = dims, model_version

    async def served_index(self) -> str | None:
        """The concrete index the alias serves now (None: none yet)."""
        return await aliases.alias_target(self._client, self._ref)

    async def verify(self, model_version: str) -> None:
        """Raise `StoreMismatchError` when the alias has moved to an index of another model version than
        `model_version` (after `cbir promote`); a move to an index of the same version is followed."""
        if not self.versioned:
            self.index = await aliases.follow_alias(self._client, self._ref, model_version)

    async def promote(self, carry_over: Callable[[ElasticsearchStore], Awaitable[object]]) -> str | None:
        """Serve this (open, versioned) index: `carry_over(served)` first brings it up to date with the index
        the alias points at now, then one `_aliases` call moves the alias here, all or nothing (`aliases.move_alias`:
        `StoreLayoutError` when another promote moved it meanwhile). A concrete index named like the alias (the
        layout before versioned indices) is what is served then: carried over, and removed by that same call.
        Returns the index served before."""
        served = await aliases.alias_target(self._client, self._ref)
        if served == self.index:
            return served
        await self._before_writing(Access.promote)
        if served is None and await indices.index_exists(self._client, self._ref, self.alias):
            served = self.alias
        if served is not None:
            previous = ElasticsearchStore(self._client, index=served, url=self.url, shards=self.shards,
                                          replicas=self.replicas, credentials_from=self.credentials_from)
            await carry_over(previous)
            await self.flush()
        await aliases.move_alias(self._client, self._ref, served=served)
        return served

    async def info(self) -> StoreInfo:
        mapping = await indices.read_mapping(self._client, self._ref)
        if mapping is None:
            return StoreInfo(dims=None, model_version=None, count=0)
        return store_info(mapping, count=await self.count())

    async def flush(self) -> None:
        with translated(self._ref, "refreshing the index"):
            response = await self._client.indices.refresh(index=self.index)
        check_shards(response.body, self._ref, withheld="a partly refreshed index as refreshed")

    async def reset(self) -> None:
        """Delete the index, and create it empty again when the store is open.

        Before `open` this only deletes, so `reset(); open(...)` rebuilds for a new model.
        """
        target = await aliases.alias_target(self._client, self._ref)
        if self.index == self.alias and target is not None:  # not open yet: the index the alias serves
            self.index = target
        elif self.index == self.alias and await indices.index_exists(self._client, self._ref, self.alias):
            raise aliases.old_layout(self._ref)  # never deleted by a store: `cbir promote` replaces it
        served = target == self.index
        await indices.delete_index(self._client, self._ref)
        logger.info("deleted %s", self._where)
        if self._dims is not None and self._model_version is not None:
            await self._create_index(dims=self._dims, model_version=self._model_version, serve=served)

    async def close(self) -> None:
        await self._client.close()

    async def _create_index(self, *, dims: int, model_version: str, serve: bool) -> bool:
        """Create the index (with `serve`, behind the alias); False when it already existed (a concurrent
        creator won)."""
        check_index_options(self.index_options, dims)
        body = index_body(dims=dims, model_version=model_version, shards=self.shards, replicas=self.replicas,
                          index_options=self.index_options)
        if serve:  # its write index: a second index created behind the alias at once is refused
            body["aliases"] = {self.alias: {"is_write_index": True}}
        try:
            if not await indices.create_index(self._client, self._ref, body):
                return False
        except StoreError as exc:
            if not serve or error_type(exc.__cause__) != "illegal_state_exception":
                raise
            # Another index was created behind the alias at the same moment (500 "alias [..] has more than one
            # write index"), and this one was not created: a rebuild's goes beside it; a served one is not this.
            if self.versioned:
                return await self._create_index(dims=dims, model_version=model_version, serve=False)
            served = await aliases.alias_target(self._client, self._ref)
            raise StoreLayoutError(f"{served!r} was put behind the alias {self.alias!r} while {self._where} was "
                                   "being created; open the store again to use it") from exc
        logger.info(
            "created %s: %d shards, %d replicas, %d-dim cosine vectors (%s) of model %s",
            self._where, self.shards, self.replicas, dims, self.index_options, model_version,
        )  # fmt: skip
        return True

    # -- documents ----------------------------------------------------------------------------

    async def upsert(self, documents: Sequence[ImageDocument]) -> None:
        if not documents:
            return
        check_model_version(documents, self._require_open())
        await self._before_writing(Access.write)
        items = await self._bulk((bulk.index_action(doc, self.index) for doc in documents), "indexing")
        failures = bulk.refused(items)
        if failures:
            raise BulkWriteError(
                f"{self._where} refused {len(failures)} of {len(documents)} documents: {summary(failures)}",
                failures=failures,
            )

    async def delete(self, ids: Sequence[str]) -> int:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return 0
        await self._before_writing(Access.write)
        items = await self._bulk((bulk.delete_action(i, self.index) for i in unique), "deleting documents")
        failures = bulk.refused(items, missing_ok=True)
        if failures:
            raise BulkWriteError(
                f"{self._where} failed to delete {len(failures)} documents: {summary(failures)}",
                failures=failures,
            )
        return sum(item.get("result") == "deleted" for item in items)

    async def add(self, document: ImageDocument) -> bool:
        """`op_type=create` with `refresh=wait_for`: of two concurrent adds of one id, Elasticsearch stores
        the first and answers the second 409, and the answer comes once a search can find the document
        (its translog is fsynced per request by default, so it is durable too)."""
        check_model_version([document], self._require_open())
        await self._before_writing(Access.write)
        action = bulk.index_action(document, self.index)
        with translated(self._ref, "adding a document"):
            try:
                await self._client.create(index=self.index, id=document.id, document=action["_source"],
                                          refresh="wait_for")
            except ConflictError:
                return False
        return True

    async def remove(self, id: str) -> bool:
        """Delete from this index, and from the other versioned indices behind the alias (a rebuild's index
        being built), so that a deletion made during a rebuild is not undone by the promotion."""
        await self._before_writing(Access.write)
        existed = await self._remove_from(self.index, id)
        for other in sorted(await aliases.versioned_indices(self._client, self._ref) - {self.index}):
            await self._remove_from(other, id)
        return existed

    async def _remove_from(self, index: str, id: str) -> bool:
        with translated(self._ref, "deleting a document"):
            try:
                await self._client.delete(index=index, id=id, refresh="wait_for")
            except NotFoundError as exc:
                if isinstance(exc.body, dict) and exc.body.get("result") == "not_found":
                    return False
                raise
        return True

    async def count(self) -> int:
        """The searchable documents; `StoreUnavailableError` when some shards failed to count theirs."""
        with translated(self._ref, "counting documents"):
            response = await self._client.count(index=self.index)
        check_shards(response.body, self._ref, withheld="a short count")
        return int(response["count"])

    async def get(self, id: str) -> StoredImage | None:
        with translated(self._ref, "reading a document"):
            try:
                response = await self._client.get(index=self.index, id=id, source_includes=STORED_FIELDS)
            except NotFoundError as exc:
                if isinstance(exc.body, dict) and exc.body.get("found") is False:  # no such document
                    return None
                raise
        return stored_image(response["_source"])

    async def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {doc["_id"]: np.asarray(doc["_source"][VECTOR_FIELD], dtype=np.float32)
                async for doc in self._found(ids, "reading vectors", source_includes=[VECTOR_FIELD])}

    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        return {doc["_id"] async for doc in self._found(ids, "checking which documents exist", source=False)}

    async def _found(self, ids: Sequence[str], doing: str, **source: Any) -> AsyncIterator[dict[str, Any]]:
        """The stored ones of `ids` (`_mget` in chunks, each doc checked for errors), with `source` as asked."""
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), MGET_CHUNK):
            with translated(self._ref, doing):
                response = await self._client.mget(index=self.index, ids=unique[start:start + MGET_CHUNK], **source)
            for doc in response["docs"]:
                if error_type(doc) == "index_not_found_exception":
                    raise not_ready(self._ref)
                if "error" in doc:
                    raise StoreError(f"{self._where} could not look up {doc['_id']}: {reason(doc)}")
                if doc.get("found"):
                    yield doc

    async def iter_documents(self, *, source: str | None = None) -> AsyncIterator[StoredImage]:
        """Pages of `SCAN_PAGE` documents sorted by id, each after the last id of the one before."""
        after: list[str] | None = None
        while True:
            with translated(self._ref, "listing documents"):
                response = await self._client.search(index=self.index,
                                                     **listing_page(source, size=SCAN_PAGE, after=after))
            check_search_answer(response.body, "listing documents", self._ref)
            hits = response["hits"]["hits"]
            for hit in hits:
                yield stored_image(hit["_source"])
            if len(hits) < SCAN_PAGE:
                return
            after = hits[-1]["sort"]

    async def stats(self) -> CollectionStats:
        doing = "counting documents by source and label"
        with translated(self._ref, doing):
            response = await self._client.search(index=self.index, **stats_body())
        check_search_answer(response.body, doing, self._ref)
        return collection_stats(response.body)

    async def search_many(self, queries: Sequence[StoreQuery]) -> list[list[StoreHit]]:
        """Every query in one `_msearch` request (see `queries.search_body`); each answer checked for errors and
        partial results."""
        for query in queries:
            check_query_vector(query.vector, dims=self._dims, where=self._where)
        sent = [position for position, query in enumerate(queries) if window(query) > 0]
        results: list[list[StoreHit]] = [[] for _ in queries]
        if not sent:
            return results
        searches = msearch_body([queries[position] for position in sent], mode=self.search_mode,
                                num_candidates=self.num_candidates)
        doing = f"searching ({self.search_mode.value}, {len(sent)} queries)"
        with translated(self._ref, doing):
            response = await self._client.msearch(index=self.index, searches=searches)
        for position, answer in zip(sent, response["responses"], strict=True):
            check_search_answer(answer, doing, self._ref)
            results[position] = hits_of(answer, self.search_mode)
        return results

    # -- helpers ------------------------------------------------------------------------------

    @property
    def _ref(self) -> IndexRef:
        """The index requests name now, as messages describe it."""
        return IndexRef(url=self.url, index=self.index, alias=self.alias, versioned=self.versioned,
                        credentials_from=self.credentials_from)

    @property
    def _where(self) -> str:
        return self._ref.where

    async def _before_writing(self, access: Access) -> None:
        """The first time this store is about to `access` the cluster: the privileges that needs (and, to create an
        index, a server that accepts its index options), each named when missing, before anything is written."""
        needed = {f"cluster:{name}" for name in preflight.CLUSTER_PRIVILEGES[access]}
        needed |= set(preflight.INDEX_PRIVILEGES[access]) | ({"server"} if access is Access.create else set())
        if needed <= self._granted:
            return
        await preflight.check_privileges(self._client, self._ref, access)
        if access is Access.create:
            await preflight.check_server(self._client, self._ref, self.index_options)
        self._granted |= needed

    def _require_open(self) -> str:
        if self._model_version is None:
            raise StoreError(f"{self._where} is not open; call open() first")
        return self._model_version

    async def _bulk(self, actions: Iterable[dict[str, Any]], doing: str) -> list[dict[str, Any]]:
        return await bulk.bulk(self._client, self._ref, actions, doing, max_retries=self.max_retries,
                               initial_backoff_s=self.initial_backoff_s)
