"""The embedder service: `POST /embed` turns uploaded images into search vectors.

    POST /embed   multipart `files` (one or more images) → vector, label, confidence per image
    GET  /info    bundle metadata and vector settings
    GET  /healthz 200 once the model is loaded and warmed up
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, UploadFile
from pydantic import BaseModel, Field

from services.common.collector import freeze_startup_objects
from services.common.embedding import Purpose
from services.common.errors import ImageError, ModelNotLoadedError
from services.common.http import (
    ERROR_RESPONSES,
    install_http_edge,
    verify_api_key,
)
from services.common.images import UploadDecoder
from services.common.status import Status
from services.embedder.runtime import LocalEmbeddingService
from services.embedder.settings import EmbedderSettings

logger = logging.getLogger(__name__)


class ImageEmbedding(BaseModel):
    vector: list[float]
    label: str
    confidence: float


class EmbedResponse(BaseModel):
    model_version: str
    dims: int
    embeddings: list[ImageEmbedding]


class InfoResponse(BaseModel):
    model_version: str
    dims: int
    classes: list[str]
    device: str
    pca_dims: int
    onehot_weight: float
    image_size: int = Field(description="side of the square images the model takes (decode uploads to it)")
    resize: str = Field(description="resample filter uploads are decoded with (services.common.images)")
    bundle: dict


def create_app(settings: EmbedderSettings, *, service_factory: Callable[[], LocalEmbeddingService]) -> FastAPI:
    """The embedder service. Its lifespan loads the model with `service_factory` (blocking: seconds, so in a
    thread) and stops it on shutdown; `/healthz` is 200 once the model is warmed up. The composition root
    (`services.serve.apps.embedder_app`) says what the factory builds; tests pass their own."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await asyncio.to_thread(service_factory)
        app.state.service = service
        logger.info("embedder ready: %s", (await service.info()).model_version)
        freeze_startup_objects()
        try:
            yield
        finally:
            app.state.service = None
            await service.close()

    app = FastAPI(title="cbir embedder", version="0.1.0", lifespan=lifespan,
                  summary="Images in, VGG-16 search vectors out.")
    app.state.settings = settings
    app.state.decoder = UploadDecoder(settings.max_concurrent_decodes, max_bytes=settings.max_upload_bytes,
                                      max_pixels=settings.max_image_pixels)
    app.state.service = None
    install_http_edge(app, service="embedder", max_upload_bytes=settings.max_upload_bytes,
                      cors_origins=settings.cors_origins)
    app.include_router(router)
    return app


def get_service(request: Request) -> LocalEmbeddingService:
    service = request.app.state.service
    if service is None:
        raise ModelNotLoadedError("the model is still loading")
    return service


ServiceDep = Annotated[LocalEmbeddingService, Depends(get_service)]


router = APIRouter(tags=["embedder"])


@router.post("/embed", response_model=EmbedResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(verify_api_key)])
async def embed(request: Request, service: ServiceDep,
                files: Annotated[list[UploadFile], File(description="one or more images")],
                purpose: Annotated[Purpose, Query(description="query: the bundle's test-time views (search); "
                                                  "index: its index-side views (indexing)")] = "query",
                ) -> EmbedResponse:
    """Embed one or more uploaded images (JPEG, PNG, GIF, WebP, BMP, TIFF)."""
    settings: EmbedderSettings = request.app.state.settings
    if len(files) > settings.max_images_per_request:
        raise ImageError(f"{len(files)} images in one request; the limit is {settings.max_images_per_request}")
    model = await service.info()
    images = []
    for position, upload in enumerate(files):
        data = await upload.read()
        try:  # as the bundle says: its size and resample filter
            images.append(await request.app.state.decoder.decode(data, size=model.image_size, resample=model.resize))
        except ImageError as exc:
            exc.message = f"file {position} ({upload.filename}): {exc.message}"
            raise
    embeddings = await service.embed(np.stack(images), purpose=purpose)
    return EmbedResponse(
        model_version=model.model_version,
        dims=model.dims,
        embeddings=[ImageEmbedding(vector=e.vector.tolist(), label=e.label, confidence=e.confidence)
                    for e in embeddings],
    )


@router.get("/info", response_model=InfoResponse, responses={503: ERROR_RESPONSES[503]})
async def info(service: ServiceDep) -> InfoResponse:
    """The model bundle's metadata, the vector settings in force, and how to decode images for it."""
    model = await service.info()
    return InfoResponse(model_version=model.model_version, dims=model.dims, classes=model.classes,
                        device=model.device, pca_dims=model.pca_dims, onehot_weight=model.onehot_weight,
                        image_size=model.image_size, resize=model.resize, bundle=model.metadata)


@router.get("/healthz", responses={503: ERROR_RESPONSES[503]})
async def healthz(service: ServiceDep) -> dict[str, object]:
    """200 once the model is loaded (`warming_up` while it compiles, with `warm_up`: batch sizes `compiled` of
    `total`; null when it is not compiled), else 503."""
    status = Status.warming_up if service.warming_up else Status.ready
    progress = service.warm_up_progress
    return {"status": status, "model_version": (await service.info()).model_version,
            "warm_up": None if progress is None else {"compiled": progress[0], "total": progress[1]}}
