"""Fixtures of the whole-system tests: a real `cbir serve` on a free localhost port, and Debian's chromium
driven through Playwright with every request off this machine refused and recorded."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright
from processes import free_port, start_cbir, stop_process, subprocess_env
from servers import wait_for_http

CHROMIUM = Path("/usr/bin/chromium")  # Debian's: `playwright install` cannot download browsers here
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
LOCAL_HOSTS = {"127.0.0.1"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_bundle_dir: Path,
           mini_collection: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`cbir serve` (tiny bundle, mini collection) as a subprocess on a free localhost port, once ready:
    its URL, the process and its log. One per test module."""
    work = tmp_path_factory.mktemp("serve")
    port, log = free_port(), work / "serve.log"
    env = subprocess_env(tiny_bundle_dir, mini_collection, work / "state")
    process = start_cbir("serve", "--host", "127.0.0.1", "--port", str(port), env=env, cwd=work, log=log)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{url}/healthz", timeout_s=180, process=process)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}\n{log.read_text()[-3000:]}")
        yield url, process, log
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless. Missing, it skips the test, except under CI (`CI` set), where it fails.

    One per module, never per session: while Playwright's sync API runs, its event loop is this thread's, and
    the async tests of any later module could not start their own."""
    if not CHROMIUM.is_file():
        reason = f"the browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run them, and .ci/run installs it")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def outside_requests() -> list[str]:
    """Every URL the test's page tried to fetch from anywhere but this machine (each one refused)."""
    return []


@pytest.fixture
def page(chromium: Browser, outside_requests: list[str]) -> Iterator[Page]:
    """A fresh browser page that can reach 127.0.0.1 only: anything else is aborted and recorded in
    `outside_requests`, so a page that needs the internet fails here as it would offline."""

    def local_only(route: Route) -> None:
        if urlsplit(route.request.url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            outside_requests.append(route.request.url)
            route.abort("internetdisconnected")

    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    context.route("**/*", local_only)
    try:
        yield context.new_page()
    finally:
        context.close()
