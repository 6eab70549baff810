"""`FaissStore.search_many`: filters, pages and exclusions answered like a brute-force ranking, grouped
per filter, against a snapshot that writes replace but never change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.documents import ImageDocument
from services.common.errors import StoreError, StoreMismatchError
from services.common.stores.base import StoreQuery
from services.common.stores.faiss_store import FaissStore

pytestmark = pytest.mark.anyio
DIMS, LABELS = 8, ("cat", "dog", "ship")


def corpus(count: int = 90, *, seed: int = 3) -> list[ImageDocument]:
    vectors = np.random.default_rng(seed).normal(size=(count, DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [ImageDocument(id=f"d{i:03d}", filename=f"{i}.jpg", path=f"train/{LABELS[i % 3]}/{i}.jpg",
                          label=LABELS[i % 3], model_version="v1", vector=vector)
            for i, vector in enumerate(vectors)]


def brute_force(documents: list[ImageDocument], query: StoreQuery) -> list[str]:
    allowed = [d for d in documents if (query.labels is None or d.label in query.labels)
               and d.id not in query.exclude_ids]
    ranked = sorted(allowed, key=lambda d: -float(np.dot(d.vector, query.vector)))
    return [d.id for d in ranked[query.offset:query.offset + query.k]]


@pytest.fixture
async def store(tmp_path: Path) -> FaissStore:
    store = FaissStore(tmp_path / "index.npz")
    await store.open(dims=DIMS, model_version="v1")
    await store.upsert(corpus())
    return store


async def test_filters_pages_and_exclusions_match_a_brute_force_ranking(store: FaissStore) -> None:
    documents = corpus()
    probe = documents[4].vector
    queries = [
        StoreQuery(vector=probe, k=5),
        StoreQuery(vector=probe, k=5, offset=5),  # the second page
        StoreQuery(vector=probe, k=7, labels=frozenset({"cat"})),
        StoreQuery(vector=probe, k=7, offset=3, labels=frozenset({"cat", "ship"})),
        StoreQuery(vector=probe, k=4, exclude_ids=frozenset({"d004", "d007", "missing"})),
        StoreQuery(vector=documents[10].vector, k=6, labels=frozenset({"dog"}), exclude_ids=frozenset({"d010"})),
        StoreQuery(vector=probe, k=3, labels=frozenset({"horse"})),  # no such label: no hits
        StoreQuery(vector=probe, k=50, offset=80),  # past the end: what is left
    ]
    results = await store.search_many(queries)
    assert [[hit.id for hit in hits] for hits in results] == [brute_force(documents, q) for q in queries]
    assert results[0][0].id == "d004" and results[0][0].score == pytest.approx(2.0, abs=1e-5)
    assert all(hit.label == "cat" for hit in results[2])
    assert len(results[7]) == 10


async def test_pages_do_not_overlap_and_cover_the_ranking(store: FaissStore) -> None:
    probe = corpus()[0].vector
    pages = await store.search_many([StoreQuery(vector=probe, k=10, offset=offset) for offset in range(0, 90, 10)])
    ids = [hit.id for page in pages for hit in page]
    assert len(ids) == len(set(ids)) == 90
    assert ids == [hit.id for hit in await store.search(probe, 90)]


async def test_a_search_reads_a_snapshot_that_writes_replace_but_never_change(store: FaissStore) -> None:
    documents = corpus()
    snapshot = store._take_snapshot()
    await store.delete(["d004"])
    newcomer = ImageDocument(id="new", filename="n.jpg", path="train/cat/n.jpg", label="cat", model_version="v1",
                             vector=documents[4].vector)
    await store.upsert([newcomer])
    before = snapshot.search_many([StoreQuery(vector=documents[4].vector, k=1)])
    after = await store.search_many([StoreQuery(vector=documents[4].vector, k=1)])
    assert before[0][0].id == "d004" and after[0][0].id == "new"


@pytest.mark.parametrize("vector", [np.zeros(DIMS), np.full(DIMS, np.nan), np.r_[np.ones(DIMS - 1), np.inf]])
async def test_a_zero_or_non_finite_query_vector_is_refused(store: FaissStore, vector: np.ndarray) -> None:
    with pytest.raises(StoreError, match="all zeros|not finite"):
        await store.search_many([StoreQuery(vector=vector.astype(np.float32), k=3)])


async def test_a_query_of_another_size_is_refused(store: FaissStore) -> None:
    with pytest.raises(StoreMismatchError, match="4 dims"):
        await store.search(np.ones(4, dtype=np.float32), 3)
