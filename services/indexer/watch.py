"""Watched folders: a folder kept indexed as its files come, change and go, for `cbir serve --watch DIR` and
`cbir index DIR --watch`.

    file events (watchfiles) ─▶ collected until the folder is quiet for `settle_ms` (at most `max_batch_ms`)
        ─▶ one reconcile: the pipeline's `index_collection` of the folder with sync (new and changed files
           embedded, the documents of vanished files removed; only documents whose source is this folder)
        ─▶ a file that did not decode is tried again every `retry_ms` (half-written: its size or mtime still
           moves), and reported bad only after `retries` tries of the same size and mtime

Each batch is a whole reconcile of the folder, so its ids and its idempotence are those of `cbir index DIR
--sync`, a burst of files is one batch (or a few), and nothing outside the folder is touched.

    >>> watcher = FolderWatcher(folder, reconcile=lambda root: index_collection(root, ...))
    >>> await watcher.run()  # until cancelled; watcher.state says how it goes
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchfiles import Change, DefaultFilter, awatch

from services.common.collection import IMAGE_SUFFIXES
from services.common.errors import CbirError
from services.indexer.pipeline import IndexReport

logger = logging.getLogger(__name__)

TICK_MS = 250  # how often the watcher wakes without changes: retries due, a replaced store, the first reconcile
MAX_ERRORS = 20  # the errors a watcher's state keeps, newest last

# Bring the store up to date with the folder (the composition root binds embedder, store and options).
Reconcile = Callable[[Path], Awaitable[IndexReport]]


@dataclass(frozen=True, kw_only=True)
class WatchOptions:
    """How changes are batched and half-written files retried (`CBIR_WATCH_*`, `services.common.settings`)."""

    settle_ms: int = 300
    max_batch_ms: int = 2000
    retries: int = 5
    retry_ms: int = 1000
    force_polling: bool | None = None  # None: watchfiles decides (polling where no events come, e.g. some mounts)


@dataclass
class WatchState:
    """What a watcher reports (`/collection`'s `watching`, `cbir index --watch --json`): `state` is `starting`
    (before the first reconcile), `running`, `error` (the last batch failed; tried again) or `stopped`."""

    folder: str
    state: str = "starting"
    batches: int = 0
    last_batch: dict[str, Any] | None = None
    retrying: list[str] = field(default_factory=list)
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_ERRORS))

    def as_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "state": self.state, "batches": self.batches, "last_batch": self.last_batch,
                "retrying": list(self.retrying), "errors": list(self.errors)}


@dataclass
class _Retry:
    stat: tuple[int, float] | None  # the file's (size, mtime) when it last failed
    tries: int


class FolderWatcher:
    """Keeps the store in step with `folder` until cancelled: a first reconcile on start (the folder's current
    contents, like `cbir index DIR --sync`), then one per batch of changes. `stale()`, when given, says the store
    was replaced (a swap to a new model's index): the folder is reconciled again. `on_batch` hears the state after
    each batch. A failed batch is logged, kept in `state.errors` and tried again; the watcher goes on."""

    def __init__(self, folder: Path, *, reconcile: Reconcile, options: WatchOptions = WatchOptions(),
                 stale: Callable[[], bool] | None = None,
                 on_batch: Callable[[WatchState], None] | None = None) -> None:
        self.folder = folder.resolve()
        self.reconcile, self.options, self.stale, self.on_batch = reconcile, options, stale, on_batch
        self.state = WatchState(folder=str(self.folder))
        self._due = time.monotonic()  # when a reconcile is due without a change: now, for the first one
        self._retrying: dict[str, _Retry] = {}
        self._bad: dict[str, tuple[int, float] | None] = {}  # reported bad, until the file changes

    async def run(self) -> None:
        try:
            while True:
                await self._watch()
                # The folder itself is gone (an unmounted disk, say): its documents stay; look again later.
                self._failed(f"{self.folder} is gone; its documents are kept until it is back")
                while not self.folder.is_dir():
                    await asyncio.sleep(self.options.retry_ms / 1000)
                self._due = time.monotonic()
        finally:
            self.state.state = "stopped"

    async def _watch(self) -> None:
        """Batches of changes until the folder itself goes away (file events stop for good then)."""
        options = self.options
        async for changes in awatch(self.folder, watch_filter=relevant, debounce=options.max_batch_ms,
                                    step=options.settle_ms, rust_timeout=TICK_MS, yield_on_timeout=True,
                                    force_polling=options.force_polling, recursive=True):
            if not self.folder.is_dir():
                return
            if changes or time.monotonic() >= self._due or (self.stale is not None and self.stale()):
                await self._batch(len(changes))

    async def _batch(self, changes: int) -> None:
        started = time.monotonic()
        self._due = float("inf")
        try:
            report = await self.reconcile(self.folder)
        except CbirError as exc:
            self._failed(exc.message)
            return
        except Exception as exc:  # a bug: keep watching, keep the traceback in the log
            logger.exception("watching %s: the batch failed", self.folder)
            self._failed(f"{type(exc).__name__}: {exc}")
            return
        self._note_failures(report.failed)
        state = self.state
        state.state, state.batches = "running", state.batches + 1
        state.last_batch = {"finished": time.time(), "seconds": round(time.monotonic() - started, 3),
                            "changes": changes, "added": report.added, "updated": report.updated,
                            "removed": report.removed, "retrying": len(self._retrying), "documents": report.documents}
        logger.info("watching %s: batch %d (%d changes): added %d, updated %d, removed %d, retrying %d, %.2f s",
                    self.folder, state.batches, changes, report.added, report.updated, report.removed,
                    len(self._retrying), time.monotonic() - started)
        if self.on_batch is not None:
            self.on_batch(state)

    def _failed(self, message: str) -> None:
        logger.error("watching %s: %s (tried again in %d ms)", self.folder, message, self.options.retry_ms)
        self.state.state = "error"
        self.state.errors.append(message)
        self._due = time.monotonic() + self.options.retry_ms / 1000

    def _note_failures(self, failed: list[tuple[str, str]]) -> None:
        """Keep trying the files that did not decode while their size or mtime moves, and up to `retries` times
        once they stay the same; then report each as bad once, until it changes."""
        failing = dict(failed)
        self._retrying = {path: retry for path, retry in self._retrying.items() if path in failing}
        self._bad = {path: stat for path, stat in self._bad.items() if path in failing}
        for path, reason in failing.items():
            stat = self._stat(path)
            if path in self._bad and self._bad[path] == stat:
                continue
            self._bad.pop(path, None)
            retry = self._retrying.get(path)
            tries = retry.tries + 1 if retry is not None and retry.stat == stat else 1
            if tries > self.options.retries:
                del self._retrying[path]
                self._bad[path] = stat
                logger.warning("watching %s: skipped %s after %d tries: %s", self.folder, path, tries, reason)
                self.state.errors.append(f"{path}: {reason}")
            else:
                self._retrying[path] = _Retry(stat=stat, tries=tries)
        self.state.retrying = sorted(self._retrying)
        if self._retrying:
            self._due = min(self._due, time.monotonic() + self.options.retry_ms / 1000)

    def _stat(self, path: str) -> tuple[int, float] | None:
        try:
            stat = os.stat(self.folder / path)
        except OSError:
            return None
        return stat.st_size, stat.st_mtime


_DEFAULT_FILTER = DefaultFilter()


def relevant(change: Change, path: str) -> bool:
    """Whether a change can matter to the index: an image file (not hidden) added, changed or removed, a folder,
    or anything removed (a folder moved away takes its images with it). Temporary files (`x.jpg.part`) are not."""
    if not _DEFAULT_FILTER(change, path):
        return False
    name = os.path.basename(path)
    if name.startswith("."):
        return False
    return change == Change.deleted or name.lower().endswith(IMAGE_SUFFIXES) or os.path.isdir(path)
