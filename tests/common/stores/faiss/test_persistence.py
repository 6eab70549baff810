"""The FAISS store's file (services/common/stores/faiss/persistence.py): every field and the graph record survive a
save and a load, a failed save leaves the previous file, an unreadable file or one of another document schema is
refused, and the writer's lock admits one holder at a time."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
from factories import MODEL_VERSION, make_documents

from services.common.documents import DOCUMENT_SCHEMA
from services.common.errors import IndexNotReadyError, StoreMismatchError, StoreUnavailableError
from services.common.stores.faiss.persistence import GraphRecord, WriterLock, load_index, save_index
from services.common.stores.faiss.table import DocumentTable


def table_of(count: int) -> DocumentTable:
    documents = make_documents(count, labels=("cat", None, "dog"), predicted=("dog", "cat", "cat"))
    table = DocumentTable(dims=documents[0].vector.size)
    table.upsert(documents, np.stack([doc.vector for doc in documents]))
    return table


def test_every_field_and_the_graph_record_survive_a_round_trip(tmp_path: Path) -> None:
    path, table = tmp_path / "index.npz", table_of(12)
    record = GraphRecord("abc123", table.ids()[:10], frozenset({"doc-0010", "gone"}))
    save_index(path, table, model_version=MODEL_VERSION, graph=record)
    saved = load_index(path)
    assert saved.table.docs == table.docs and saved.table.rows == table.rows
    assert saved.table.get("doc-0001").label is None and saved.table.get("doc-0000").label == "cat"
    np.testing.assert_array_equal(saved.table.vectors, table.vectors)
    assert saved.model_version == MODEL_VERSION and saved.dims == table.dims and saved.graph == record
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]  # no temporary file left


def test_an_empty_index_knows_neither_its_size_nor_its_model(tmp_path: Path) -> None:
    save_index(tmp_path / "index.npz", DocumentTable(dims=16), model_version=MODEL_VERSION, graph=None)
    saved = load_index(tmp_path / "index.npz")
    assert len(saved.table) == 0 and saved.dims is None and saved.model_version is None and saved.graph is None


def test_a_failed_save_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "index.npz"
    save_index(path, table_of(3), model_version=MODEL_VERSION, graph=None)
    before = path.read_bytes()

    def disk_full(file, **arrays) -> None:
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_index(path, table_of(9), model_version=MODEL_VERSION, graph=None)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["index.npz"]


@pytest.mark.parametrize("content", [b"", b"not an npz file", b"PK\x03\x04truncated"], ids=["empty", "garbage", "zip"])
def test_an_unreadable_file_is_not_ready(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "index.npz").write_bytes(content)
    with pytest.raises(IndexNotReadyError, match=r"unreadable .*delete it and run `cbir index`"):
        load_index(tmp_path / "index.npz")


def test_a_file_missing_a_column_is_not_ready(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    save_index(path, table_of(3), model_version=MODEL_VERSION, graph=None)
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files if name != "sources"}
    np.savez(path, **arrays)
    with pytest.raises(IndexNotReadyError, match="unreadable"):
        load_index(path)


def older_file(path: Path, schema: int | None) -> None:
    """An index file as an older cbir wrote it: of document schema `schema` (None: from before it was recorded)."""
    save_index(path, table_of(3), model_version=MODEL_VERSION, graph=None)
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files if name != "schema"}
    if schema is not None:
        arrays["schema"] = np.asarray(schema)
    np.savez(path, **arrays)


@pytest.mark.parametrize(("schema", "named"), [(1, 1), (None, 1), (DOCUMENT_SCHEMA + 1, DOCUMENT_SCHEMA + 1)],
                         ids=["older", "unrecorded", "newer"])  # fmt: skip
def test_a_file_of_another_document_schema_asks_for_a_rebuild(tmp_path: Path, schema: int | None,
                                                              named: int) -> None:  # fmt: skip
    older_file(tmp_path / "index.npz", schema)
    with pytest.raises(StoreMismatchError, match=rf"schema {named}, not {DOCUMENT_SCHEMA}; .*cbir index --rebuild"):
        load_index(tmp_path / "index.npz")


def test_one_writer_holds_the_lock_until_it_releases_it(tmp_path: Path) -> None:
    first, second = WriterLock(tmp_path / "index.npz"), WriterLock(tmp_path / "index.npz")
    first.acquire()
    first.acquire()  # again: already held, nothing changes
    assert first.held and first.path.read_text() == str(os.getpid())
    with pytest.raises(StoreUnavailableError, match=rf"another process \(pid {os.getpid()}\) is writing .*index.npz"):
        second.acquire()
    assert not second.held
    first.release()
    second.acquire()
    assert second.held and not first.held


def test_a_dropped_lock_lets_go(tmp_path: Path) -> None:
    dropped = WriterLock(tmp_path / "index.npz")
    dropped.acquire()
    del dropped
    gc.collect()
    WriterLock(tmp_path / "index.npz").acquire()


def test_taking_the_lock_removes_what_a_killed_save_left(tmp_path: Path) -> None:
    leftovers = [tmp_path / "index.npz.a1b2.tmp", tmp_path / "index.npz.token.hnsw.tmp"]
    other = tmp_path / "other.npz.a1b2.tmp"  # another index's
    for path in [*leftovers, other]:
        path.write_bytes(b"half")
    WriterLock(tmp_path / "index.npz").acquire()
    assert [p.exists() for p in leftovers] == [False, False] and other.exists()
