"""What the Elasticsearch store asks and how it reads the answers (services/common/stores/elasticsearch/queries.py):
search bodies, pages, counts and the check of every search answer, called with dicts, no cluster."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from factories import make_documents

from services.common.errors import IndexNotReadyError, StoreError, StoreUnavailableError
from services.common.scoring import ES_SCRIPT_SOURCE
from services.common.settings import EsSearchMode
from services.common.stores.base import MAX_RESULT_WINDOW, CollectionStats, StoreQuery
from services.common.stores.elasticsearch.errors import IndexRef
from services.common.stores.elasticsearch.mapping import STORED_FIELDS, document_source
from services.common.stores.elasticsearch.queries import (
    check_search_answer,
    check_shards,
    collection_stats,
    hits_of,
    listing_page,
    msearch_body,
    partial_message,
    query_filter,
    search_body,
    stats_body,
    window,
)

VECTOR = np.asarray([0.6, 0.8, 0.0], dtype=np.float32)
REF = IndexRef(url="http://es:9200", index="cbir-images-v1", alias="cbir-images")
WHERE = "Elasticsearch index 'cbir-images-v1' at http://es:9200"


def query(k: int = 10, offset: int = 0, **filters: Any) -> StoreQuery:
    return StoreQuery(vector=VECTOR, k=k, offset=offset, **filters)


def test_the_window_stops_at_the_max_result_window() -> None:
    assert window(query(k=10)) == 10
    assert window(query(k=10, offset=MAX_RESULT_WINDOW - 4)) == 4
    assert window(query(k=10, offset=MAX_RESULT_WINDOW)) == 0
    assert window(query(k=10, offset=MAX_RESULT_WINDOW + 5)) == 0  # never negative


def test_the_filter_holds_labels_predictions_and_exclusions_sorted() -> None:
    assert query_filter(query()) is None
    assert query_filter(query(labels=frozenset({"dog", "cat"}), predicted_labels=frozenset({"ship"}),
                              exclude_ids=frozenset({"b", "a"}))) == {"bool": {
        "filter": [{"terms": {"label": ["cat", "dog"]}}, {"terms": {"predicted_label": ["ship"]}}],
        "must_not": [{"ids": {"values": ["a", "b"]}}]}}  # fmt: skip
    assert query_filter(query(labels=frozenset())) == {"bool": {"filter": [{"terms": {"label": []}}]}}  # none pass


def test_an_exact_search_scores_every_document_that_passes_the_filter_with_the_script() -> None:
    searched = search_body(query(k=5, offset=20), mode=EsSearchMode.exact, num_candidates=200)
    script = {"source": ES_SCRIPT_SOURCE, "params": {"query_vector": pytest.approx([0.6, 0.8, 0.0])}}
    assert searched == {"query": {"script_score": {"query": {"match_all": {}}, "script": script}},
                        "from": 20, "size": 5, "_source": STORED_FIELDS}  # fmt: skip
    assert all(type(value) is float for value in searched["query"]["script_score"]["script"]["params"]["query_vector"])
    filtered = search_body(query(labels=frozenset({"cat"})), mode=EsSearchMode.exact, num_candidates=200)
    assert filtered["query"]["script_score"]["query"] == {"bool": {"filter": [{"terms": {"label": ["cat"]}}]}}


def test_a_knn_search_asks_for_the_page_depth_among_enough_candidates() -> None:
    searched = search_body(query(k=10, offset=30, exclude_ids=frozenset({"a"})), mode=EsSearchMode.knn,
                           num_candidates=200)
    assert searched == {"knn": {"field": "features", "query_vector": pytest.approx([0.6, 0.8, 0.0]), "k": 40,
                                "num_candidates": 200, "filter": {"bool": {"must_not": [{"ids": {"values": ["a"]}}]}}},
                        "from": 30, "size": 10, "_source": STORED_FIELDS}  # fmt: skip
    deep = search_body(query(k=100, offset=500), mode=EsSearchMode.knn, num_candidates=200)["knn"]
    assert (deep["k"], deep["num_candidates"]) == (600, 600)  # never fewer candidates than k
    last = search_body(query(k=100, offset=9_950), mode=EsSearchMode.knn, num_candidates=200)["knn"]
    assert (last["k"], last["num_candidates"]) == (MAX_RESULT_WINDOW, MAX_RESULT_WINDOW)
    assert "filter" not in search_body(query(), mode=EsSearchMode.knn, num_candidates=200)["knn"]


def test_an_msearch_pairs_an_empty_header_with_each_body_in_order() -> None:
    queries = [query(k=1), query(k=2)]
    assert msearch_body(queries, mode=EsSearchMode.exact, num_candidates=50) == [
        {}, search_body(queries[0], mode=EsSearchMode.exact, num_candidates=50),
        {}, search_body(queries[1], mode=EsSearchMode.exact, num_candidates=50)]  # fmt: skip
    assert msearch_body([], mode=EsSearchMode.knn, num_candidates=50) == []


def test_hits_are_read_with_the_score_of_each_mode() -> None:
    documents = make_documents(2)
    answer = {"hits": {"hits": [{"_id": doc.id, "_score": score, "_source": document_source(doc)}
                                for doc, score in zip(documents, (1.0, 0.75), strict=True)]}}
    exact = hits_of({"hits": {"hits": [{**answer["hits"]["hits"][0], "_score": 1.5}]}}, EsSearchMode.exact)
    assert [(hit.image, hit.score) for hit in exact] == [(documents[0].stored(), 1.5)]  # the script's scale already
    knn = hits_of(answer, EsSearchMode.knn)  # (1 + cos) / 2 back to cos + 1
    assert [(hit.id, hit.score) for hit in knn] == [(documents[0].id, 2.0), (documents[1].id, 1.5)]


def answer(**fields: Any) -> dict[str, Any]:
    return {"took": 1, "timed_out": False, "_shards": {"total": 30, "successful": 30, "skipped": 0, "failed": 0},
            "hits": {"hits": []}, **fields}


def test_a_whole_answer_passes() -> None:
    check_search_answer(answer(), "searching", REF)


def test_an_answer_of_failed_shards_is_unavailable_naming_them() -> None:
    failures = [{"shard": shard, "index": REF.index, "reason": {"type": "circuit_breaking_exception",
                                                                "reason": "[parent] Data too large"}}
                for shard in (3, 17)]
    shards = {"total": 30, "successful": 28, "skipped": 0, "failed": 2, "failures": failures}
    with pytest.raises(StoreUnavailableError) as caught:
        check_search_answer(answer(_shards=shards), "searching", REF)
    assert caught.value.message == (
        f"{WHERE} answered with partial results: 2 of 30 shards failed (shard 3: circuit_breaking_exception: "
        "[parent] Data too large; shard 17: circuit_breaking_exception: [parent] Data too large); not serving an "
        "incomplete ranking, retry shortly")


def test_a_count_or_refresh_of_failed_shards_is_unavailable_never_short() -> None:
    # A _count answers 200 with the other shards' count and `_shards.failed` (RestCountAction: a size-0 search);
    # a _refresh with the shards it reached (BroadcastResponse).
    count = {"count": 41, "_shards": {"total": 30, "successful": 29, "skipped": 0, "failed": 1, "failures": [
        {"shard": 7, "index": REF.index, "status": "TOO_MANY_REQUESTS",
         "reason": {"type": "circuit_breaking_exception", "reason": "[parent] Data too large"}}]}}
    with pytest.raises(StoreUnavailableError) as caught:
        check_shards(count, REF, withheld="a short count")
    assert caught.value.message == (
        f"{WHERE} answered with partial results: 1 of 30 shards failed (shard 7: circuit_breaking_exception: "
        "[parent] Data too large); not serving a short count, retry shortly")
    with pytest.raises(StoreUnavailableError, match="2 of 60 shards failed"):
        check_shards({"_shards": {"total": 60, "successful": 58, "failed": 2}}, REF)
    check_shards({"count": 42, "_shards": {"total": 30, "successful": 30, "skipped": 0, "failed": 0}}, REF)


def test_a_timed_out_answer_is_unavailable() -> None:
    with pytest.raises(StoreUnavailableError, match="partial results: the search timed out before every shard"):
        check_search_answer(answer(timed_out=True), "searching", REF)


def test_a_partial_message_names_three_distinct_reasons_at_most() -> None:
    failures = [{"shard": shard, "reason": {"type": "node_not_connected_exception", "reason": f"node {shard % 4}"}}
                for shard in range(8)]
    message = partial_message({"total": 8, "failed": 8, "failures": failures}, timed_out=True, where=WHERE)
    assert "8 of 8 shards failed (shard 0: node_not_connected_exception: node 0; shard 1: " in message
    assert "shard 2: node_not_connected_exception: node 2; ...) and the search timed out" in message
    assert "shard 3" not in message
    assert partial_message({"failed": 1}, timed_out=False, where=WHERE) == (
        f"{WHERE} answered with partial results: 1 of ? shards failed; not serving an incomplete ranking, "
        "retry shortly")


@pytest.mark.parametrize(("status", "error", "expected", "message"), [
    (404, "index_not_found_exception", IndexNotReadyError, "there is no Elasticsearch index 'cbir-images' at "),
    (429, "es_rejected_execution_exception", StoreUnavailableError,
     "Elasticsearch at http://es:9200 is overloaded or down while searching (429 es_rejected_execution_exception: "),
    (503, "search_phase_execution_exception", StoreUnavailableError,
     "Elasticsearch at http://es:9200 is overloaded or down while searching (503 search_phase_execution_exception"),
    (400, "search_phase_execution_exception", StoreError,
     f"{WHERE} refused searching: 400 search_phase_execution_exception: all shards failed"),
])  # fmt: skip
def test_an_answer_that_is_an_error_is_translated(status: int, error: str, expected: type[Exception],
                                                  message: str) -> None:
    item = {"error": {"type": error, "reason": "all shards failed"}, "status": status}
    with pytest.raises(expected) as caught:
        check_search_answer(item, "searching", REF)
    assert type(caught.value) is expected and caught.value.message.startswith(message)


def test_a_listing_page_continues_after_the_last_id_of_the_page_before() -> None:
    first = listing_page("/collections/a", size=7, after=None)
    assert first == {"query": {"term": {"source": "/collections/a"}}, "size": 7, "sort": [{"id": "asc"}],
                     "_source": STORED_FIELDS}
    assert listing_page(None, size=7, after=["doc-0006"]) == {
        "query": {"match_all": {}}, "size": 7, "sort": [{"id": "asc"}], "_source": STORED_FIELDS,
        "search_after": ["doc-0006"]}  # fmt: skip


def test_the_counts_come_from_the_aggregations_labels_sorted() -> None:
    searched = stats_body()
    assert searched["size"] == 0 and searched["track_total_hits"] is True
    assert searched["aggs"]["unlabelled"] == {"missing": {"field": "label"}}
    counted = {"hits": {"total": {"value": 12, "relation": "eq"}, "hits": []}, "aggregations": {
        "sources": {"buckets": [{"key": "/a", "doc_count": 9}, {"key": "/b", "doc_count": 3}]},
        "labels": {"buckets": [{"key": "dog", "doc_count": 6}, {"key": "cat", "doc_count": 4}]},
        "unlabelled": {"doc_count": 2}}}  # fmt: skip
    stats = collection_stats(counted)
    assert stats == CollectionStats(documents=12, sources={"/a": 9, "/b": 3}, labels={"cat": 4, "dog": 6}, unlabelled=2)
    assert list(stats.labels) == ["cat", "dog"]
