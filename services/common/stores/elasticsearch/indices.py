"""An index on the cluster: created (then waited for), read back, checked for, deleted.

A fresh index is not ready at once: the primaries of a new 30-shard index take a while to start, and until they
have, bulk items fail with 503 `unavailable_shards_exception`; so after creating an index the store waits for
`_cluster/health?wait_for_status=yellow` (and bulk.py retries the 503 items of an index someone else just made).
"""

from __future__ import annotations

from typing import Any

from elasticsearch import AsyncElasticsearch, BadRequestError

from services.common.errors import StoreUnavailableError
from services.common.stores.elasticsearch.errors import IndexRef, error_type, translated
from services.common.stores.elasticsearch.mapping import mapping_of

PRIMARIES_WAIT_S = 30  # how long a new index's primaries may take to start (the create API's own default)


async def create_index(client: AsyncElasticsearch, ref: IndexRef, body: dict[str, Any]) -> bool:
    """Create `ref.index` with `body` and wait for its primaries; False when it already existed (a concurrent
    creator won)."""
    with translated(ref, "creating the index"):
        try:
            await client.indices.create(index=ref.index, **body)
        except BadRequestError as exc:
            if error_type(exc) != "resource_already_exists_exception":
                raise
            return False
    await wait_for_primaries(client, ref, ref.index)
    return True


async def wait_for_primaries(client: AsyncElasticsearch, ref: IndexRef, index: str) -> None:
    """Wait until every primary of the new `index` has started (health yellow): until then each bulk item routed
    to a starting shard fails with 503 `unavailable_shards_exception`."""
    with translated(ref, "waiting for the new index's shards to start"):
        response = await client.options(
            request_timeout=PRIMARIES_WAIT_S + 10, ignore_status=408  # 408: the wait itself timed out
        ).cluster.health(index=index, wait_for_status="yellow", timeout=f"{PRIMARIES_WAIT_S}s")
    if response.body.get("timed_out"):
        raise StoreUnavailableError(
            f"the primaries of {ref.where} did not start within {PRIMARIES_WAIT_S} s "
            f"(health {response.body.get('status')}, {response.body.get('initializing_shards')} initializing, "
            f"{response.body.get('unassigned_shards')} unassigned); check the cluster's disk and allocation"
        )


async def read_mapping(client: AsyncElasticsearch, ref: IndexRef) -> dict[str, Any] | None:
    """The mapping of `ref.index` (an index or an alias), or None when there is no such index."""
    with translated(ref, "reading the mapping"):
        response = await client.options(ignore_status=404).indices.get_mapping(index=ref.index)
    if response.meta.status == 404:
        return None
    return mapping_of(response.body)


async def index_exists(client: AsyncElasticsearch, ref: IndexRef, name: str) -> bool:
    with translated(ref, "checking the index"):
        return bool(await client.indices.exists(index=name))


async def delete_index(client: AsyncElasticsearch, ref: IndexRef) -> None:
    """Delete `ref.index`; nothing to do when there is none."""
    with translated(ref, "deleting the index"):
        await client.options(ignore_status=404).indices.delete(index=ref.index)
