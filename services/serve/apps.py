"""The apps the `cbir` commands serve, each with the parts its settings name (`services.wiring`).

    gateway_app()      `cbir gateway`: the search gateway alone (no indexing), the model in-process or over HTTP
    embedder_app()     `cbir embedder`: the embedder service
    one_machine_app()  `cbir serve`: the gateway with the model in-process, indexing in the background

The gateway's imports leave torch out, so that it runs from an image without it when it embeds over HTTP
(CBIR_EMBEDDER_URL): the model's modules are imported by the apps that run it, when they are built.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from services.search.app import create_app as create_search_app
from services.search.settings import SearchSettings
from services.wiring import build_embedding_service, build_store

if TYPE_CHECKING:
    from services.embedder.settings import EmbedderSettings
    from services.serve.one_machine import OneMachineSettings


def gateway_app(settings: SearchSettings | None = None) -> FastAPI:
    """The search gateway over the configured embedder and store; it indexes nothing itself."""
    settings = settings or SearchSettings.load()
    return create_search_app(settings, embedder_factory=partial(build_embedding_service, settings),
                             store_factory=partial(build_store, settings))


def embedder_app(settings: EmbedderSettings | None = None) -> FastAPI:
    """The embedder service with the configured bundle."""
    from services.embedder.app import create_app as create_embedder_app
    from services.embedder.settings import EmbedderSettings
    from services.wiring import build_local_embedding_service

    settings = settings or EmbedderSettings.load()
    return create_embedder_app(settings, service_factory=partial(build_local_embedding_service, settings))


def one_machine_app(settings: OneMachineSettings | None = None, *, index: bool = True,
                    watch: Sequence[Path] = ()) -> FastAPI:
    """The gateway with the model in this process; with `index`, its lifespan brings the index up to date in the
    background (the first build, new files, or the index of a new model, built while the old one serves) while
    `/healthz` and `/collection` report the progress. The folders of `watch` and `CBIR_WATCH` are kept indexed as
    their files come and go (`/collection` lists them)."""
    from services.serve.one_machine import OneMachine, OneMachineSettings

    one_machine = OneMachine(settings or OneMachineSettings.load(), watch=watch)
    return create_search_app(one_machine.settings, embedder_factory=one_machine.load_embedder,
                             store_factory=one_machine.build_store,
                             background=one_machine.index if index else None, watch=one_machine.follow,
                             watched=one_machine.folders.report)
