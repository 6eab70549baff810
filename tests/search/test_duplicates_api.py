"""GET /duplicates and the near-duplicate check of POST /images, through the real gateway (tiny model), on the
embedded store and on Elasticsearch (the HTTP double)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from duplicates_calibration import variants
from es_double import EsDouble
from servers import asgi_client

from services.cli import main as cbir
from services.search.duplicates import DEFAULT_THRESHOLD

pytestmark = pytest.mark.anyio
COPIES = ("jpeg", "resize", "shift", "bright")
LOOPBACK = "http://127.0.0.1"  # where a development server accepts writes without a key


@pytest.fixture
async def gateway(indexed_state: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway on the indexed mini collection (500 images), writes allowed."""
    from services.serve.apps import gateway_app

    async with asgi_client(gateway_app(), base_url=LOOPBACK) as client:
        yield client


async def finished_duplicates(client: httpx.AsyncClient, *, deadline_s: float = 60.0, **params: object) -> dict:
    """GET /duplicates until it answers the groups (202 meanwhile), within `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    while True:
        response = await client.get("/duplicates", params=params)
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202, response.text
        assert time.monotonic() < deadline, "the duplicates job did not finish in time"
        await asyncio.sleep(0.05)


async def add(client: httpx.AsyncClient, data: bytes, name: str) -> dict:
    response = await client.post("/images", files={"file": (name, data, "application/octet-stream")})
    assert response.status_code in (200, 201), response.text
    return response.json()


async def add_copies(client: httpx.AsyncClient, originals: list[Path]) -> dict[str, set[str]]:
    """Each original and four copies of it added through the API: the ids of each original's family."""
    families = {}
    for path in originals:
        copies = variants(path.read_bytes())
        ids = {(await add(client, copies[kind], f"{kind}.png"))["id"] for kind in ("original", *COPIES)}
        families[(await add(client, copies["original"], "original.jpg"))["id"]] = ids
    return families


def check_groups(body: dict, families: dict[str, set[str]]) -> None:
    """Each family is one group of its own: its copies with their original, and no two originals together."""
    group_of = {member["id"]: number for number, group in enumerate(body["groups"]) for member in group["members"]}
    for original, ids in families.items():
        assert {group_of.get(i) for i in ids} == {group_of[original]}, f"the copies of {original} are split"
    assert len({group_of[original] for original in families}) == len(families), "two originals share a group"


def originals(mini_collection: Path, count: int) -> list[Path]:
    """`count` test images (not indexed), spread over the classes."""
    paths = sorted((mini_collection / "test").glob("*/*.jpg"), key=lambda p: (p.name, p.parent.name))
    return paths[:count]


async def test_copies_added_through_the_api_are_grouped_with_their_original(
        gateway: httpx.AsyncClient, mini_collection: Path) -> None:
    before = await finished_duplicates(gateway)
    assert before["documents"] == 500 and before["threshold"] == pytest.approx(DEFAULT_THRESHOLD)
    families = await add_copies(gateway, originals(mini_collection, 6))
    body = await finished_duplicates(gateway, limit=1000)
    assert body["documents"] == 500 + 6 * 5
    check_groups(body, families)
    for group in body["groups"]:
        members = group["members"]
        assert members[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
        assert all(DEFAULT_THRESHOLD <= m["similarity"] <= 1.0 for m in members)
        biggest = max(members, key=lambda m: (m["size"], -m["mtime"]))
        assert group["keep"] == biggest["id"]
        image = await gateway.get(members[1]["image_url"])
        assert image.status_code == 200
    page = await finished_duplicates(gateway, limit=2, offset=1)
    assert page["groups"] == body["groups"][1:3] and page["groups_total"] == body["groups_total"]


async def test_an_upload_says_which_images_it_is_a_near_duplicate_of(
        gateway: httpx.AsyncClient, mini_collection: Path) -> None:
    copies = variants((mini_collection / "train" / "ship" / "0003.jpg").read_bytes())
    unchecked = await add(gateway, copies["jpeg"], "first.jpg")
    assert unchecked["near_duplicate_of"] is None  # the collection's signatures were never computed: now they are
    await finished_duplicates(gateway)
    bright = await add(gateway, copies["bright"], "bright.png")
    assert unchecked["id"] in bright["near_duplicate_of"]
    [indexed] = set(bright["near_duplicate_of"]) - {unchecked["id"]}  # the original, indexed from the collection
    assert (await gateway.get(f"/images/{indexed}/meta")).json()["filename"] == "0003.jpg"
    distinct = await add(gateway, (mini_collection / "test" / "frog" / "0002.jpg").read_bytes(), "frog.jpg")
    assert distinct["near_duplicate_of"] == []
    assert (await gateway.delete(f"/images/{unchecked['id']}")).status_code == 204
    shifted = await add(gateway, copies["shift"], "shift.png")
    assert indexed in shifted["near_duplicate_of"] and unchecked["id"] not in shifted["near_duplicate_of"]


async def test_a_large_collection_answers_202_with_progress_then_the_groups(
        indexed_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.serve.apps import gateway_app

    monkeypatch.setenv("CBIR_DUPLICATES_WAIT_S", "0")
    async with asgi_client(gateway_app(), base_url=LOOPBACK) as client:
        first = await client.get("/duplicates", params={"threshold": 0.95})
        assert first.status_code == 202, first.text
        assert first.headers["retry-after"] == "1"
        pending = first.json()
        assert pending["status"] == "running" and pending["phase"] in {"listing", "signing", "comparing"}
        assert "ask again" in pending["detail"]
        body = await finished_duplicates(client, threshold=0.95)
        assert body["threshold"] == 0.95
        assert (await client.get("/duplicates", params={"threshold": 0.95})).status_code == 200  # kept


async def test_bad_parameters_are_422(gateway: httpx.AsyncClient) -> None:
    for params in ({"threshold": 0}, {"threshold": 1.5}, {"limit": 0}, {"offset": -1}, {"threshold": "x"}):
        response = await gateway.get("/duplicates", params=params)
        assert response.status_code == 422, (params, response.text)
        assert "detail" in response.json()


async def test_elasticsearch_groups_like_the_embedded_store(
        cbir_env: Path, mini_collection: Path, es_double: EsDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.serve.apps import gateway_app

    for name, value in (("CBIR_BACKEND", "elasticsearch"), ("CBIR_ES_URL", es_double.url),
                        ("CBIR_ES_INDEX", "cbir-duplicates"), ("CBIR_ES_TIMEOUT_S", "5")):
        monkeypatch.setenv(name, value)
    await asyncio.to_thread(cbir, ["index", "--no-progress"])
    async with asgi_client(gateway_app(), base_url=LOOPBACK) as client:
        await finished_duplicates(client)
        families = await add_copies(client, originals(mini_collection, 3))
        body = await finished_duplicates(client, limit=1000)
        assert body["documents"] == 500 + 3 * 5
        check_groups(body, families)
