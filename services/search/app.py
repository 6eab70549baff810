"""The search gateway: `POST /search` with an image → ranked similar images as JSON.

    POST /search        multipart `file`, query `k` (1–1000) → prediction + ranked hits
    GET  /images/{id}   an indexed image (never anything outside the collection)
    GET  /              a small web page to try it
    GET  /healthz       200 `ready`, or 503 `indexing` (with progress), `empty` or `failed`
    GET  /docs          OpenAPI explorer
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from importlib.resources import files
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from services import wiring
from services.common.collection import find_data_dir
from services.common.embedding import EmbeddingService
from services.common.errors import CbirError, CollectionError
from services.common.http import (
    ERROR_RESPONSES,
    ErrorResponse,
    error_body,
    install_http_edge,
    verify_api_key,
)
from services.common.images import UploadDecoder
from services.common.status import Status
from services.common.stores.base import VectorStore
from services.search.engine import IndexingJob, SearchEngine
from services.search.schemas import HealthResponse, QueryPrediction, SearchHit, SearchResponse
from services.search.settings import SearchSettings

logger = logging.getLogger(__name__)


def create_app(settings: SearchSettings | None = None, *,
               embedder_factory: Callable[[], EmbeddingService] | None = None,
               store_factory: Callable[[], VectorStore] | None = None,
               background: IndexingJob | None = None) -> FastAPI:
    """The gateway. Its lifespan builds the embedding service and the store (by default as the settings
    say, through `services.wiring`; tests pass factories), runs `background` (one-machine indexing) as a
    task while the server already answers, and closes all of it on shutdown."""
    settings = settings or SearchSettings.load()
    embedder_factory = embedder_factory or partial(wiring.build_embedding_service, settings)
    store_factory = store_factory or partial(wiring.build_store, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as resources:
            embedder = await asyncio.to_thread(embedder_factory)  # loading a model takes seconds
            resources.push_async_callback(embedder.close)
            store = store_factory()
            resources.push_async_callback(store.close)
            try:
                data_dir = find_data_dir(settings.data_dir)
            except CollectionError as exc:
                logger.warning("images will not be served: %s", exc.message)
                data_dir = None
            app.state.engine = engine = SearchEngine(embedder, store, data_dir=data_dir)
            if background is not None:
                # Closed before the store and the embedder it uses (the stack unwinds last in, first out).
                resources.push_async_callback(_cancel, engine.start_indexing(background))
            else:
                try:
                    await engine.ensure_ready()
                except CbirError as exc:  # it serves anyway: /healthz says why, and it recovers by itself
                    logger.warning("not ready yet: %s", exc.message)
            yield

    app = FastAPI(title="cbir search", version="0.1.0", lifespan=lifespan,
                  summary="Upload an image, get the most similar indexed images.")
    app.state.settings = settings
    app.state.decoder = UploadDecoder(settings.max_concurrent_decodes)
    install_http_edge(app, service="search", max_upload_bytes=settings.max_upload_bytes,
                      cors_origins=settings.cors_origins)
    app.include_router(router)
    return app


async def _cancel(task: asyncio.Task[None]) -> None:
    """Stop a background run on shutdown; it flushes what it wrote before it ends."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def get_engine(request: Request) -> SearchEngine:
    return request.app.state.engine


EngineDep = Annotated[SearchEngine, Depends(get_engine)]
router = APIRouter()


@router.post("/search", response_model=SearchResponse, responses=ERROR_RESPONSES, tags=["search"],
             dependencies=[Depends(verify_api_key)])
async def search(
    request: Request,
    engine: EngineDep,
    file: Annotated[UploadFile, File(description="the query image: JPEG, PNG, GIF, WebP, BMP or TIFF")],
    k: Annotated[int, Query(ge=1, le=1000, description="how many hits to return")] = 10,
) -> SearchResponse:
    """Find the `k` indexed images most similar to the uploaded one."""
    started = time.perf_counter()
    settings: SearchSettings = request.app.state.settings
    model = await engine.embedder.info()  # the bundle says how its images are decoded
    image = await request.app.state.decoder.decode(await file.read(), max_bytes=settings.max_upload_bytes,
                                                   max_pixels=settings.max_image_pixels, size=model.image_size,
                                                   resample=model.resize)
    embedding, hits = await engine.search(image, k)
    return SearchResponse(
        query=QueryPrediction(predicted_label=embedding.label, confidence=embedding.confidence),
        hits=[SearchHit(id=hit.id, filename=hit.filename, label=hit.label, score=hit.score,
                        image_url=request.app.url_path_for("get_image", id=hit.id))
              for hit in hits],
        took_ms=round((time.perf_counter() - started) * 1000, 2),
    )


@router.get("/images/{id}", name="get_image", tags=["search"], response_class=FileResponse,
            responses={200: {"description": "The image file", "content": {"image/*": {}}},
                       404: {"model": ErrorResponse, "description": "No such indexed image"},
                       422: ERROR_RESPONSES[422]})
async def get_image(id: str, engine: EngineDep) -> FileResponse:
    """An indexed image by its document id."""
    path = await engine.image_path(id)
    if path is None:
        raise HTTPException(404, f"no indexed image with id {id!r}")
    return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})


@router.get("/healthz", response_model=HealthResponse, tags=["ops"],
            responses={503: ERROR_RESPONSES[503]})
async def healthz(engine: EngineDep) -> HealthResponse | JSONResponse:
    """200 `ready` when the model and the index are (`warming_up` while the model is still being compiled:
    it answers, slower); else 503 with `status` `indexing` (and `indexed` of `total` images so far),
    `empty` or `failed`, and `detail` saying why."""
    try:
        model_version = await engine.ensure_ready()
        documents = await engine.store.count()
    except CbirError as exc:
        body = {"status": Status.failed} | error_body(exc)  # an unavailable embedder or store is `failed`
        retry_after = "2" if body["status"] == Status.indexing else "5"
        return JSONResponse(body, status_code=503, headers={"Retry-After": retry_after})
    status = Status.warming_up if engine.embedder.warming_up else Status.ready
    return HealthResponse(status=status, model_version=model_version,
                          backend=engine.store.name, documents=documents)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def home() -> HTMLResponse:
    return HTMLResponse(files("services.search").joinpath("static/index.html").read_text())
