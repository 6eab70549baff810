"""Fixtures for code that talks to Elasticsearch: the HTTP double, stores connected to it, and `filled`.

The root conftest loads them as a plugin (`pytest_plugins`), so every test can ask for them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from es_double import EsDouble
from factories import DIMS, MODEL_VERSION, make_documents

from services.common.settings import StoreSettings
from services.common.stores.elasticsearch import ElasticsearchStore

MakeEsStore = Callable[..., ElasticsearchStore]


def es_settings(double: EsDouble, **overrides: Any) -> StoreSettings:
    """`StoreSettings` for the double, whatever `.env` or `CBIR_ES_*` this machine has."""
    values: dict[str, Any] = {
        "backend": "elasticsearch",
        "es_url": double.url,
        "es_index": "cbir-test",
        "es_api_key": None,
        "es_username": None,
        "es_timeout_s": 5.0,
        "es_max_retries": 2,
        "es_shards": 30,
        "es_replicas": 0,
        "es_search_mode": "exact",
        "es_num_candidates": 200,
    }
    return StoreSettings(_env_file=None, **{**values, **overrides})  # type: ignore[call-arg]


@pytest.fixture
def es_double() -> Iterator[EsDouble]:
    """A fresh Elasticsearch double on a free localhost port."""
    with EsDouble() as double:
        yield double


@pytest.fixture
async def make_es_store(es_double: EsDouble) -> AsyncIterator[MakeEsStore]:
    """Build `ElasticsearchStore`s on the double (`CBIR_ES_*` overrides as keywords); closed after."""
    stores: list[ElasticsearchStore] = []

    def make(**overrides: Any) -> ElasticsearchStore:
        store = ElasticsearchStore.from_settings(es_settings(es_double, **overrides), initial_backoff_s=0.01)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
def es_store(make_es_store: MakeEsStore) -> ElasticsearchStore:
    """A store on the double with the default settings, not yet opened."""
    return make_es_store()


async def filled(store: ElasticsearchStore, count: int = 6, *, model_version: str = MODEL_VERSION,
                 **documents: Any) -> None:
    """Open `store` for `model_version` (vectors of `DIMS`) and make `count` of its documents searchable
    (`documents`: more keywords of `make_documents`, e.g. `prefix`)."""
    await store.open(dims=DIMS, model_version=model_version)
    await store.upsert(make_documents(count, model_version=model_version, **documents))
    await store.flush()
