"""`cbir serve`: the gateway with the model in this process, and its index brought up to date in the background.

The served pair is the one `<state dir>/serving.json` records (`services.indexer.serving`). When the configured
model is another one, the recorded model goes on serving its index while the background run builds the configured
model's index beside it; then the engine swaps both at once and the new pair is recorded (`services.serve.rollover`).
Without a record (or with its bundle gone) the configured model indexes in place, as on a first start: search
answers 503 `indexing` until it is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from services.common.collection import find_data_dir
from services.common.embedding import EmbedderInfo, EmbeddingService
from services.common.errors import BundleError, CbirError
from services.common.settings import Backend, IndexingSettings, WatchSettings
from services.common.status import IndexProgress
from services.common.stores.base import VectorStore
from services.embedder.bundle import DEFAULT_BUNDLE_DIR
from services.embedder.runtime import LocalEmbeddingService
from services.indexer.pipeline import IndexReport, index_collection
from services.indexer.serving import ServingRecord, index_file_for, read_record, served_index
from services.search.engine import CarryOver, SearchEngine
from services.search.settings import SearchSettings
from services.serve.rollover import carry_over_uploads, record_served
from services.serve.watching import ServedFolders
from services.wiring import (
    build_embedding_service,
    build_index_options,
    build_local_embedding_service,
    build_store,
    build_watch_options,
)

logger = logging.getLogger(__name__)

FOLLOW_EVERY_S = 2.0  # how often `cbir serve` looks for a pair another process (`cbir index --rebuild`) recorded


class OneMachineSettings(SearchSettings, IndexingSettings, WatchSettings):
    """`cbir serve`: the gateway's settings plus how its background indexing batches and the folders it watches."""


class OneMachine:
    """What `cbir serve` builds and runs: the served model and store, the background indexing run that brings the
    index up to date (or builds the next model's beside it), the watch for a pair recorded by another process, and
    the watched folders (`CBIR_WATCH` and `watch`, kept indexed as their files come and go).
    """

    def __init__(self, settings: OneMachineSettings, *, watch: Sequence[Path] = ()) -> None:
        self.settings = settings
        self.folders = ServedFolders(settings, [*settings.watch, *watch], split=settings.index_split,
                                     watch=build_watch_options(settings))
        self.record = read_record(settings.state_dir) if self.records else None
        self.next: LocalEmbeddingService | None = None  # the configured model, while the recorded one serves
        self.carry_over: CarryOver = partial(carry_over_uploads, uploads_dir=settings.uploads_dir)

    @property
    def records(self) -> bool:
        """Whether this machine records what it serves: the FAISS store and the model in this process."""
        return self.settings.backend is Backend.faiss and self.settings.embedder_url is None

    def load_embedder(self) -> EmbeddingService:
        """The model to serve (blocking: loads models): the recorded one when the configured one differs, which
        is kept in `next` for the background run to index."""
        if not self.records:
            return build_embedding_service(self.settings)
        configured = build_local_embedding_service(self.settings)
        record = self.record
        if record is None or record.model_version == configured.model_info.model_version:
            return configured
        try:
            served = build_local_embedding_service(record.model_settings(self.settings.state_dir, self.settings))
        except BundleError as exc:
            logger.warning("the served model %s cannot be loaded (%s); indexing with the configured one instead",
                           record.model_version, exc.message)
            self.record = None
            return configured
        logger.info("serving model %s while the index of the configured model %s is built",
                    record.model_version, configured.model_info.model_version)
        self.next = configured
        return served

    def build_store(self) -> VectorStore:
        """The served store: the file the record names (FAISS), or the index behind the alias."""
        return build_store(self.settings)

    async def index(self, engine: SearchEngine, progress: IndexProgress) -> None:
        """The background run: bring the served index up to date, or build the configured model's index beside it
        and swap to it."""
        if self.next is None:
            await self._index_collection(engine.embedder, engine.store, progress)
            if self.records:
                self.record = self._record(await engine.embedder.info(), served_index(self.settings.state_dir))
            return
        embedder, self.next = self.next, None
        model = embedder.model_info
        path = self.settings.state_dir / index_file_for(model.model_version)
        store = build_store(self.settings, faiss_path=path)
        try:
            await self._index_collection(embedder, store, progress)
        except BaseException:
            await store.close()
            await embedder.close()
            raise
        await engine.swap(embedder, store, carry_over=self.carry_over)  # which closes both if it fails
        self.record = self._record(model, path)

    async def follow(self, engine: SearchEngine) -> None:
        """What the gateway's lifespan runs beside the server: `follow_record` and the watched folders."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.follow_record(engine), name="follow serving.json")
            group.create_task(self.folders.run(engine), name="watched folders")

    async def follow_record(self, engine: SearchEngine, *, every_s: float = FOLLOW_EVERY_S) -> None:
        """Swap to the pair `serving.json` names when another process (`cbir index --rebuild`) records a new one."""
        if not self.records:
            return
        state = self.settings.state_dir
        while True:
            await asyncio.sleep(every_s)
            record = read_record(state)
            if (record is None or engine.model_version in (None, record.model_version)
                    or engine.progress is not None):  # nothing new, not serving yet, or our own run goes on
                continue
            logger.info("serving.json names model %s: loading it", record.model_version)
            try:
                embedder = await asyncio.to_thread(build_local_embedding_service,
                                                   record.model_settings(state, self.settings))
            except CbirError as exc:
                logger.error("cannot serve the recorded model %s: %s", record.model_version, exc.message)
                continue
            await engine.swap(embedder, build_store(self.settings, faiss_path=state / record.index),
                              carry_over=self.carry_over)
            self.record = record

    async def _index_collection(self, embedder: EmbeddingService, store: VectorStore,
                                progress: IndexProgress) -> IndexReport:
        """Index `CBIR_DATA_DIR`/`CBIR_INDEX_SPLIT` into `store`, rebuilding an index of another model version."""
        settings = self.settings
        report = await index_collection(find_data_dir(settings.data_dir), settings.index_split, embedder, store,
                                        build_index_options(settings, rebuild=True), progress=progress)
        logger.info("index: %s", report.summary())
        return report

    def _record(self, model: EmbedderInfo, index: Path) -> ServingRecord:
        return record_served(self.settings.state_dir, model, bundle_dir=self.settings.model_dir or DEFAULT_BUNDLE_DIR,
                             index=index.name)
