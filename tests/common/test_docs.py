"""The OpenAPI explorers of `services/common/docs.py`, on both services: `/docs` and `/redoc` reference only
same-origin URLs, every one of which the service answers itself with the right type (no CDN, no internet)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from html.parser import HTMLParser

import httpx
import pytest
from fastapi import FastAPI

from services.common.docs import install_offline_docs
from services.embedder.settings import EmbedderSettings
from services.search.settings import SearchSettings
from services.serve.apps import embedder_app, gateway_app

pytestmark = pytest.mark.anyio

# What each kind of reference must be answered with.
CONTENT_TYPES = {"script": ("text/javascript", "application/javascript"), "stylesheet": ("text/css",),
                 "icon": ("image/",)}
APPS: dict[str, Callable[[], FastAPI]] = {
    "search": lambda: gateway_app(SearchSettings()),
    "embedder": lambda: embedder_app(EmbedderSettings()),
}


class References(HTMLParser):
    """The URLs a page's `<script src>` and `<link href>` load, by kind (script, stylesheet, icon)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "script" and attributes.get("src"):
            self.found.append(("script", attributes["src"]))
        elif tag == "link" and attributes.get("href"):
            rel = attributes.get("rel") or ""
            self.found.append(("stylesheet" if "stylesheet" in rel else "icon" if "icon" in rel else rel,
                               attributes["href"]))


def references(html: str) -> list[tuple[str, str]]:
    parser = References()
    parser.feed(html)
    return parser.found


@pytest.fixture(params=sorted(APPS))
def app(request: pytest.FixtureRequest) -> FastAPI:
    """Each real service app (its lifespan is not entered: the docs need neither model nor index)."""
    return APPS[request.param]()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
        yield client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_explorers_load_only_what_the_service_serves_itself(client: httpx.AsyncClient, page: str) -> None:
    response = await client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "http://" not in response.text and "https://" not in response.text, response.text  # no CDN, no fonts
    # and the browser refuses whatever the bundled scripts would fetch from elsewhere (ReDoc's logo)
    assert response.headers["content-security-policy"].startswith("default-src 'self';")
    assert "http" not in response.headers["content-security-policy"]
    found = references(response.text)
    assert {kind for kind, _ in found} >= ({"script", "stylesheet", "icon"} if page == "/docs" else {"script", "icon"})
    for kind, url in found:
        assert url.startswith("/") and not url.startswith("//"), url  # same origin
        asset = await client.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["content-type"].startswith(CONTENT_TYPES[kind]), (url, asset.headers["content-type"])
        assert len(asset.content) > 1000, url


async def test_the_schema_and_the_page_paths_are_unchanged(app: FastAPI, client: httpx.AsyncClient) -> None:
    assert (app.docs_url, app.redoc_url, app.openapi_url) == ("/docs", "/redoc", "/openapi.json")
    paths = [getattr(route, "path", None) for route in app.router.routes]
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert paths.count(path) == 1, (path, paths)  # FastAPI's CDN pages replaced, not shadowed
    schema = (await client.get("/openapi.json")).json()
    assert schema == app.openapi()
    assert not {"/docs", "/redoc"} & set(schema["paths"]) and not any("/docs/" in path for path in schema["paths"])
    assert (await client.get("/docs/oauth2-redirect")).status_code == 200


async def test_the_pages_follow_a_proxy_prefix() -> None:
    app = FastAPI()
    install_offline_docs(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path="/cbir"),
                                 base_url="http://service") as client:
        swagger, redoc = (await client.get("/cbir/docs")).text, (await client.get("/cbir/redoc")).text
        assert (await client.get("/cbir/docs/assets/swagger-ui.css")).status_code == 200
    assert "'/cbir/openapi.json'" in swagger and "/cbir/docs/oauth2-redirect" in swagger
    assert {url for _, url in references(swagger)} == {"/cbir/docs/assets/swagger-ui-bundle.js",
                                                      "/cbir/docs/assets/swagger-ui.css",
                                                      "/cbir/docs/assets/favicon.png"}
    assert 'spec-url="/cbir/openapi.json"' in redoc and "/cbir/docs/assets/redoc.standalone.js" in redoc


async def test_an_app_without_pages_gets_none() -> None:
    app = FastAPI(docs_url=None, redoc_url=None)
    install_offline_docs(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
        assert [(await client.get(url)).status_code for url in ("/docs", "/redoc", "/docs/assets/swagger-ui.css")] \
            == [404, 404, 404]
        assert (await client.get("/openapi.json")).status_code == 200
