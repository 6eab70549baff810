"""Shared fixtures: a small real CIFAR-10 collection, a tiny bundle trained on it, running apps.

The bundle is a real (narrow) VGG-16 trained for a few epochs inside the test session, so the
API tests exercise the real model code end to end in seconds.
"""

from __future__ import annotations

import os

# The test models are tiny: one thread per process runs them as fast as two, and keeps test
# processes and the servers they start from fighting over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch.compile takes tens of seconds per batch size: the tests that exercise it ask for it themselves.
os.environ.setdefault("CBIR_COMPILE", "off")

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from factories import copy_collection
from servers import asgi_client
from tiny_models import train_tiny_bovw_bundle, train_tiny_bundle

from services.common.collection import REPO_ROOT
from services.embedder.bundle import Bundle, load_bundle

torch.set_num_threads(1)
CIFAR10 = REPO_ROOT.parent / "shared" / "cifar10"
# The Elasticsearch double and the stores on it; pytest takes `pytest_plugins` from the root conftest only.
pytest_plugins = ["es_fixtures"]
TRAIN_PER_CLASS = 50
TEST_PER_CLASS = 5


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    if not (CIFAR10 / "train").is_dir():
        pytest.fail(f"CIFAR-10 is expected at {CIFAR10} (see its README)")
    return CIFAR10


@pytest.fixture(scope="session")
def mini_collection(tmp_path_factory: pytest.TempPathFactory, cifar10_dir: Path) -> Path:
    """50 train and 5 test images per class, copied from the real CIFAR-10 folders."""
    return copy_collection(cifar10_dir, tmp_path_factory.mktemp("collection"), train=TRAIN_PER_CLASS,
                           test=TEST_PER_CLASS)


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory, mini_collection: Path) -> Path:
    """A narrow VGG-16 trained for a few epochs on the mini collection (a few seconds)."""
    return train_tiny_bundle(mini_collection, tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_dir: Path) -> Bundle:
    return load_bundle(tiny_bundle_dir)


@pytest.fixture(scope="session")
def bovw_bundle_dir(tmp_path_factory: pytest.TempPathFactory, mini_collection: Path) -> Path:
    """A Bag-of-Visual-Words bundle trained on the mini collection (`TINY_BOVW_OPTIONS`, a few seconds)."""
    return train_tiny_bovw_bundle(mini_collection, tmp_path_factory.mktemp("bovw"))


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings from the test alone: no `CBIR_*` variable of the shell or the session, and no `.env` (the working
    directory is an empty folder)."""
    for name in list(os.environ):
        if name.startswith("CBIR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cbir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_bundle_dir: Path, mini_collection: Path) -> Path:
    """CBIR_* settings pointing at the tiny bundle, the mini collection and a fresh state dir."""
    for name, value in (("CBIR_MODEL_DIR", tiny_bundle_dir), ("CBIR_DATA_DIR", mini_collection),
                        ("CBIR_STATE_DIR", tmp_path / "state"), ("CBIR_BACKEND", "faiss")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("CBIR_EMBEDDER_URL", raising=False)
    monkeypatch.delenv("CBIR_API_KEYS", raising=False)
    return tmp_path / "state"


@pytest.fixture
def indexed_state(cbir_env: Path, mini_collection: Path) -> Path:
    """The mini collection's train split indexed into the embedded store."""
    from services.cli import main

    main(["index", "--no-progress"])
    return cbir_env


@pytest.fixture
async def search_client(indexed_state: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The real search gateway (model in-process, FAISS store) with its lifespan running."""
    from services.serve.apps import gateway_app

    async with asgi_client(gateway_app(), base_url="http://search") as client:
        yield client


@pytest.fixture
async def embedder_client(cbir_env: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The real embedder service with its lifespan running."""
    from services.serve.apps import embedder_app

    async with asgi_client(embedder_app(), base_url="http://embedder") as client:
        yield client


@pytest.fixture
def test_image(mini_collection: Path) -> Iterator[bytes]:
    yield (mini_collection / "test" / "cat" / "0000.jpg").read_bytes()
