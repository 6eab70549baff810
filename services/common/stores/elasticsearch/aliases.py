"""Versioned indices behind one alias: which index a store uses, how a rebuild's index is served, and how a store
notices that the alias moved.

Indices are versioned: `cbir-images-<model version>` behind the alias `cbir-images` (`CBIR_ES_INDEX`). A store
resolves the alias once, when it opens, and reads and writes that concrete index from then on, so a service never
writes one model's vectors into another's index. `cbir index --rebuild` opens the index of its own model version
(`versioned=True`) without touching the alias; `cbir promote VERSION` carries the uploads over and moves the alias
in one `_aliases` call that is all or nothing (`move_alias`: the old index's `remove` says `must_exist`, the new
one is the alias's write index), so of two promotes at once one fails and the alias stays on one index. A service
whose index is no longer the one behind the alias finds out within `VERIFY_EVERY_S` (`follow_alias`) and answers
409 from then on if its model is not the new index's.

A concrete index named like the alias (the layout before versioned indices) is never moved by an opener: a store
that finds one refuses with `StoreLayoutError`, writing nothing, and names the commands that replace it: `cbir
index --rebuild` builds the versioned index beside it, and `cbir promote` swaps it for that index in one
`_aliases` call (add the alias, remove the old index), after carrying its uploads over.
"""

from __future__ import annotations

import logging
from typing import Any

from elasticsearch import AsyncElasticsearch

from services.common.errors import (
    StoreAuthError,
    StoreError,
    StoreLayoutError,
    StoreMismatchError,
    StoreUnavailableError,
)
from services.common.stores.elasticsearch.errors import IndexRef, reason, translated
from services.common.stores.elasticsearch.indices import index_exists
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


async def resolve_index(client: AsyncElasticsearch, ref: IndexRef, model_version: str) -> str:
    """The concrete index a store opening for `model_version` uses: a rebuild's (`ref.versioned`) own versioned
    index; else the one the alias serves, or the versioned index of `model_version` when none is served yet.
    Raises `StoreLayoutError` for a concrete index named like the alias."""
    if ref.versioned:
        return versioned_index(ref.alias, model_version)
    served = await alias_target(client, ref)
    if served is not None:
        return served
    if await index_exists(client, ref, ref.alias):
        raise old_layout(ref)
    return versioned_index(ref.alias, model_version)


def old_layout(ref: IndexRef) -> StoreLayoutError:
    """A concrete index where the alias belongs: what replaces it (the store itself changes nothing)."""
    return StoreLayoutError(
        f"Elasticsearch index {ref.alias!r} at {ref.url} is a concrete index, not the alias of a versioned index "
        f"(the layout before versioned indices); cbir does not move it by itself. Build the versioned index beside "
        f"it with `cbir index --rebuild`, then serve it with `cbir promote VERSION` (the model version the rebuild "
        f"names), which carries the uploads over and replaces {ref.alias!r} by the alias in one call"
    )


async def nothing_served(client: AsyncElasticsearch, ref: IndexRef) -> bool:
    """No alias and no index of its name: a new index is created behind the alias."""
    return await alias_target(client, ref) is None and not await index_exists(client, ref, ref.alias)


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


def alias_actions(ref: IndexRef, *, served: str | None) -> list[dict[str, Any]]:
    """The `_aliases` actions that serve `ref.index` instead of `served` (None: nothing yet), all or nothing: the
    alias leaves `served` only if it is still there (`must_exist`: else the call is a 404 and changes nothing,
    where without it the `add` would apply and the answer be `errors: true`), and `ref.index` becomes its write
    index (a second write index is refused, so two first promotes cannot both add it). A concrete index named like
    the alias (`served == ref.alias`) is removed in the same call, which lets the alias take its name."""
    if served == ref.alias:
        leave: list[dict[str, Any]] = [{"remove_index": {"index": served}}]
    elif served is not None:
        leave = [{"remove": {"index": served, "alias": ref.alias, "must_exist": True}}]
    else:
        leave = []
    return [*leave, {"add": {"index": ref.index, "alias": ref.alias, "is_write_index": True}}]


def check_aliases_answer(body: Any, ref: IndexRef) -> None:
    """Raise for an `_aliases` answer that reports a failed action (8.14+: 200 with `errors: true` and each
    action's result): a partial move is never a success."""
    if not isinstance(body, dict) or not body.get("errors"):
        return
    failed = [f"{result.get('action', {}).get('type')} {result.get('action', {}).get('indices')}: "
              f"{result.get('status')} {reason(result)}"
              for result in body.get("action_results", []) if result.get("status") != 200]  # fmt: skip
    raise StoreError(f"Elasticsearch at {ref.url} applied only part of moving the alias {ref.alias!r} to "
                     f"{ref.index!r}: {'; '.join(failed) or 'errors: true'}; check the alias (GET _alias/{ref.alias})")


async def move_alias(client: AsyncElasticsearch, ref: IndexRef, *, served: str | None) -> None:
    """Point the alias at `ref.index` instead of `served` in one `_aliases` call that applies whole or not at all
    (`alias_actions`). Raises `StoreLayoutError` when the alias moved meanwhile (another `cbir promote`): then this
    call changed nothing, and the error says where the alias points now."""
    try:
        with translated(ref, "moving the alias"):
            response = await client.indices.update_aliases(actions=alias_actions(ref, served=served))
    except (StoreUnavailableError, StoreAuthError):
        raise
    except StoreError as exc:
        now = await alias_target(client, ref)
        if now == served or (now is None and served == ref.alias):
            raise  # nothing moved: the refusal is about this call
        raise StoreLayoutError(
            f"the alias {ref.alias!r} at {ref.url} moved while {ref.index!r} was being promoted (another `cbir "
            f"promote`?): it points at {now!r} now, and this promote changed nothing ({exc.message}); promote "
            f"again if {ref.index!r} should be served") from exc
    check_aliases_answer(response.body, ref)
    logger.info("the alias %r now points at %r (was %r)", ref.alias, ref.index, served)


async def versioned_indices(client: AsyncElasticsearch, ref: IndexRef) -> set[str]:
    """Every index named like a versioned index of the alias (the served one and any rebuild's)."""
    with translated(ref, "listing the versioned indices"):
        response = await client.indices.get_alias(index=f"{ref.alias}-*")
    return set(response.body)
