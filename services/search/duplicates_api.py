"""`GET /duplicates`: groups of near-identical images (copies re-encoded, resized, shifted or brightened), each with
the one to keep; and the near-duplicate check of an upload (`near_duplicate_of` in `POST /images`' answer).

    GET /duplicates?threshold=0.88&limit=50&offset=0   → 200 the groups, or 202 the job's progress (ask again)
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.common.documents import StoredImage
from services.common.errors import ImageError
from services.common.http import ERROR_RESPONSES, verify_api_key
from services.search.duplicate_jobs import CollectionView, DuplicateFinder, DuplicateGroup, DuplicateProgress
from services.search.duplicates import image_signature
from services.search.engine import STAGE_SECONDS, SearchEngine

router = APIRouter()


class DuplicateMemberOut(BaseModel):
    id: str
    filename: str
    source: str = Field(description="`upload`, or the collection root it was indexed from")
    label: str | None
    predicted_label: str
    size: int = Field(description="bytes of the file when it was indexed")
    mtime: float = Field(description="its modification time then (an upload: when it was added), Unix seconds")
    similarity: float = Field(description="the correlation of its 8×8 signature with the group's first member's")
    image_url: str


class DuplicateGroupOut(BaseModel):
    keep: str = Field(description="the id of the copy to keep: the largest file, then the oldest")
    members: list[DuplicateMemberOut] = Field(
        description="the group's representative first; every member is within the threshold of it")


class DuplicatesResponse(BaseModel):
    model_config = {"json_schema_extra": {"examples": [{  # real: docs/api.md
        "threshold": 0.8825, "documents": 62, "groups_total": 1, "offset": 0, "limit": 1, "unreadable": 0,
        "groups": [{"keep": "2d2e8dda45d8ae147bb9", "members": [
            {"id": "2d2e8dda45d8ae147bb9", "filename": "0007-bright.png", "source": "/data/photos", "label": "cat",
             "predicted_label": "cat", "size": 2494, "mtime": 1796422858.6055732, "similarity": 1.0,
             "image_url": "/images/2d2e8dda45d8ae147bb9"},
            {"id": "47d371d75115fb7e24b8", "filename": "0007-small.jpg", "source": "/data/photos", "label": "cat",
             "predicted_label": "cat", "size": 858, "mtime": 1796422858.605376, "similarity": 0.997503,
             "image_url": "/images/47d371d75115fb7e24b8"}]}],
        "seconds": 0.038}]}}

    threshold: float
    documents: int = Field(description="documents compared")
    groups_total: int = Field(description="groups at this threshold; `groups` is the page offset to offset + limit")
    offset: int
    limit: int
    groups: list[DuplicateGroupOut] = Field(description="largest groups first")
    unreadable: int = Field(description="documents left out: their file is gone or does not decode")
    seconds: float = Field(description="how long the computation took (the result is kept until the collection "
                                       "changes)")


class DuplicatesPending(BaseModel):
    model_config = {"json_schema_extra": {"examples": [{
        "status": "running", "phase": "signing", "done": 0, "total": 62,
        "detail": "finding near duplicates: signing 0 of 62 images (0%); ask again"}]}}

    status: str = Field("running", description="the groups are being computed: ask again after Retry-After")
    phase: str = Field(description="`listing` the documents, `signing` their files, then `comparing` them")
    done: int
    total: int
    detail: str


def get_finder(request: Request) -> DuplicateFinder:
    return request.app.state.duplicates


async def collection_view(engine: SearchEngine) -> CollectionView:
    """The engine's collection as a duplicate job reads it; 503/409 while search is not ready."""
    await engine.ensure_ready()
    store = engine.store
    return CollectionView(revision=(engine.revision, await store.count()), documents=store.iter_documents,
                          path_of=engine.document_path)


@router.get("/duplicates", response_model=DuplicatesResponse, tags=["collection"],
            dependencies=[Depends(verify_api_key)],
            responses=ERROR_RESPONSES | {202: {"model": DuplicatesPending,
                                               "description": "Being computed: the progress (see Retry-After)"}})
async def duplicates(
    request: Request,
    finder: Annotated[DuplicateFinder, Depends(get_finder)],
    threshold: Annotated[float | None, Query(gt=0, le=1, description="the signature correlation from which two "
                                                                      "images are near duplicates (default: "
                                                                      "CBIR_DUPLICATE_THRESHOLD)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="groups to return")] = 50,
    offset: Annotated[int, Query(ge=0, description="groups to skip")] = 0,
) -> DuplicatesResponse | JSONResponse:
    """Groups of near-duplicate images: copies of one image re-encoded, resized, shifted by a pixel or brightened
    (a mirrored copy is not one). Every member of a group is within the threshold of its first member, so distinct
    images are never chained into one group. A large collection is computed in the background: 202 with the
    progress, then (asked again) the groups; the result is kept until the collection changes."""
    engine: SearchEngine = request.app.state.engine
    threshold = threshold if threshold is not None else request.app.state.settings.duplicate_threshold
    outcome = await finder.find(await collection_view(engine), threshold=threshold)
    if isinstance(outcome, DuplicateProgress):
        share = f" ({outcome.done * 100 // outcome.total}%)" if outcome.total else ""
        pending = DuplicatesPending(phase=outcome.phase, done=outcome.done, total=outcome.total,
                                    detail=f"finding near duplicates: {outcome.phase} {outcome.done} of "
                                           f"{outcome.total} images{share}; ask again")
        return JSONResponse(pending.model_dump(), status_code=202, headers={"Retry-After": "1"})
    page = outcome.groups[offset:offset + limit]
    return DuplicatesResponse(threshold=threshold, documents=outcome.documents, groups_total=len(outcome.groups),
                              offset=offset, limit=limit, groups=[_group(request, group) for group in page],
                              unreadable=len(outcome.unreadable), seconds=round(outcome.seconds, 3))


def _group(request: Request, group: DuplicateGroup) -> DuplicateGroupOut:
    return DuplicateGroupOut(keep=group.keep.id, members=[
        _member(request, member.image, member.similarity) for member in group.members])


def _member(request: Request, image: StoredImage, similarity: float) -> DuplicateMemberOut:
    return DuplicateMemberOut(id=image.id, filename=image.filename, source=image.source, label=image.label,
                              predicted_label=image.predicted_label, size=image.size, mtime=image.mtime,
                              similarity=similarity, image_url=request.app.url_path_for("get_image", id=image.id))


async def near_duplicate_of(request: Request, engine: SearchEngine, document: StoredImage, data: bytes
                            ) -> list[str] | None:  # fmt: skip
    """The ids of the stored images an upload is a near duplicate of (None: the collection's signatures are not
    computed yet; this starts their computation, so later uploads are checked)."""
    finder: DuplicateFinder = request.app.state.duplicates
    threshold = request.app.state.settings.duplicate_threshold
    with STAGE_SECONDS.labels(stage="near_duplicates").time():
        try:
            signature = await asyncio.to_thread(image_signature, data,
                                                max_pixels=request.app.state.settings.max_image_pixels)
        except ImageError:  # it decoded for the model already; never fail an add for this check
            return None
        found = finder.near_duplicates(signature, threshold=threshold, exclude=document.id)
    finder.remember(document, signature)
    if found is None:
        finder.start(await collection_view(engine), threshold=threshold)
        return None
    existing = await engine.store.existing_ids(found) if found else set()
    return [i for i in found if i in existing]

