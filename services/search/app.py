"""The search gateway: `POST /search` with an image → ranked similar images as JSON.

    POST /search        multipart `file`, query `k` (1–1000) → prediction + ranked hits
    GET  /images/{id}   an indexed image (never anything outside the collection)
    GET  /              a small web page to try it
    GET  /healthz       200 only when the model and the store are ready
    GET  /docs          OpenAPI explorer
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from services.common.collection import find_data_dir
from services.common.embedding import EmbeddingService, HttpEmbeddingClient
from services.common.errors import CbirError, CollectionError
from services.common.http import (
    ERROR_RESPONSES,
    ErrorResponse,
    install_http_edge,
    verify_api_key,
)
from services.common.images import UploadDecoder
from services.common.stores.base import VectorStore
from services.common.stores.factory import create_store
from services.search.engine import SearchEngine
from services.search.schemas import HealthResponse, QueryPrediction, SearchHit, SearchResponse
from services.search.settings import SearchSettings

logger = logging.getLogger(__name__)


def create_embedding_service(settings: SearchSettings) -> EmbeddingService:
    """The embedder named by `CBIR_EMBEDDER_URL`, or the model in this process."""
    if settings.embedder_url is not None:
        api_key = settings.embedder_api_key.get_secret_value() if settings.embedder_api_key else None
        return HttpEmbeddingClient(str(settings.embedder_url), timeout_s=settings.embedder_timeout_s,
                                   retries=settings.embedder_retries, api_key=api_key)
    from services.embedder.app import create_service

    service = create_service(settings)
    service.start()
    return service


def create_app(settings: SearchSettings | None = None, *, embedder: EmbeddingService | None = None,
               store: VectorStore | None = None) -> FastAPI:
    """The gateway; `embedder` and `store` may be handed in (one-machine mode and tests)."""
    settings = settings or SearchSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = embedder or await run_in_threadpool(create_embedding_service, settings)
        vectors = store or create_store(settings)
        try:
            data_dir = find_data_dir(settings.data_dir)
        except CollectionError as exc:
            logger.warning("images will not be served: %s", exc)
            data_dir = None
        app.state.engine = SearchEngine(service, vectors, data_dir=data_dir)
        try:
            await app.state.engine.ensure_ready()
        except CbirError as exc:
            logger.warning("not ready yet: %s", exc.message)
        try:
            yield
        finally:  # close only what this app created; what was handed in belongs to the caller
            if store is None:
                await vectors.close()
            if embedder is None:
                await service.close()

    app = FastAPI(title="cbir search", version="0.1.0", lifespan=lifespan,
                  summary="Upload an image, get the most similar indexed images.")
    app.state.settings = settings
    app.state.decoder = UploadDecoder(settings.max_concurrent_decodes)
    install_http_edge(app, service="search", max_upload_bytes=settings.max_upload_bytes,
                      cors_origins=settings.cors_origins)
    app.include_router(router)
    return app


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
    image = await request.app.state.decoder.decode(await file.read(), max_bytes=settings.max_upload_bytes,
                                                   max_pixels=settings.max_image_pixels)
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
async def healthz(request: Request, engine: EngineDep) -> HealthResponse | JSONResponse:
    """200 only when the model and the store are ready."""
    try:
        model_version = await engine.ensure_ready()
        documents = await engine.store.count()
    except CbirError as exc:
        return JSONResponse({"detail": exc.message}, status_code=503, headers={"Retry-After": "5"})
    return HealthResponse(status="ok", model_version=model_version, backend=engine.store.name, documents=documents)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def home() -> HTMLResponse:
    return HTMLResponse(files("services.search").joinpath("static/index.html").read_text())
