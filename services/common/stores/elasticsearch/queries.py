"""What the store asks Elasticsearch, and how it reads the answers: the search body of a `StoreQuery` (exact
`script_score` or approximate `knn`, with its filters and page), the pages that list documents, the aggregations
that count them, and the check every search answer passes. Pure: nothing here talks to the cluster.

What a real cluster does that a single process would not, and what is done about it here:

- **Partial results.** A search some shards fail still answers 200, with `_shards.failed` and the other shards'
  hits; one that ran past its `timeout` answers `timed_out: true`. The product promises exact rankings, so either
  is `StoreUnavailableError` (503 with Retry-After at the HTTP edge) naming how many shards failed and the first
  reasons, never a shorter list of hits (`check_search_answer`). A `_count` (or a `_refresh`) some shards fail is
  refused the same way (`check_shards`): a short count is never reported as the count.
- **Ties.** Elasticsearch orders equal scores by shard, then by Lucene doc id within the shard, so documents with
  the same score may come in another order than FAISS gives them; the scores and the set of hits at each score
  are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from services.common.documents import StoreHit
from services.common.errors import StoreUnavailableError
from services.common.scoring import ES_SCRIPT_SOURCE, score_from_es_knn
from services.common.settings import EsSearchMode
from services.common.stores.base import MAX_RESULT_WINDOW, CollectionStats, StoreQuery
from services.common.stores.elasticsearch.errors import IndexRef, reason, refusal
from services.common.stores.elasticsearch.mapping import STORED_FIELDS, VECTOR_FIELD, stored_image

SHARD_REASONS_SHOWN = 3  # distinct shard failure reasons spelled out for a partial search
STATS_BUCKETS = 10_000  # most sources / labels /collection counts (terms aggregation size)


def window(query: StoreQuery) -> int:
    """How many hits of `query` can be asked for: Elasticsearch's from + size stops at MAX_RESULT_WINDOW."""
    return max(min(query.k, MAX_RESULT_WINDOW - query.offset), 0)


def query_filter(query: StoreQuery) -> dict[str, Any] | None:
    """The `bool` filter of a query's labels, predicted labels and excluded ids, or None when it has none."""
    clauses: dict[str, Any] = {}
    terms = [{"terms": {field_name: sorted(values)}}
             for field_name, values in (("label", query.labels), ("predicted_label", query.predicted_labels))
             if values is not None]
    if terms:
        clauses["filter"] = terms
    if query.exclude_ids:
        clauses["must_not"] = [{"ids": {"values": sorted(query.exclude_ids)}}]
    return {"bool": clauses} if clauses else None


def search_body(query: StoreQuery, *, mode: EsSearchMode, num_candidates: int) -> dict[str, Any]:
    """The search body of one query in `mode` (`ES_SCRIPT_SOURCE` already scores on the service's scale; kNN's
    `(1 + cos) / 2` is converted back by `score_from_es_knn`).

    Exact mode ranks the documents that pass the filter with `script_score`; kNN mode asks each shard for
    `num_candidates` candidates among them and keeps the best `offset + k`, of which `from`/`size` take the page,
    so deep pages need `CBIR_ES_NUM_CANDIDATES` to grow with them.
    """
    size = window(query)
    vector = np.asarray(query.vector, dtype=np.float32).ravel().tolist()
    page = {"from": query.offset, "size": size, "_source": STORED_FIELDS}
    allowed = query_filter(query)
    if mode is EsSearchMode.knn:
        depth = query.offset + size
        knn: dict[str, Any] = {
            "field": VECTOR_FIELD,
            "query_vector": vector,
            "k": depth,
            "num_candidates": min(max(depth, num_candidates), MAX_RESULT_WINDOW),
        }
        if allowed is not None:
            knn["filter"] = allowed  # applied during the graph search, not after it
        return {"knn": knn, **page}
    script_score = {
        "query": allowed or {"match_all": {}},
        "script": {"source": ES_SCRIPT_SOURCE, "params": {"query_vector": vector}},
    }
    return {"query": {"script_score": script_score}, **page}


def msearch_body(queries: Sequence[StoreQuery], *, mode: EsSearchMode, num_candidates: int) -> list[dict[str, Any]]:
    """The `_msearch` searches of `queries`: an empty header (the index is the request's) and a body each."""
    searches: list[dict[str, Any]] = []
    for query in queries:
        searches += [{}, search_body(query, mode=mode, num_candidates=num_candidates)]
    return searches


def hits_of(answer: dict[str, Any], mode: EsSearchMode) -> list[StoreHit]:
    """The hits of a (checked) search answer, scored on the service's scale."""
    to_score = score_from_es_knn if mode is EsSearchMode.knn else float
    return [StoreHit(stored_image(hit["_source"]), to_score(hit["_score"])) for hit in answer["hits"]["hits"]]


def check_search_answer(answer: dict[str, Any], doing: str, ref: IndexRef) -> None:
    """Raise for a search answer (or `_msearch` item) that is an error, or that holds the hits of only some
    shards."""
    if "error" in answer:
        raise refusal(int(answer.get("status", 500)), answer, doing, ref)
    check_shards(answer, ref)


def check_shards(answer: dict[str, Any], ref: IndexRef, *, withheld: str = "an incomplete ranking") -> None:
    """Raise `StoreUnavailableError` for an answer (a search, a `_count`, a `_refresh`) whose `_shards` say some
    shards failed, or that timed out: what it holds is the other shards' only, and is `withheld`."""
    shards = answer.get("_shards", {})
    if int(shards.get("failed", 0)) or answer.get("timed_out"):
        raise StoreUnavailableError(partial_message(shards, timed_out=bool(answer.get("timed_out")), where=ref.where,
                                                    withheld=withheld))


def partial_message(shards: dict[str, Any], *, timed_out: bool, where: str,
                    withheld: str = "an incomplete ranking") -> str:
    """Why an answer of partial results is not served (as `withheld`): how many shards failed and their first
    distinct reasons, and whether the search timed out."""
    total, failed = shards.get("total", "?"), int(shards.get("failed", 0))
    parts = []
    if failed:
        reasons = list(dict.fromkeys(
            f"shard {failure.get('shard')}: {reason({'error': failure.get('reason')})}"
            for failure in shards.get("failures", [])
        ))  # fmt: skip
        shown = "; ".join(reasons[:SHARD_REASONS_SHOWN]) + ("; ..." if len(reasons) > SHARD_REASONS_SHOWN else "")
        parts.append(f"{failed} of {total} shards failed" + (f" ({shown})" if shown else ""))
    if timed_out:
        parts.append("the search timed out before every shard answered")
    return (f"{where} answered with partial results: {' and '.join(parts)}; "
            f"not serving {withheld}, retry shortly")  # fmt: skip


def listing_page(source: str | None, *, size: int, after: list[str] | None) -> dict[str, Any]:
    """One page of documents (of `source` only, when given) sorted by id, after the id `after` of the page before
    (`search_after`): no scroll context to keep open between pages."""
    page: dict[str, Any] = {"query": {"term": {"source": source}} if source is not None else {"match_all": {}},
                            "size": size, "sort": [{"id": "asc"}], "_source": STORED_FIELDS}
    if after is not None:
        page["search_after"] = after
    return page


def stats_body() -> dict[str, Any]:
    """A search that counts every document, by source, by label, and those with no label."""
    aggregations = {"sources": {"terms": {"field": "source", "size": STATS_BUCKETS}},
                    "labels": {"terms": {"field": "label", "size": STATS_BUCKETS}},
                    "unlabelled": {"missing": {"field": "label"}}}
    return {"size": 0, "aggs": aggregations, "track_total_hits": True}


def collection_stats(answer: dict[str, Any]) -> CollectionStats:
    """The counts in a (checked) answer of `stats_body`."""
    found = answer["aggregations"]
    return CollectionStats(
        documents=int(answer["hits"]["total"]["value"]),
        sources={bucket["key"]: bucket["doc_count"] for bucket in found["sources"]["buckets"]},
        labels=dict(sorted((bucket["key"], bucket["doc_count"]) for bucket in found["labels"]["buckets"])),
        unlabelled=int(found["unlabelled"]["doc_count"]),
    )
