"""The embedded FAISS store: round trip, upsert idempotence, persistence, delete, mismatch."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from factories import DIMS, make_documents

from services.common.errors import IndexNotReadyError, StoreMismatchError, StoreUnavailableError
from services.common.stores.faiss_store import FaissStore

pytestmark = pytest.mark.anyio


async def open_store(path: Path, version: str = "v1") -> FaissStore:
    store = FaissStore(path)
    await store.open(dims=DIMS, model_version=version)
    return store


async def test_round_trip_returns_exact_cosine_ranking(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "index.npz")
    documents = make_documents(50)
    await store.upsert(documents)
    query = documents[7].vector
    hits = await store.search(query, 5)
    cosines = np.stack([d.vector for d in documents]) @ query
    expected = np.argsort(-cosines)[:5]
    assert [hit.id for hit in hits] == [f"doc-{i:04d}" for i in expected]
    assert hits[0].id == "doc-0007"
    assert hits[0].score == pytest.approx(2.0, abs=1e-5)
    assert [hit.score for hit in hits] == pytest.approx([c + 1.0 for c in cosines[expected]], abs=1e-5)
    assert hits[0].image.label == "horse" and hits[0].image.path == "train/horse/0007.jpg"


async def test_upsert_is_idempotent_and_overwrites(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "index.npz")
    await store.upsert(make_documents(20))
    await store.upsert(make_documents(20))
    assert await store.count() == 20
    moved = make_documents(20, seed=9)[0]
    await store.upsert([moved])
    assert await store.count() == 20
    hits = await store.search(moved.vector, 1)
    assert hits[0].id == "doc-0000" and hits[0].score == pytest.approx(2.0, abs=1e-5)


async def test_persists_across_restart(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    store = await open_store(path)
    documents = make_documents(30)
    await store.upsert(documents)
    await store.flush()
    reopened = await open_store(path)
    assert await reopened.count() == 30
    assert await reopened.existing_ids(["doc-0001", "doc-0029", "nope"]) == {"doc-0001", "doc-0029"}
    assert (await reopened.get("doc-0003")).filename == "0003.jpg"
    before = await store.search(documents[4].vector, 10)
    after = await reopened.search(documents[4].vector, 10)
    assert [h.id for h in before] == [h.id for h in after]


async def test_unflushed_writes_are_not_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    store = await open_store(path)
    await store.upsert(make_documents(10))
    await store.flush()
    await store.upsert(make_documents(5, prefix="late"))
    assert await (await open_store(path)).count() == 10


async def test_delete_removes_documents(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "index.npz")
    documents = make_documents(10)
    await store.upsert(documents)
    assert await store.delete(["doc-0002", "doc-0005", "missing"]) == 2
    assert await store.count() == 8
    assert await store.get("doc-0002") is None
    hits = await store.search(documents[2].vector, 10)
    assert "doc-0002" not in {hit.id for hit in hits} and len(hits) == 8
    assert (await store.get("doc-0009")).path == "train/truck/0009.jpg"


async def test_k_larger_than_the_index_returns_everything(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "index.npz")
    await store.upsert(make_documents(4))
    assert len(await store.search(make_documents(1)[0].vector, 100)) == 4


async def test_other_model_version_or_dims_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    store = await open_store(path)
    await store.upsert(make_documents(3))
    await store.flush()
    with pytest.raises(StoreMismatchError, match="model version"):
        await open_store(path, version="v2")
    with pytest.raises(StoreMismatchError, match="dimensional"):
        await FaissStore(path).open(dims=DIMS + 1, model_version="v1")


async def test_missing_index_without_create_is_not_ready(tmp_path: Path) -> None:
    with pytest.raises(IndexNotReadyError, match="cbir index"):
        await FaissStore(tmp_path / "none.npz").open(dims=DIMS, model_version="v1", create=False)


@pytest.mark.parametrize("content", [b"", b"not an npz file", b"PK\x03\x04truncated"], ids=["empty", "garbage", "zip"])
@pytest.mark.parametrize("create", [False, True])
async def test_unreadable_index_is_not_ready(tmp_path: Path, content: bytes, create: bool) -> None:
    path = tmp_path / "index.npz"
    path.write_bytes(content)
    with pytest.raises(IndexNotReadyError, match=r"unreadable .*delete it and run `cbir index`"):
        await FaissStore(path).open(dims=DIMS, model_version="v1", create=create)


async def test_documents_of_another_model_or_size_are_a_mismatch(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "index.npz")
    with pytest.raises(StoreMismatchError, match="is from model 'v2', the index holds 'v1'"):
        await store.upsert(make_documents(2, model_version="v2"))
    small = [replace(doc, vector=doc.vector[:4]) for doc in make_documents(2)]
    with pytest.raises(StoreMismatchError, match=f"vectors have 4 dims; this index holds {DIMS}"):
        await store.upsert(small)
    assert await store.count() == 0


async def test_a_second_writer_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    first = await open_store(path)
    await first.upsert(make_documents(5))
    await first.flush()
    reader = await open_store(path)  # reading takes no lock
    assert await reader.count() == 5
    second = await open_store(path)
    writes = (lambda: second.upsert(make_documents(3, prefix="other")), second.reset,
              lambda: second.delete(["doc-0001"]))
    for write in writes:  # busy, not broken: unavailable until the first writer closes
        with pytest.raises(StoreUnavailableError, match=rf"another process \(pid {os.getpid()}\) is writing"):
            await write()
    await first.close()
    await second.upsert(make_documents(3, prefix="other"))
    await second.flush()
    assert await (await open_store(path)).count() == 8  # nothing the first writer stored was lost
