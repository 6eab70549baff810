"""Issue 27's check of near duplicates, on a real `cbir serve` (tiny bundle, mini collection of 500 images): copies
of 50 images added through the API are grouped each with its own original, no two originals share a group, and
each copy's upload names its original or an earlier copy of it, and nothing else, in `near_duplicate_of`."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from duplicates_calibration import variants

pytestmark = pytest.mark.slow  # a server subprocess and 250 uploads
COPIES = ("jpeg", "resize", "shift", "bright")


def duplicates(client: httpx.Client, *, deadline_s: float = 120.0) -> dict:
    deadline = time.monotonic() + deadline_s
    while (response := client.get("/duplicates", params={"limit": 1000})).status_code == 202:
        assert time.monotonic() < deadline, "GET /duplicates did not finish in time"
        time.sleep(0.1)
    assert response.status_code == 200, response.text
    return response.json()


def add(client: httpx.Client, data: bytes) -> dict:
    response = client.post("/images", files={"file": ("copy.png", data)})
    assert response.status_code in (200, 201), response.text
    return response.json()


def test_copies_of_50_images_are_grouped_with_their_own_original(served: tuple, mini_collection: Path) -> None:
    url, _, _ = served
    originals = sorted((mini_collection / "test").glob("*/*.jpg"))  # 5 a class, not indexed
    assert len(originals) == 50
    with httpx.Client(base_url=url, timeout=60) as client:
        assert duplicates(client)["documents"] == 500  # signs the collection: uploads are checked from now on
        families: dict[str, set[str]] = {}
        for path in originals:
            made = variants(path.read_bytes())
            original = add(client, made["original"])
            assert original["near_duplicate_of"] == []
            families[original["id"]] = {original["id"]}
            for kind in COPIES:
                copy = add(client, made[kind])
                assert set(copy["near_duplicate_of"]) & families[original["id"]], (path, kind)  # its original or a copy
                assert set(copy["near_duplicate_of"]) <= families[original["id"]], (path, kind)  # nothing else
                families[original["id"]].add(copy["id"])
        body = duplicates(client)
        metrics = client.get("/metrics/").text
    assert body["documents"] == 500 + 50 * 5
    group_of = {member["id"]: number for number, group in enumerate(body["groups"]) for member in group["members"]}
    for original, ids in families.items():
        assert {group_of.get(i) for i in ids} == {group_of[original]}, f"the copies of {original} are not together"
    assert len({group_of[original] for original in families}) == 50, "two originals share a group"
    assert max(len(group["members"]) for group in body["groups"]) <= 10  # no giant group
    total = re.search(r'cbir_stage_seconds_sum\{stage="near_duplicates"\} ([0-9.e+-]+)', metrics)
    count = re.search(r'cbir_stage_seconds_count\{stage="near_duplicates"\} ([0-9.e+-]+)', metrics)
    assert total and count and float(count.group(1)) == 250
    uploads = re.search(r'cbir_http_request_seconds_sum\{method="POST",route="/images",service="search"\} ([0-9.e+-]+)',
                        metrics)
    assert uploads
    print(f"near-duplicate check: {float(total.group(1)) / 250 * 1000:.2f} ms of a mean upload's "
          f"{float(uploads.group(1)) / 250 * 1000:.2f} ms (over 250 uploads, 500-750 documents)")
