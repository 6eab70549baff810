"""The OpenAPI explorers, `/docs` (Swagger UI) and `/redoc` (ReDoc), with their scripts and styles served by the
service itself from the fastapi-offline package: FastAPI's own pages load them from a CDN, and are blank offline."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs/assets"
# fastapi-offline's static folder: swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png.
ASSETS_PACKAGE = ("fastapi_offline", "static")
# The browser may load the pages' scripts, styles, images and data from this server only. ReDoc's bundle shows
# Redocly's logo from cdn.redoc.ly (no option turns it off); this refuses it, and the logo hides itself.
# Inline script and style: FastAPI's page starts Swagger UI inline, ReDoc injects its styles; blob: workers:
# ReDoc's search.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; worker-src 'self' blob:")


def install_offline_docs(app: FastAPI) -> None:
    """Replace FastAPI's CDN-loading `/docs` and `/redoc` pages (at whatever `docs_url` and `redoc_url` the app
    was created with) by pages that load everything from `ASSETS_URL` on the same server.

    `/openapi.json` and Swagger UI's OAuth2 redirect page stay as FastAPI made them; an app created without
    an OpenAPI schema, or without either page, gets none here either.

        app = FastAPI(title="cbir search")
        install_offline_docs(app)  # GET /docs, GET /redoc, GET /docs/assets/swagger-ui-bundle.js, ...
    """
    if not app.openapi_url or not (app.docs_url or app.redoc_url):
        return
    replaced = {app.docs_url, app.redoc_url} - {None}
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) not in replaced]
    app.mount(ASSETS_URL, StaticFiles(packages=[ASSETS_PACKAGE]), name="docs-assets")
    if app.docs_url:
        app.add_route(app.docs_url, _swagger_ui_page, include_in_schema=False)
    if app.redoc_url:
        app.add_route(app.redoc_url, _redoc_page, include_in_schema=False)


async def _swagger_ui_page(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy's prefix, as FastAPI's own page
    redirect = app.swagger_ui_oauth2_redirect_url
    return _same_origin_only(get_swagger_ui_html(
        openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js", swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png", oauth2_redirect_url=redirect and root + redirect,
        init_oauth=app.swagger_ui_init_oauth, swagger_ui_parameters=app.swagger_ui_parameters,
    ))


async def _redoc_page(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    root = request.scope.get("root_path", "").rstrip("/")
    return _same_origin_only(get_redoc_html(
        openapi_url=root + app.openapi_url, title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js", redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,  # ReDoc falls back to the system's fonts
    ))


def _same_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page
