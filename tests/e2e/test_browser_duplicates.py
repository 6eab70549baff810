"""The web page's duplicates view in a real browser (Debian's chromium through Playwright, every request off this
machine refused), against a real `cbir serve`: copies added through the API show as groups side by side, the
suggested one to keep marked, and "Keep" deletes the group's other images."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from duplicates_calibration import variants
from playwright.sync_api import Page, expect

from services.search.duplicates import DEFAULT_THRESHOLD

pytestmark = pytest.mark.slow  # a server subprocess and a browser
RENDER_TIMEOUT_MS = 20_000


def add_copies(url: str, original: Path) -> set[str]:
    copies = variants(original.read_bytes())
    ids = set()
    for kind in ("original", "jpeg", "bright"):
        response = httpx.post(f"{url}/images", files={"file": (f"{kind}.png", copies[kind])}, timeout=30)
        assert response.status_code in (200, 201), response.text
        ids.add(response.json()["id"])
    return ids


def test_the_duplicates_view_shows_groups_and_keeps_one(page: Page, outside_requests: list[str], served: tuple,
                                                        mini_collection: Path, tmp_path: Path) -> None:
    url, _, _ = served
    family = add_copies(url, mini_collection / "test" / "horse" / "0001.jpg")
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{url}/")
    page.get_by_role("link", name="Duplicates").click()
    expect(page.locator("#dup-view")).to_be_visible()
    expect(page.locator(".layout")).to_be_hidden()
    expect(page.locator("#dup-status")).to_contain_text("of near duplicates among", timeout=RENDER_TIMEOUT_MS)
    group = page.locator(".dup-group").filter(has=page.locator(f'[data-id="{sorted(family)[0]}"]'))
    expect(group).to_have_count(1)
    members = group.locator(".dup-member")
    expect(members).to_have_count(3)
    assert set(members.evaluate_all("tiles => tiles.map(tile => tile.dataset.id)")) == family
    expect(group.locator(".dup-member.keep .badge")).to_have_text("keep")
    boxes = [members.nth(i).bounding_box() for i in range(3)]
    assert boxes[0]["y"] == boxes[1]["y"] == boxes[2]["y"] and boxes[0]["x"] < boxes[1]["x"] < boxes[2]["x"]
    expect(page.locator("#dup-threshold")).to_have_value(str(DEFAULT_THRESHOLD))
    page.screenshot(path=tmp_path / "duplicates.png", full_page=True)
    print(f"screenshot: {tmp_path / 'duplicates.png'}")

    kept = group.locator(".dup-member.keep").get_attribute("data-id")
    group.locator(".dup-member.keep").get_by_role("button", name="Keep").click()
    expect(page.locator("#dup-status")).to_have_text("Deleted 2 images.")
    expect(page.locator(f'.dup-group [data-id="{kept}"]')).to_have_count(0)  # a group of one is no group
    for id in family:
        status = httpx.get(f"{url}/images/{id}/meta", timeout=30).status_code
        assert status == (200 if id == kept else 404)
    page.get_by_role("link", name="Back to search").click()
    expect(page.locator(".layout")).to_be_visible()
    expect(page.locator("#dup-view")).to_be_hidden()
    assert outside_requests == []
    assert errors == []
