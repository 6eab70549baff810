"""Versioned indices behind one alias: which index a store uses, how a rebuild's index is served, and how a store
notices that the alias moved.

Indices are versioned: `cbir-images-<model version>` behind the alias `cbir-images` (`CBIR_ES_INDEX`). A store
resolves the alias once, when it opens, and reads and writes that concrete index from then on, so a service never
writes one model's vectors into another's index. `cbir index --rebuild` opens the index of its own model version
(`versioned=True`) without touching the alias; `cbir promote VERSION` carries the uploads over and moves the alias
in one atomic `_aliases` call (`move_alias`); a service whose index is no longer the one behind the alias finds out
within `VERIFY_EVERY_S` (`follow_alias`) and answers 409 from then on if its model is not the new index's. An index
created before aliases (a concrete index named like the alias) is moved behind one (`move_behind_alias`).
"""

from __future__ import annotations

import dataclasses
import logging

from elasticsearch import AsyncElasticsearch

from services.common.errors import StoreError, StoreMismatchError
from services.common.stores.elasticsearch.errors import IndexRef, translated
from services.common.stores.elasticsearch.indices import index_exists, read_mapping, wait_for_primaries
from services.common.stores.elasticsearch.mapping import mapping_of, versioned_index

logger = logging.getLogger(__name__)


async def alias_target(client: AsyncElasticsearch, ref: IndexRef) -> str | None:
    """The concrete index behind the alias, None when there is no such alias."""
    with translated(ref, "resolving the alias"):
        response = await client.options(ignore_status=404).indices.get_alias(name=ref.alias)
    if response.meta.status == 404:
        return None
    targets = sorted(response.body)
    if len(targets) != 1:
        raise StoreError(f"the alias {ref.alias!r} at {ref.url} points at {len(targets)} indices "
                         f"({', '.join(targets)}); point it at one (POST /_aliases)")
    return targets[0]


async def resolve_index(client: AsyncElasticsearch, ref: IndexRef, model_version: str, *, shards: int,
                        replicas: int) -> str:
    """The concrete index a store opening for `model_version` uses: a rebuild's (`ref.versioned`) own versioned
    index; else the one the alias serves, or the versioned index of `model_version` when none is served yet."""
    if ref.versioned:
        return versioned_index(ref.alias, model_version)
    served = await alias_target(client, ref)
    if served is not None:
        return served
    if await index_exists(client, ref, ref.alias):  # an index from before aliases
        return await move_behind_alias(client, ref, shards=shards, replicas=replicas)
    return versioned_index(ref.alias, model_version)


async def nothing_served(client: AsyncElasticsearch, ref: IndexRef) -> bool:
    """No alias and no index of its name: a new index is created behind the alias."""
    return await alias_target(client, ref) is None and not await index_exists(client, ref, ref.alias)


# The migration of an index from before aliases (0.1.0 had none in a deployment): kept as it was until the
# Elasticsearch issue (26) decides whether it stays.
async def move_behind_alias(client: AsyncElasticsearch, ref: IndexRef, *, shards: int, replicas: int) -> str:
    """Move the concrete index named like the alias to its versioned name, behind the alias: `_reindex` into a
    copy with its mapping, then one atomic `_aliases` call (add the alias, remove the old index)."""
    ref = dataclasses.replace(ref, index=ref.alias)
    mapping = await read_mapping(client, ref)
    version = (mapping or {}).get("_meta", {}).get("model_version") or "unversioned"
    target = versioned_index(ref.alias, version)
    with translated(ref, f"moving index {ref.alias!r} behind an alias"):
        await client.options(ignore_status=400).indices.create(
            index=target, settings={"number_of_shards": shards, "number_of_replicas": replicas},
            mappings=mapping or {})
        await wait_for_primaries(client, ref, target)
        await client.reindex(source={"index": ref.alias}, dest={"index": target}, refresh=True,
                             wait_for_completion=True)
        await client.indices.update_aliases(actions=[{"add": {"index": target, "alias": ref.alias}},
                                                     {"remove_index": {"index": ref.alias}}])
    logger.info("moved index %r to %r behind the alias %r", ref.alias, target, ref.alias)
    return target


async def follow_alias(client: AsyncElasticsearch, ref: IndexRef, model_version: str) -> str:
    """The index to search from now on: `ref.index` while the alias still serves it, the newly served one after
    a move to an index of the same model version. Raise `StoreMismatchError` when the alias has moved to an index
    of another model version (after `cbir promote`): the service must not go on searching the old index as if it
    were the served one."""
    served = await alias_target(client, ref)
    if served is None or served == ref.index:
        return ref.index
    with translated(ref, "reading the served index's mapping"):
        response = await client.indices.get_mapping(index=served)
    served_version = mapping_of(response.body).get("_meta", {}).get("model_version")
    if served_version != model_version:
        raise StoreMismatchError(
            f"the alias {ref.alias!r} now points at {served!r}, built by model version {served_version!r}; "
            f"this service's model is {model_version!r}: restart it with the model of {served_version!r}")
    logger.info("the alias %r moved to %r (the same model version); following it", ref.alias, served)
    return served


async def move_alias(client: AsyncElasticsearch, ref: IndexRef, *, served: str | None) -> None:
    """Point the alias at `ref.index` instead of `served` (None: at nothing yet) in one atomic `_aliases` call."""
    actions = ([{"remove": {"index": served, "alias": ref.alias}}] if served is not None else []) + [
        {"add": {"index": ref.index, "alias": ref.alias}}]
    with translated(ref, "moving the alias"):
        await client.indices.update_aliases(actions=actions)
    logger.info("the alias %r now points at %r (was %r)", ref.alias, ref.index, served)


async def versioned_indices(client: AsyncElasticsearch, ref: IndexRef) -> set[str]:
    """Every index named like a versioned index of the alias (the served one and any rebuild's)."""
    with translated(ref, "listing the versioned indices"):
        response = await client.indices.get_alias(index=f"{ref.alias}-*")
    return set(response.body)
