"""Writes through the async bulk helper: the helper retries 429 items (a full write queue), this module the 503
items of an index whose primaries have not started yet (someone else created it a moment ago), both with the
same backoff; what is still refused after the retries is reported per document id."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from elasticsearch import AsyncElasticsearch
from elasticsearch.helpers import async_streaming_bulk

from services.common.documents import ImageDocument
from services.common.stores.elasticsearch.errors import IndexRef, reason, translated
from services.common.stores.elasticsearch.mapping import document_source

logger = logging.getLogger(__name__)

BULK_CHUNK = 500  # documents per _bulk request: ~0.5 MB with 74-dim vectors
MAX_BACKOFF_S = 60.0


def index_action(doc: ImageDocument, index: str) -> dict[str, Any]:
    """The bulk action that writes `doc` into `index`."""
    return {
        "_op_type": "index",  # index, not create: re-indexing an id overwrites it
        "_index": index,
        "_id": doc.id,
        "_source": document_source(doc),
    }


def delete_action(doc_id: str, index: str) -> dict[str, Any]:
    return {"_op_type": "delete", "_index": index, "_id": doc_id}


def refused(items: Iterable[dict[str, Any]], *, missing_ok: bool = False) -> dict[str, str]:
    """The reason of every item that failed, by document id; with `missing_ok`, a delete of a missing document
    (404 "not_found") is no failure, just not counted."""
    return {item["_id"]: reason(item) for item in items
            if not _ok(item) and not (missing_ok and item.get("result") == "not_found")}


async def bulk(client: AsyncElasticsearch, ref: IndexRef, actions: Iterable[dict[str, Any]], doing: str, *,
               max_retries: int, initial_backoff_s: float) -> list[dict[str, Any]]:
    """Send `actions` in chunks; the per-document results (the last answer for each id), 429s retried by the bulk
    helper and 503 items (a primary not started yet) by this loop, both with backoff."""
    pending = {action["_id"]: action for action in actions}  # the last action for an id is what counts
    results: dict[str, dict[str, Any]] = {}
    for attempt in range(max_retries + 1):
        if attempt:
            await asyncio.sleep(min(initial_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
        for item in await _bulk_pass(client, ref, pending.values(), doing, max_retries=max_retries,
                                     initial_backoff_s=initial_backoff_s):
            results[item["_id"]] = item
        pending = {doc_id: pending[doc_id] for doc_id, item in results.items()
                   if doc_id in pending and int(item.get("status", 0)) == 503}  # fmt: skip
        if not pending:
            break
        logger.warning("%s: %d documents refused with 503 by %s (%s); retrying",
                       doing, len(pending), ref.where, reason(results[next(iter(pending))]))  # fmt: skip
    return list(results.values())


async def _bulk_pass(client: AsyncElasticsearch, ref: IndexRef, actions: Iterable[dict[str, Any]], doing: str, *,
                     max_retries: int, initial_backoff_s: float) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    with translated(ref, doing):
        async for _, result in async_streaming_bulk(
            client,
            actions,
            chunk_size=BULK_CHUNK,
            max_retries=max_retries,
            initial_backoff=initial_backoff_s,
            max_backoff=MAX_BACKOFF_S,
            raise_on_error=False,  # collected below; raising would also stop 429 retries
        ):
            (item,) = result.values()
            items.append(item)
    logger.debug("%s: %d documents sent to %s", doing, len(items), ref.where)
    return items


def _ok(item: dict[str, Any]) -> bool:
    return 200 <= int(item.get("status", 500)) < 300
