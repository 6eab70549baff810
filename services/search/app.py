"""The search gateway: search a collection by an uploaded image, an indexed one or several examples, and
add or delete the collection's images, as JSON.

    POST   /search               multipart `file` → the query's prediction + ranked hits
    POST   /search/batch         multipart `files` (≤ 32) → one search response (or error) per file
    POST   /search/examples      JSON {positive, negative, beta} → hits "more like these, less like those"
    GET    /images/{id}/similar  hits for an indexed image, itself excluded
    POST   /images               multipart `file` [+ `label`] → 201 added (200: those bytes already were)
    GET    /images/{id}          an indexed image's file (never anything outside its collection)
    GET    /images/{id}/meta     the document, without its vector
    DELETE /images/{id}          204; never a hit again
    GET    /collection           documents by source and label, model version, status
    GET    /duplicates           groups of near-identical images (services/search/duplicates_api.py)
    GET    /healthz              200 `ready`, or 503 `indexing` (with progress), `empty` or `failed`
    GET    /                     the web page; /docs and /redoc: the OpenAPI explorers (offline)

Every search takes `k` (1–1000), `offset` (offset + k ≤ 10,000), `label` (repeatable: only hits with one
of these ground-truth labels) and `same_class` (only hits the model put in the query's predicted class).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from importlib.resources import files
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Body, Depends, FastAPI, File, Form, HTTPException, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from services.common.collector import freeze_startup_objects
from services.common.documents import StoredImage
from services.common.embedding import EmbeddingService
from services.common.errors import CbirError, ImageError, ImageRegionError, IndexNotReadyError
from services.common.http import ERROR_RESPONSES, ErrorResponse, error_body, install_http_edge, verify_api_key
from services.common.images import Box, UploadDecoder
from services.common.status import Status
from services.common.stores.base import MAX_RESULT_WINDOW, CollectionStats, StoreHit, VectorStore
from services.search.access import verify_write_access, writes_open
from services.search.admission import AdmissionLimiter
from services.search.duplicate_jobs import DuplicateFinder
from services.search.duplicates_api import near_duplicate_of
from services.search.duplicates_api import router as duplicates_router
from services.search.engine import STAGE_SECONDS, Answer, IndexingJob, SearchEngine, SearchOptions
from services.search.schemas import (
    BatchError,
    BatchItemError,
    BatchSearchResponse,
    CollectionResponse,
    ExamplesRequest,
    HealthResponse,
    ImageAdded,
    ImageMeta,
    QueryPrediction,
    SearchHit,
    SearchResponse,
    WarmUpProgress,
    WatchedFolder,
)
from services.search.settings import MAX_BATCH_FILES, SearchSettings
from services.search.uploads import UploadFolder

logger = logging.getLogger(__name__)

# Served images can neither run script nor be sniffed into HTML, whoever uploaded them.
IMAGE_HEADERS = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "default-src 'none'; img-src 'self'; sandbox"}
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}


def create_app(settings: SearchSettings, *,
               embedder_factory: Callable[[], EmbeddingService],
               store_factory: Callable[[], VectorStore],
               background: IndexingJob | None = None,
               watch: Callable[[SearchEngine], Awaitable[object]] | None = None,
               watched: Callable[[], list[dict[str, Any]]] | None = None) -> FastAPI:
    """The gateway. Its lifespan builds the embedding service and the store with the factories (the composition
    root, `services.serve.apps`, says what they build; tests pass their own), runs `background` (one-machine
    indexing) and `watch` (one machine: swap to a model another process recorded, keep watched folders indexed)
    as tasks while the server already answers, and closes all of it on shutdown. `watched` reports the watched
    folders' states for `/collection`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as resources:
            embedder = await asyncio.to_thread(embedder_factory)  # loading a model takes seconds
            resources.push_async_callback(embedder.close)
            store = store_factory()
            resources.push_async_callback(store.close)
            uploads = UploadFolder(settings.uploads_dir, max_bytes=settings.max_upload_storage_bytes)
            app.state.engine = engine = SearchEngine(embedder, store, uploads=uploads)
            resources.pop_all()  # the engine owns them now (a swap replaces both)
            resources.push_async_callback(engine.close)
            app.state.duplicates = DuplicateFinder(wait_s=settings.duplicates_wait_s,
                                                   max_pixels=settings.max_image_pixels)
            resources.push_async_callback(app.state.duplicates.close)
            if background is not None:
                # An index that can be searched as it is stays searchable while the run updates it or builds
                # the next one; otherwise search answers 503 `indexing` until the run is done. The run is
                # cancelled before the engine closes (the stack unwinds last in, first out).
                task = engine.start_indexing(background, serving=await engine.servable())
                resources.push_async_callback(_cancel, task)
            if watch is not None:
                resources.push_async_callback(_cancel, asyncio.create_task(watch(engine), name="watch"))
            else:
                try:
                    await engine.ensure_ready()
                except CbirError as exc:  # it serves anyway: /healthz says why, and it recovers by itself
                    logger.warning("not ready yet: %s", exc.message)
            freeze_startup_objects()
            yield

    app = FastAPI(title="cbir search", version="0.1.0", lifespan=lifespan,
                  summary="Search images by an image, add your own, and browse the collection.")
    app.state.settings = settings
    app.state.watched = watched or list
    app.state.admission = AdmissionLimiter(settings.max_concurrent_searches,
                                           max_wait_s=settings.max_search_wait_ms / 1000)
    app.state.decoder = UploadDecoder(settings.max_concurrent_decodes, max_bytes=settings.max_upload_bytes,
                                      max_pixels=settings.max_image_pixels)
    install_http_edge(app, service="search", max_upload_bytes=settings.max_upload_bytes,
                      cors_origins=settings.cors_origins,
                      route_limits={"/search/batch": settings.max_batch_upload_bytes})
    app.include_router(router)
    app.include_router(duplicates_router)
    return app


async def _cancel(task: asyncio.Task[None]) -> None:
    """Stop a background run on shutdown; it flushes what it wrote before it ends."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def get_engine(request: Request) -> SearchEngine:
    return request.app.state.engine


def search_options(
    k: Annotated[int, Query(ge=1, le=1000, description="how many hits to return")] = 10,
    offset: Annotated[int, Query(ge=0, description="hits to skip: offset=10&k=10 is hits 10–19 of k=20")] = 0,
    label: Annotated[list[str] | None, Query(description="only hits with one of these ground-truth labels "
                                                          "(repeat the parameter for several)")] = None,
    same_class: Annotated[bool, Query(description="only hits the model put in the query's predicted class")] = False,
) -> SearchOptions:
    if offset + k > MAX_RESULT_WINDOW:
        raise RequestValidationError([{"loc": ("query", "offset"), "type": "value_error",
                                       "msg": f"offset + k must be at most {MAX_RESULT_WINDOW}, got {offset + k}"}])
    return SearchOptions(k=k, offset=offset, labels=frozenset(label) if label else None, same_class=same_class)


EngineDep = Annotated[SearchEngine, Depends(get_engine)]
OptionsDep = Annotated[SearchOptions, Depends(search_options)]
router = APIRouter()
NOT_FOUND = {404: {"model": ErrorResponse, "description": "No indexed image with that id"}}
WRITE_ERRORS = ERROR_RESPONSES | {
    403: {"model": ErrorResponse, "description": "Writes are not allowed here (CBIR_WRITE_API_KEYS; cross-site)"},
    507: {"model": ErrorResponse, "description": "The uploads folder is at its quota"},
}


def _hit(request: Request, hit: StoreHit, similarity: float | None) -> SearchHit:
    image = hit.image
    return SearchHit(id=image.id, filename=image.filename, label=image.label, predicted_label=image.predicted_label,
                     score=hit.score, similarity=similarity,
                     image_url=request.app.url_path_for("get_image", id=image.id))


def _answer(request: Request, prediction: QueryPrediction | None, answer: Answer, started: float) -> SearchResponse:
    hits = [_hit(request, hit, similarity) for hit, similarity in zip(answer.hits, answer.similarities, strict=True)]
    return SearchResponse(query=prediction, hits=hits,
                          model_version=answer.model_version, took_ms=round((time.perf_counter() - started) * 1000, 2))


def _predicted(answer: Answer) -> QueryPrediction | None:
    embedding = answer.embedding
    return None if embedding is None else QueryPrediction(predicted_label=embedding.label,
                                                          confidence=embedding.confidence)


async def _decode(request: Request, engine: SearchEngine, data: bytes, *, box: Box | None = None) -> np.ndarray:
    """An upload (or its region `box`) decoded as the model's bundle says, within the upload limits."""
    model = await engine.embedder.info()
    with STAGE_SECONDS.labels(stage="decode").time():
        try:
            return await request.app.state.decoder.decode(data, size=model.image_size, resample=model.resize, box=box)
        except ImageRegionError as exc:  # a parameter that does not fit the image: a 422 like any other
            raise _box_error(exc.message) from None


def _box_error(message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("query", "box"), "type": "value_error", "msg": message}])


def search_box(box: Annotated[str | None, Query(
        examples=["40,30,200,150"],
        description="search by this region only: `x,y,w,h` in pixels of the uploaded image as displayed (after "
                    "its EXIF orientation), its top-left corner and its size; 422 when it is empty or not inside "
                    "the image")] = None) -> Box | None:
    if box is None:
        return None
    try:
        return Box.parse(box)
    except ValueError as exc:
        raise _box_error(str(exc)) from None


# -- search -------------------------------------------------------------------------------------


@router.post("/search", response_model=SearchResponse, responses=ERROR_RESPONSES, tags=["search"],
             dependencies=[Depends(verify_api_key)])
async def search(
    request: Request,
    engine: EngineDep,
    options: OptionsDep,
    file: Annotated[UploadFile, File(description="the query image: JPEG, PNG, GIF, WebP, BMP or TIFF")],
    box: Annotated[Box | None, Depends(search_box)],
) -> SearchResponse:
    """The indexed images most similar to the uploaded one (or to its region `box`, cut out at full resolution
    before the model's resize): hits `offset` to `offset + k`. 503 with Retry-After when the server is at capacity
    (`CBIR_MAX_CONCURRENT_SEARCHES`) for longer than `CBIR_MAX_SEARCH_WAIT_MS`."""
    started = time.perf_counter()
    async with request.app.state.admission.admit():
        image = await _decode(request, engine, await file.read(), box=box)
        [answer] = await engine.search_images(image[np.newaxis], options)
    return _answer(request, _predicted(answer), answer, started)


@router.post("/search/batch", response_model=BatchSearchResponse, responses=ERROR_RESPONSES, tags=["search"],
             dependencies=[Depends(verify_api_key)])
async def search_batch(
    request: Request,
    engine: EngineDep,
    options: OptionsDep,
    files: Annotated[list[UploadFile], File(description=f"up to {MAX_BATCH_FILES} query images (repeat the field); "
                                                        "the request is held to CBIR_MAX_BATCH_UPLOAD_BYTES "
                                                        "(64 MiB by default), each file to CBIR_MAX_UPLOAD_BYTES")],
) -> BatchSearchResponse:
    """Several searches in one request, embedded as one micro-batch and searched in one store call. A file
    that cannot be used gets `{"error": {"status", "detail"}}` in its place; the others are answered."""
    started = time.perf_counter()
    if len(files) > MAX_BATCH_FILES:
        raise RequestValidationError([{"loc": ("body", "files"), "type": "too_long",
                                       "msg": f"at most {MAX_BATCH_FILES} files, got {len(files)}"}])
    await engine.ensure_ready()  # a batch the index cannot answer fails as a whole, with its status
    async with request.app.state.admission.admit():  # one slot: its images share one micro-batch
        decoded = await asyncio.gather(*(_decode_or_error(request, engine, file) for file in files))
        images = [item for item in decoded if isinstance(item, np.ndarray)]
        answers = iter(await engine.search_images(np.stack(images), options) if images else [])
    results: list[SearchResponse | BatchItemError] = []
    for item in decoded:
        if isinstance(item, BatchItemError):
            results.append(item)
            continue
        answer = next(answers)
        results.append(_answer(request, _predicted(answer), answer, started))
    return BatchSearchResponse(results=results)


async def _decode_or_error(request: Request, engine: SearchEngine, file: UploadFile) -> np.ndarray | BatchItemError:
    try:
        return await _decode(request, engine, await file.read())
    except ImageError as exc:
        return BatchItemError(error=BatchError(status=exc.status_code, detail=f"{file.filename}: {exc.message}"))


@router.post("/search/examples", response_model=SearchResponse, responses=ERROR_RESPONSES | NOT_FOUND,
             tags=["search"], dependencies=[Depends(verify_api_key)])
async def search_examples(request: Request, engine: EngineDep, options: OptionsDep,
                          examples: Annotated[ExamplesRequest, Body()]) -> SearchResponse:
    """"More like these, less like those": hits for the normalised mean of the positives' vectors minus `beta`
    times the negatives' mean (Rocchio's relevance feedback); the examples themselves are never hits. 404 for an
    unknown id, 422 when the examples cancel out."""
    started = time.perf_counter()
    answer = await engine.search_examples(examples.positive, examples.negative, beta=examples.beta, options=options)
    return _answer(request, None, answer, started)


@router.get("/images/{id}/similar", response_model=SearchResponse, responses=ERROR_RESPONSES | NOT_FOUND,
            tags=["search"], dependencies=[Depends(verify_api_key)])
async def similar(request: Request, id: str, engine: EngineDep, options: OptionsDep) -> SearchResponse:
    """The images most similar to an indexed one, by its stored vector; the image itself is left out. `query`
    is its prediction as stored."""
    started = time.perf_counter()
    document, answer = await engine.similar(id, options)
    prediction = QueryPrediction(predicted_label=document.predicted_label, confidence=document.confidence)
    return _answer(request, prediction, answer, started)


# -- the collection -----------------------------------------------------------------------------


@router.post("/images", response_model=ImageAdded, status_code=201, tags=["collection"],
             dependencies=[Depends(verify_write_access)],
             responses=WRITE_ERRORS | {200: {"model": ImageAdded, "description": "Those bytes were added before: "
                                                                                 "the same document, nothing changed"}})
async def add_image(
    request: Request,
    response: Response,
    engine: EngineDep,
    file: Annotated[UploadFile, File(description="the image: JPEG, PNG, GIF, WebP, BMP or TIFF")],
    label: Annotated[str | None, Form(max_length=200, description="its ground-truth label, if known")] = None,
) -> ImageAdded:
    """Add an image to the collection. Its id is the hash of the bytes: the same bytes again answer 200 with
    the same document, and nothing is stored twice. A 201 (or 200) means the image is kept as
    `<state dir>/uploads/<id>.<ext>` (re-encoded from its pixels, so no EXIF or GPS), fsynced, and its document
    is durable and already found by searches. `near_duplicate_of` lists the images it is a near duplicate of
    (see `GET /duplicates`; it is added all the same)."""
    data = await file.read()

    async def decode() -> tuple[np.ndarray, bytes, str]:  # the model's pixels, and the file to keep
        pixels = await _decode(request, engine, data)
        encoded, extension = await request.app.state.decoder.reencode(data)
        return pixels, encoded, extension

    document, added = await engine.add_image(data, decode, label=label or None)
    if not added:
        response.status_code = 200
    return ImageAdded(id=document.id, filename=document.filename, label=document.label,
                      predicted_label=document.predicted_label, model_version=document.model_version,
                      near_duplicate_of=await near_duplicate_of(request, engine, document, data))


@router.get("/images/{id}", name="get_image", tags=["collection"], response_class=FileResponse,
            dependencies=[Depends(verify_api_key)],
            responses={200: {"description": "The image file", "content": {"image/*": {}}},
                       404: {"model": ErrorResponse, "description": "No such indexed image"},
                       422: ERROR_RESPONSES[422]})
async def get_image(id: str, engine: EngineDep) -> FileResponse:
    """An indexed image's file (a collection's or an upload), by its document id."""
    path = await engine.image_path(id)
    if path is None:
        raise HTTPException(404, f"no indexed image with id {id!r}")
    media_type = IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream")
    return FileResponse(path, media_type=media_type, headers=IMAGE_HEADERS)


@router.get("/images/{id}/meta", response_model=ImageMeta, responses=ERROR_RESPONSES | NOT_FOUND,
            tags=["collection"], dependencies=[Depends(verify_api_key)])
async def image_meta(request: Request, id: str, engine: EngineDep) -> ImageMeta:
    """An indexed image's document, without its vector."""
    return _meta(request, await engine.document(id))


def _meta(request: Request, document: StoredImage) -> ImageMeta:
    return ImageMeta(id=document.id, filename=document.filename, source=document.source, label=document.label,
                     predicted_label=document.predicted_label, confidence=document.confidence, size=document.size,
                     mtime=document.mtime, model_version=document.model_version,
                     image_url=request.app.url_path_for("get_image", id=document.id))


@router.delete("/images/{id}", status_code=204, response_class=Response, tags=["collection"],
               dependencies=[Depends(verify_write_access)], responses=WRITE_ERRORS | NOT_FOUND)
async def delete_image(request: Request, id: str, engine: EngineDep) -> Response:
    """Delete an image: its document, and an upload's stored file. On return no search finds it, and its
    `/images/{id}`, `/meta` and `/similar` answer 404."""
    await engine.remove_image(id)
    request.app.state.duplicates.forget(id)
    return Response(status_code=204)


@router.get("/collection", response_model=CollectionResponse, tags=["collection"],
            dependencies=[Depends(verify_api_key)], responses={503: ERROR_RESPONSES[503]})
async def collection(request: Request, engine: EngineDep) -> CollectionResponse:
    """What the collection holds: documents by source and label, the model version, and the status as `/healthz`
    reports it (while indexing: `indexed` of `total` so far). `writes` says whether this client may add images
    without a key; `watching` lists the folders this process keeps indexed, each with its state."""
    status, problem = await engine.status()
    stats = await engine.collection() if problem is None else CollectionStats(documents=0)
    running = engine.progress  # a run that does not block search (an update, or the next model's index)
    progress = problem.progress if problem is not None else (
        {"indexed": running.indexed, "total": running.total} if running is not None else {})
    return CollectionResponse(documents=stats.documents, model_version=engine.model_version, backend=engine.store.name,
                              index=engine.store.index_kind, sources=stats.sources, labels=stats.labels,
                              unlabelled=stats.unlabelled,
                              status=status,
                              indexed=progress.get("indexed"), total=progress.get("total"),
                              writes=writes_open(request), last_indexing_error=engine.last_failure,
                              watching=[WatchedFolder(**folder) for folder in request.app.state.watched()])


# -- operations ---------------------------------------------------------------------------------


@router.get("/healthz", response_model=HealthResponse, tags=["ops"],
            responses={503: ERROR_RESPONSES[503]})
async def healthz(engine: EngineDep) -> HealthResponse | JSONResponse:
    """200 `ready` when the model and the index are (`warming_up` while the model is still being compiled:
    it answers, slower); else 503 with `status` `indexing` (and `indexed` of `total` images so far),
    `empty` or `failed`, and `detail` saying why."""
    status, problem = await engine.status()
    if problem is None:
        try:
            documents = await engine.store.count()
        except CbirError as exc:  # a store gone since it was ready
            status, problem = Status.failed, IndexNotReadyError(exc.message, status=Status.failed)
    if problem is not None:
        retry_after = "2" if status == Status.indexing else "5"
        return JSONResponse(error_body(problem), status_code=503, headers={"Retry-After": retry_after})
    progress = engine.embedder.warm_up_progress
    return HealthResponse(status=status, model_version=engine.model_version or "", backend=engine.store.name,
                          index=engine.store.index_kind, documents=documents,
                          warm_up=None if progress is None else WarmUpProgress(compiled=progress[0], total=progress[1]))


# The page's limits are the API's: filled in once, when the module loads.
HOME_PAGE = files("services.search").joinpath("static/index.html").read_text().replace(
    "{{MAX_RESULT_WINDOW}}", str(MAX_RESULT_WINDOW))


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def home() -> HTMLResponse:
    return HTMLResponse(HOME_PAGE)
