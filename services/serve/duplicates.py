"""`cbir duplicates`: the near-duplicate groups of `GET /duplicates`, printed as a table (or its JSON), from a
running gateway or in-process on the configured index (the one-machine app, without serving it).

    cbir duplicates                                  # the gateway at CBIR_SEARCH_URL (http://127.0.0.1:8000)
    cbir duplicates --local                          # in-process: the index cbir serve serves (or Elasticsearch)
    cbir duplicates --threshold 0.95 --json
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx

from services.common.errors import SearchApiError

POLL_S = 0.5  # between two asks while the gateway answers 202


@contextlib.asynccontextmanager
async def _client(url: str | None, api_key: str | None, timeout_s: float) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"X-API-Key": api_key} if api_key else {}
    if url is not None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s) as client:
            yield client
        return
    from services.serve.apps import one_machine_app

    app = one_machine_app(index=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cbir", headers=headers,
                                     timeout=timeout_s) as client:
            yield client


async def fetch_duplicates(*, url: str | None, api_key: str | None = None, timeout_s: float = 30.0,
                           threshold: float | None = None, limit: int = 50, offset: int = 0,
                           deadline_s: float = 3600.0) -> dict[str, Any]:
    """The answer of `GET /duplicates` of the gateway at `url` (None: in this process), asked again while it is
    computed (202); `SearchApiError` for an error answer (its `detail`), `httpx.TransportError` for a gateway that
    cannot be reached."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if threshold is not None:
        params["threshold"] = threshold
    deadline = time.monotonic() + deadline_s
    async with _client(url, api_key, timeout_s) as client:
        while True:
            response = await client.get("/duplicates", params=params)
            if response.status_code != 202 or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
    if response.status_code != 200:
        raise SearchApiError(f"GET /duplicates answered {response.status_code}: {_detail(response)}")
    return response.json()


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:200]


def render_groups(body: dict[str, Any]) -> str:
    """The groups as a table: one block a group, the suggested keep marked, members with similarity, size,
    date, label and file."""
    lines = [f"{body['groups_total']} groups of near duplicates among {body['documents']} images "
             f"(threshold {body['threshold']:g}; groups {body['offset'] + 1}–{body['offset'] + len(body['groups'])})"]
    for number, group in enumerate(body["groups"], start=body["offset"] + 1):
        lines.append(f"\ngroup {number}: {len(group['members'])} images")
        for member in group["members"]:
            mark = "keep" if member["id"] == group["keep"] else ""
            when = datetime.fromtimestamp(member["mtime"], UTC).strftime("%Y-%m-%d")
            lines.append(f"  {mark:4}  {member['similarity']:.3f}  {member['id']}  {member['size']:>9,} B  {when}  "
                         f"{member['label'] or '-':<10}  {member['filename']}")
    if body.get("unreadable"):
        lines.append(f"\n{body['unreadable']} images left out: their file is gone or does not decode")
    return "\n".join(lines)
