"""The FAISS store's documents in memory (services/common/stores/faiss/table.py): writes by id that never change
an array a snapshot holds, listing and counting, the rows a filter lets through, and the exact snapshot's pages."""

from __future__ import annotations

import numpy as np
import pytest
from factories import SOURCE, brute_force, make_document, make_documents, unit_vectors

from services.common.documents import ImageDocument
from services.common.stores.base import StoreQuery
from services.common.stores.faiss.table import DocumentTable, FrozenTable

DIMS = 8


def table_of(documents: list[ImageDocument]) -> DocumentTable:
    table = DocumentTable(dims=documents[0].vector.size)
    table.upsert(documents, np.stack([doc.vector for doc in documents]))
    return table


def corpus() -> list[ImageDocument]:
    """60 documents: labels cat, dog, ship, none; predictions cat, dog, ship, cat, dog."""
    return make_documents(60, dims=DIMS, seed=3, labels=("cat", "dog", "ship", None),
                          predicted=("cat", "dog", "ship", "cat", "dog"))  # fmt: skip


def test_a_known_id_is_overwritten_in_its_row_and_a_new_one_appended() -> None:
    table = table_of(make_documents(5, dims=DIMS))
    held = table.vectors  # as a snapshot holds it
    before = held.copy()
    moved, newcomer = make_document("doc-0002", unit_vectors(1, DIMS, seed=7)[0]), make_documents(1, dims=DIMS,
                                                                                                   prefix="new")[0]
    table.upsert([moved, newcomer], np.stack([moved.vector, newcomer.vector]))
    assert len(table) == 6 and table.rows["doc-0002"] == 2 and table.rows["new-0000"] == 5
    assert table.get("doc-0002") == moved.stored() and table.ids()[-1] == "new-0000"
    np.testing.assert_array_equal(table.vectors[2], moved.vector)
    np.testing.assert_array_equal(held, before)  # replaced, never changed in place


def test_delete_returns_the_ids_that_were_stored_and_moves_the_last_rows_into_the_gaps() -> None:
    table = table_of(make_documents(6, dims=DIMS))
    held = table.vectors
    before = held.copy()
    assert table.delete(["doc-0004", "missing", "doc-0001", "doc-0004"]) == ["doc-0001", "doc-0004"]
    assert table.delete(["missing"]) == []
    assert table.ids() == ("doc-0000", "doc-0005", "doc-0002", "doc-0003") and table.rows["doc-0005"] == 1
    assert table.rows == {doc_id: row for row, doc_id in enumerate(table.ids())}
    np.testing.assert_array_equal(table.vectors[1], before[5])
    np.testing.assert_array_equal(held, before)  # a holder of the array before the delete sees no change
    assert table.vectors_of(["doc-0005", "doc-0001"]).keys() == {"doc-0005"}
    assert table.existing(["doc-0000", "doc-0001"]) == {"doc-0000"} and table.get("doc-0001") is None


def test_appends_and_deletes_write_in_place_until_someone_holds_the_array() -> None:
    table = table_of(make_documents(40, dims=DIMS))
    table.delete(["doc-0003"])  # nobody holds the vectors: no copy of the buffer
    buffer = table._buffer
    table.upsert(make_documents(3, dims=DIMS, prefix="new"), unit_vectors(3, DIMS, seed=5))
    table.delete(["doc-0010"])
    assert table._buffer is buffer and len(table) == 41
    held = table.vectors
    table.upsert(make_documents(1, dims=DIMS, prefix="more"), unit_vectors(1, DIMS, seed=6))  # past the held rows
    assert table._buffer is buffer
    table.delete(["doc-0000"])  # into a held row: copied first
    assert table._buffer is not buffer and np.shares_memory(held, buffer)
    assert table.ids()[0] == "more-0000"


def test_vectors_read_back_are_copies() -> None:
    table = table_of(make_documents(2, dims=DIMS))
    table.vectors_of(["doc-0000"])["doc-0000"][:] = 0
    assert np.any(table.vectors[0])


def test_documents_are_listed_by_source_in_id_order_and_counted() -> None:
    documents = make_documents(4, dims=DIMS, prefix="z") + make_documents(3, dims=DIMS, source="/b", labels=(None,))
    table = table_of(documents)
    assert [doc.id for doc in table.listed()] == ["doc-0000", "doc-0001", "doc-0002", "z-0000", "z-0001", "z-0002",
                                                  "z-0003"]  # fmt: skip
    assert [doc.id for doc in table.listed("/b")] == ["doc-0000", "doc-0001", "doc-0002"]
    assert table.listed("/nowhere") == []
    stats = table.stats()
    assert stats.documents == 7 and stats.sources == {SOURCE: 4, "/b": 3} and stats.unlabelled == 3
    assert stats.labels == {"airplane": 1, "automobile": 1, "bird": 1, "cat": 1}


def test_fit_sizes_an_empty_table() -> None:
    table = DocumentTable()
    assert table.dims == 0 and len(table) == 0
    table.fit(DIMS)
    assert table.vectors.shape == (0, DIMS)


def test_the_rows_a_filter_lets_through() -> None:
    documents = corpus()
    frozen = FrozenTable(rows={d.id: row for row, d in enumerate(documents)}, docs=tuple(documents))
    assert frozen.passing_rows(None, None, frozenset({"doc-0001"})) is None  # no filter: every row
    cats = frozen.passing_rows(frozenset({"cat"}), None, frozenset({"doc-0000", "missing"}))
    assert cats.tolist() == list(range(4, 60, 4))
    both = frozen.passing_rows(frozenset({"cat", "ship"}), frozenset({"cat"}), frozenset())
    assert both.tolist() == [row for row, d in enumerate(documents) if d.label in ("cat", "ship")
                             and d.predicted_label == "cat"]  # fmt: skip
    assert frozen.passing_rows(frozenset({"horse"}), None, frozenset()).tolist() == []
    assert frozen.passing_rows(frozenset({"None"}), None, frozenset()).tolist() == []  # a null label is not "None"
    assert frozen.rows_where("predicted_label", "ship").tolist() == list(range(2, 60, 5))
    assert frozen.excluded_rows(frozenset({"doc-0009", "missing", "doc-0002"})).tolist() == [2, 9]


def test_the_exact_snapshot_answers_each_query_like_a_brute_force_ranking() -> None:
    documents = corpus()
    snapshot = table_of(documents).exact_snapshot(dims=DIMS)
    probe = documents[4].vector
    queries = [StoreQuery(vector=probe, k=5), StoreQuery(vector=probe, k=5, offset=5),
               StoreQuery(vector=probe, k=7, labels=frozenset({"cat"})),
               StoreQuery(vector=documents[9].vector, k=4, labels=frozenset({"cat"}), offset=2),  # same filter
               StoreQuery(vector=probe, k=4, exclude_ids=frozenset({"doc-0004", "missing"})),
               StoreQuery(vector=probe, k=3, predicted_labels=frozenset({"ship"}), exclude_ids=frozenset({"doc-0002"})),
               StoreQuery(vector=probe, k=30, offset=50), StoreQuery(vector=probe, k=3, labels=frozenset({"horse"}))]
    results = snapshot.search_many(queries)
    assert [[hit.id for hit in hits] for hits in results] == [brute_force(documents, q) for q in queries]
    assert results[0][0].score == pytest.approx(2.0, abs=1e-5) and len(results[6]) == 10 and results[7] == []


def test_the_selector_counts_the_rows_it_lets_through() -> None:
    snapshot = table_of(corpus()).exact_snapshot(dims=DIMS)
    assert snapshot.selector(None, None, frozenset()) == (None, 60)
    selector, allowed = snapshot.selector(None, None, frozenset({"doc-0001", "missing"}))
    assert allowed == 59 and len(selector) == 2  # the negation and the batch it negates, kept together
    assert snapshot.selector(frozenset({"dog"}), None, frozenset())[1] == 15


def test_an_empty_snapshot_finds_nothing() -> None:
    snapshot = DocumentTable().exact_snapshot(dims=DIMS)
    assert snapshot.search_many([StoreQuery(vector=unit_vectors(1, DIMS)[0], k=3)]) == [[]]
