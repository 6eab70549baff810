"""What `GET /duplicates` and the near-duplicate check of `POST /images` run on: the signature of every document
(`services.search.duplicates.image_signature` of its file, kept between runs and recomputed only for a file whose
size or modification time changed), the self-join and the groups, computed as a background job with progress, and
its result kept until the collection changes.

    >>> finder = DuplicateFinder(wait_s=2.0)
    >>> outcome = await finder.find(collection, threshold=0.88)   # DuplicateReport, or DuplicateProgress (202)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.common.documents import StoredImage
from services.common.errors import ImageError
from services.search.duplicates import SIGNATURE_DIMS, image_signature, link_groups, similar_pairs, suggested_keep

logger = logging.getLogger(__name__)

SIGN_CHUNK = 256  # files signed per worker-thread call: progress moves at least this often
RECENT_MAX = 1024  # signatures remembered one by one (uploads) before they join the matrix uploads are checked on
KEPT_RESULTS = 4  # results (thresholds) kept for the current collection


@dataclass(frozen=True)
class CollectionView:
    """What a job reads of the collection: its `revision` (what the result is kept for), its documents, and where
    each one's file is."""

    revision: Hashable
    documents: Callable[[], AsyncIterator[StoredImage]]
    path_of: Callable[[StoredImage], Path | None]


@dataclass(frozen=True)
class DuplicateMember:
    image: StoredImage
    similarity: float  # the signature correlation with the group's representative (1.0 for itself)


@dataclass(frozen=True)
class DuplicateGroup:
    """Copies of one image: the representative first (every member is within the threshold of it)."""

    members: tuple[DuplicateMember, ...]
    keep: StoredImage  # the suggested one to keep: the largest file, then the oldest


@dataclass(frozen=True)
class DuplicateReport:
    threshold: float
    groups: list[DuplicateGroup]
    documents: int  # documents compared
    unreadable: list[str]  # ids whose file is gone or no longer decodes: left out
    seconds: float


@dataclass
class DuplicateProgress:
    """Where a running job is: `signing` the files (`done` of `total`), then `comparing` them."""

    phase: str = "listing"
    done: int = 0
    total: int = 0


@dataclass
class _Job:
    task: asyncio.Task[DuplicateReport]
    progress: DuplicateProgress = field(default_factory=DuplicateProgress)


class DuplicateFinder:
    """Near-duplicate groups of one gateway's collection, computed once per collection revision and threshold.

    `find` waits up to `wait_s` for the result, and otherwise answers the running job's progress: a client asks
    again until the result is there. A job that fails is forgotten, so asking again starts another.
    """

    def __init__(self, *, wait_s: float = 2.0, max_pixels: int | None = None) -> None:
        self.wait_s = wait_s
        self.max_pixels = max_pixels
        self._signatures: dict[str, tuple[tuple[int, float], np.ndarray]] = {}  # id → ((size, mtime), signature)
        self._signed = False  # whether the whole collection was signed once (uploads since are added one by one)
        self._matrix: tuple[list[str], np.ndarray] | None = None  # the signatures as one matrix, for uploads
        self._recent: dict[str, np.ndarray] = {}  # remembered since the matrix was built
        self._jobs: dict[tuple[Hashable, float], _Job] = {}
        self._signing = asyncio.Lock()

    async def find(self, collection: CollectionView, *, threshold: float) -> DuplicateReport | DuplicateProgress:
        """The groups at `threshold`, or the progress of the job computing them after `wait_s`."""
        job = self.start(collection, threshold=threshold)
        try:
            return await asyncio.wait_for(asyncio.shield(job.task), timeout=self.wait_s)
        except TimeoutError:
            return job.progress
        except asyncio.CancelledError:
            if not job.task.cancelled():
                raise  # this request was cancelled, not the job
            return job.progress  # replaced by a newer job meanwhile: asked again, the newer one answers
        except Exception:
            self._jobs.pop((collection.revision, threshold), None)
            raise

    def start(self, collection: CollectionView, *, threshold: float) -> _Job:
        """The job of this revision and threshold, started now unless it already runs or ran; jobs of older
        revisions are dropped (cancelled if running)."""
        key = (collection.revision, threshold)
        job = self._jobs.get(key)
        if job is not None and (not job.task.done() or (not job.task.cancelled() and job.task.exception() is None)):
            return job
        for old_key in [k for k in self._jobs if k[0] != collection.revision]:
            self._jobs.pop(old_key).task.cancel()
        while len(self._jobs) >= KEPT_RESULTS:
            self._jobs.pop(next(iter(self._jobs))).task.cancel()
        progress = DuplicateProgress()
        task = asyncio.create_task(self._run(collection, threshold, progress), name="duplicates")
        task.add_done_callback(_log_failure)
        self._jobs[key] = job = _Job(task, progress)
        return job

    async def close(self) -> None:
        """Cancel running jobs (the gateway's shutdown)."""
        for job in self._jobs.values():
            job.task.cancel()
            with contextlib.suppress(BaseException):
                await job.task
        self._jobs.clear()

    # -- the near-duplicate check of one upload ----------------------------------------------------

    def near_duplicates(self, signature: np.ndarray, *, threshold: float, exclude: str) -> list[str] | None:
        """The ids whose signature is within `threshold` of `signature`, most similar first (None: the collection
        was never signed, so nothing can be said yet)."""
        if not self._signed:
            return None
        if self._matrix is None or len(self._recent) > RECENT_MAX:
            ids = list(self._signatures)
            rows = [self._signatures[i][1] for i in ids]
            self._matrix = ids, np.stack(rows) if rows else np.zeros((0, SIGNATURE_DIMS), dtype=np.float32)
            self._recent = {}
        ids, matrix = self._matrix
        sims = matrix @ signature
        found = {ids[row]: float(sims[row]) for row in np.flatnonzero(sims >= threshold)}
        found |= {i: float(s @ signature) for i, s in self._recent.items() if float(s @ signature) >= threshold}
        # A row of the matrix may be of an image deleted since: only what is still signed counts.
        return sorted((i for i in found if i != exclude and i in self._signatures), key=lambda i: -found[i])

    def remember(self, document: StoredImage, signature: np.ndarray) -> None:
        """Add an upload's signature (so the next check and the next job need not read its file again)."""
        self._signatures[document.id] = ((document.size, document.mtime), signature)
        self._recent[document.id] = signature

    def forget(self, id: str) -> None:
        self._signatures.pop(id, None)
        self._recent.pop(id, None)

    # -- the job ----------------------------------------------------------------------------------

    async def _run(self, collection: CollectionView, threshold: float, progress: DuplicateProgress
                   ) -> DuplicateReport:  # fmt: skip
        started = time.perf_counter()
        documents = [document async for document in collection.documents()]
        async with self._signing:
            unreadable = await self._sign(documents, collection.path_of, progress)
        signed = [document for document in documents if document.id in self._signatures
                  and document.id not in unreadable]
        matrix = (np.stack([self._signatures[document.id][1] for document in signed]) if signed
                  else np.zeros((0, SIGNATURE_DIMS), dtype=np.float32))
        progress.phase, progress.done, progress.total = "comparing", 0, len(signed)
        groups = await asyncio.to_thread(_groups, signed, matrix, threshold, progress)
        return DuplicateReport(threshold=threshold, groups=groups, documents=len(signed),
                               unreadable=sorted(unreadable), seconds=time.perf_counter() - started)

    async def _sign(self, documents: list[StoredImage], path_of: Callable[[StoredImage], Path | None],
                    progress: DuplicateProgress) -> set[str]:
        """Sign the documents whose signature is missing or stale, in worker threads; the ids whose file could not
        be read or decoded."""
        present = {document.id for document in documents}
        for stale in [i for i in self._signatures if i not in present]:
            del self._signatures[stale]
        todo = [d for d in documents if self._signatures.get(d.id, ((None, None),))[0] != (d.size, d.mtime)]
        progress.phase, progress.done, progress.total = "signing", len(documents) - len(todo), len(documents)
        unreadable: set[str] = set()
        for start in range(0, len(todo), SIGN_CHUNK):
            chunk = todo[start:start + SIGN_CHUNK]
            signed = await asyncio.to_thread(self._sign_files, chunk, path_of)
            for document, signature in zip(chunk, signed, strict=True):
                if signature is None:
                    unreadable.add(document.id)
                else:
                    self._signatures[document.id] = ((document.size, document.mtime), signature)
            progress.done += len(chunk)
        self._signed = True
        self._matrix = None
        if unreadable:
            logger.warning("near duplicates: %d documents' files are gone or unreadable, left out", len(unreadable))
        return unreadable

    def _sign_files(self, documents: list[StoredImage], path_of: Callable[[StoredImage], Path | None]
                    ) -> list[np.ndarray | None]:  # fmt: skip
        """The signature of each document's file (None: gone, unreadable or no image), in a worker thread."""
        signed: list[np.ndarray | None] = []
        for document in documents:
            try:
                path = path_of(document)
                signed.append(None if path is None else image_signature(path.read_bytes(), max_pixels=self.max_pixels))
            except (OSError, ImageError):
                signed.append(None)
        return signed


def _groups(documents: list[StoredImage], matrix: np.ndarray, threshold: float,
            progress: DuplicateProgress) -> list[DuplicateGroup]:
    """The groups of `documents` (rows of `matrix`), largest first, then by the id of the one to keep."""

    def compared(rows: int) -> None:
        progress.done = rows

    rows, cols, _ = similar_pairs(matrix, threshold=threshold, progress=compared)
    groups = []
    for members in link_groups(len(documents), rows, cols):
        similarities = matrix[members] @ matrix[members[0]]
        group_members = tuple(DuplicateMember(documents[m], round(min(float(s), 1.0), 6))
                              for m, s in zip(members, similarities, strict=True))
        groups.append(DuplicateGroup(group_members, suggested_keep([m.image for m in group_members])))
    return sorted(groups, key=lambda group: (-len(group.members), group.keep.id))


def _log_failure(task: asyncio.Task[DuplicateReport]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("near-duplicate job failed: %s", task.exception())
