"""Watched folders composed (`services.indexer.watch`): `cbir serve --watch DIR`, whose folders are indexed into
whatever the gateway's engine serves now, and `cbir index DIR --watch`, a writer with a store of its own (beside
the compose stack's gateway, on Elasticsearch).

Every batch is the pipeline's `index_collection` of the folder with sync, in the layout the folder had when watching
began, so its documents are those `cbir index DIR --sync` would write, and no other root's are touched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from services.common.collection import resolve_layout
from services.common.errors import ConfigError
from services.common.settings import Backend, IndexingSettings
from services.indexer.pipeline import IndexOptions, IndexReport, index_collection
from services.indexer.serving import served_index
from services.indexer.settings import IndexerSettings
from services.indexer.watch import FolderWatcher, WatchOptions, WatchState
from services.search.engine import SearchEngine
from services.serve.rollover import record_served
from services.wiring import build_embedding_service, build_index_options, build_store, build_watch_options

logger = logging.getLogger(__name__)

BUSY_POLL_S = 0.2  # how often a batch looks whether the engine's own background run is done


def checked_folders(folders: Sequence[Path]) -> list[Path]:
    """The folders to watch, resolved and each once; `ConfigError` naming one that is not a directory."""
    resolved: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"cannot watch {folder}: not a directory")
        if folder.resolve() not in resolved:
            resolved.append(folder.resolve())
    return resolved


def folder_options(options: IndexOptions, folder: Path, split: str) -> IndexOptions:
    """A watched folder's indexing: sync (scoped to the folder's own documents), in the layout it has now (`auto`
    is resolved once, so a file dropped into a class layout's root does not relabel the rest), no rebuild."""
    layout = resolve_layout(folder, options.layout, split=split)
    return dataclasses.replace(options, sync=True, layout=layout, rebuild=False, progress_bar=False)


class ServedFolders:
    """The folders `cbir serve` keeps indexed (`--watch`, `CBIR_WATCH`), into the store its engine serves now: a
    batch waits for the engine's own background run, and a swap to a new model's index reconciles the folders again
    (the new index was built from `CBIR_DATA_DIR` and the uploads only)."""

    def __init__(self, settings: IndexingSettings, folders: Sequence[Path], *, split: str, watch: WatchOptions
                 ) -> None:
        self.settings, self.folders, self.split, self.watch = settings, checked_folders(folders), split, watch
        self.watchers: list[FolderWatcher] = []

    def report(self) -> list[dict[str, Any]]:
        """Each watched folder's state, for `/collection`."""
        if not self.watchers:
            return [WatchState(folder=str(folder)).as_dict() for folder in self.folders]
        return [watcher.state.as_dict() for watcher in self.watchers]

    async def run(self, engine: SearchEngine) -> None:
        """Watch every folder until cancelled (the gateway's lifespan owns the task)."""
        if not self.folders:
            return
        options = build_index_options(self.settings, rebuild=False, progress_bar=False)
        self.watchers = [self._watcher(engine, folder, folder_options(options, folder, self.split))
                         for folder in self.folders]
        async with asyncio.TaskGroup() as group:
            for watcher in self.watchers:
                group.create_task(watcher.run(), name=f"watch {watcher.folder}")

    def _watcher(self, engine: SearchEngine, folder: Path, options: IndexOptions) -> FolderWatcher:
        reconciled: list[object] = [None]  # the store the folder was last reconciled into

        async def reconcile(root: Path) -> IndexReport:
            while engine.progress is not None:  # the background run first: it may build the next model's index
                await asyncio.sleep(BUSY_POLL_S)
            store = engine.store
            report = await index_collection(root, self.split, engine.embedder, store, options)
            reconciled[0] = store
            return report

        return FolderWatcher(folder, reconcile=reconcile, options=self.watch,
                             stale=lambda: reconciled[0] is not None and reconciled[0] is not engine.store)


async def watch_into_store(settings: IndexerSettings, folder: Path, split: str, options: IndexOptions, *,
                           on_batch: Callable[[WatchState], None] | None = None) -> None:
    """`cbir index DIR --watch`: keep the configured store in step with `folder` until cancelled. One machine's
    in-process model records the index as served after the first batch, as `cbir index` does."""
    [folder] = checked_folders([folder])
    records = settings.backend is Backend.faiss and settings.embedder_url is None
    async with AsyncExitStack() as resources:
        service = await asyncio.to_thread(build_embedding_service, settings)
        resources.push_async_callback(service.close)
        store = build_store(settings)
        resources.push_async_callback(store.close)
        scoped = folder_options(options, folder, split)
        logger.info("watching %s (%s layout) into the %s store", folder, scoped.layout.value, store.name)

        async def reconcile(root: Path) -> IndexReport:
            report = await index_collection(root, split, service, store, scoped)
            if records and watcher.state.batches == 0:
                from services.embedder.bundle import DEFAULT_BUNDLE_DIR  # torch: only where the model runs here

                record_served(settings.state_dir, await service.info(),
                              bundle_dir=settings.model_dir or DEFAULT_BUNDLE_DIR,
                              index=served_index(settings.state_dir).name)
            return report

        watcher = FolderWatcher(folder, reconcile=reconcile, options=build_watch_options(settings), on_batch=on_batch)
        await watcher.run()
