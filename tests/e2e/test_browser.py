"""The gateway's pages in a real browser, as a person uses them: Debian's chromium, driven by Playwright,
against a real `cbir serve` (tiny bundle, mini collection), with every request off this machine refused.

Each test saves a screenshot under its tmp_path and prints where (`pytest -s` shows it). The page comes
first in each signature, so that without chromium a test skips (or, under CI, fails) before a server starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage, Page, expect

pytestmark = pytest.mark.slow  # a server subprocess and a browser

RENDER_TIMEOUT_MS = 20_000
SEARCH_OPERATION = "search_search_post"  # FastAPI's operation id of POST /search


def screenshot(page: Page, path: Path) -> None:
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")


def console_errors(page: Page) -> list[str]:
    """The page's console errors from now on (a refused load or a failing script shows there)."""
    errors: list[str] = []

    def record(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", record)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


def test_swagger_ui_renders_the_search_operation_offline(page: Page, outside_requests: list[str], served: tuple,
                                                         tmp_path: Path) -> None:
    url, _, _ = served
    errors = console_errors(page)
    page.goto(f"{url}/docs")
    operation = page.locator(f"#operations-search-{SEARCH_OPERATION}")
    expect(operation).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    operation.locator(".opblock-summary-control").click()
    upload = operation.locator('[data-property-name="file"] .parameter__name')
    expect(upload).to_contain_text("file")
    expect(operation.locator('[data-param-name="k"]')).to_be_visible()
    screenshot(page, tmp_path / "docs.png")
    assert outside_requests == []
    assert errors == []


def test_redoc_renders_the_search_operation_offline(page: Page, outside_requests: list[str], served: tuple,
                                                    tmp_path: Path) -> None:
    url, _, _ = served
    errors = console_errors(page)
    page.goto(f"{url}/redoc")
    operation = page.locator(f'[id="tag/search/operation/{SEARCH_OPERATION}"]')
    expect(operation).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    expect(operation).to_contain_text("/search")
    expect(operation).to_contain_text("multipart/form-data")
    expect(operation.get_by_text("file", exact=True)).to_be_visible()
    screenshot(page, tmp_path / "redoc.png")
    assert outside_requests == []
    # ReDoc's attribution logo, refused by the page's Content-Security-Policy before any request: nothing else.
    assert all("cdn.redoc.ly" in error and "Content Security Policy" in error for error in errors), errors


def test_the_web_page_searches_by_an_uploaded_image(page: Page, outside_requests: list[str], served: tuple,
                                                    mini_collection: Path, tmp_path: Path) -> None:
    url, _, _ = served
    page.goto(f"{url}/")
    expect(page.locator("#health")).to_contain_text("Ready", timeout=RENDER_TIMEOUT_MS)
    page.locator("input[type=file]").set_input_files(mini_collection / "test" / "cat" / "0000.jpg")
    page.get_by_role("button", name="Search").click()
    hits = page.locator("#hits figure")
    expect(hits.first).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    expect(hits.first.locator("figcaption")).to_contain_text(" · ")  # "<label> · <score>"
    caption = hits.first.locator("figcaption span").first.inner_text()
    label, score = caption.split(" · ")
    assert label and 0.0 <= float(score) <= 2.0, caption
    expect(page.locator("#status")).to_contain_text("Predicted class")
    expect(hits.first.locator("img")).to_have_js_property("complete", True)
    assert hits.first.locator("img").evaluate("image => image.naturalWidth") > 0  # /images/{id} answered
    screenshot(page, tmp_path / "search.png")
    assert outside_requests == []
