"""Ablations over the raw embeddings computed once: one-hot weight, PCA dims, fusion, exact vs HNSW.

Every variant builds its vectors with the service's own builder (`build_vectors`) and is scored
with the numpy twins of trec_eval's measures (checked against trec_eval in the tests).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from services.embedder.bundle import Bundle
from services.evaluation.features import Features, fuse
from services.evaluation.metrics import full_ranking, relevance, relevant_counts, retrieval_metrics
from services.evaluation.runs import exact_search

logger = logging.getLogger(__name__)

ONEHOT_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 4.0)
PCA_DIMS = (16, 32, 64, 128, 256)
HNSW_M = 32
HNSW_EF_SEARCH = (64, 128, 256)  # FAISS searches with max(efSearch, k)


@dataclass(frozen=True)
class Variant:
    """One way of building the search vectors; `pca_dims=None` is the raw embedding without PCA."""

    pca_dims: int | None
    onehot_weight: float

    @property
    def name(self) -> str:
        dims = "raw" if self.pca_dims is None else f"PCA {self.pca_dims}"
        return f"{dims}, w={self.onehot_weight:g}"


@dataclass
class AblationData:
    """What every variant is measured on: the features once, and the true classes."""

    bundle: Bundle
    train: Features
    test: Features
    train_labels: np.ndarray
    test_labels: np.ndarray
    k: int
    # The train split embedded with the queries' views, when the index side uses fewer (the bundle's
    # `index_flip_tta`): what the index-views table compares the served index with.
    train_query_views: Features | None = None


def variant_groups(bundle: Bundle, *, pca_dims: int, onehot_weight: float) -> dict[str, list[Variant]]:
    """The variants of each table, around the defaults in force (`pca_dims`, `onehot_weight`)."""
    dims = sorted({d for d in PCA_DIMS if d <= bundle.projection.max_dims} | {pca_dims})
    weights = sorted(set(ONEHOT_WEIGHTS) | {onehot_weight})
    return {
        "fusion": [Variant(None, 0.0), Variant(None, onehot_weight), Variant(pca_dims, 0.0),
                   Variant(pca_dims, onehot_weight)],
        "onehot_weight": [Variant(pca_dims, w) for w in weights],
        "pca_dims_fused": [Variant(d, onehot_weight) for d in dims] + [Variant(None, onehot_weight)],
        "pca_dims_embedding_only": [Variant(d, 0.0) for d in dims] + [Variant(None, 0.0)],
    }


def measure_variant(data: AblationData, variant: Variant, *, train: Features | None = None) -> dict[str, Any]:
    """MAP@100 (trec), mAP@100 normalised, P@10, P@100 and mAP@ALL of one variant, exact search (over
    `train`'s vectors when given, else the indexed ones)."""
    started = time.perf_counter()
    queries = fuse(data.bundle, data.test, pca_dims=variant.pca_dims, onehot_weight=variant.onehot_weight)
    documents = fuse(data.bundle, train or data.train, pca_dims=variant.pca_dims,
                     onehot_weight=variant.onehot_weight)
    hits = exact_search(queries, documents, data.k)
    metrics = retrieval_metrics(relevance(hits, data.train_labels, data.test_labels),
                                relevant_counts(data.train_labels, data.test_labels))
    everything = full_ranking(queries, data.test_labels, documents, data.train_labels)
    row = {"variant": variant.name, "pca_dims": variant.pca_dims, "onehot_weight": variant.onehot_weight,
           "dims": int(queries.shape[1]), **{name: float(values.mean()) for name, values in metrics.items()},
           "map_all": float(everything.average_precision.mean()),
           "seconds": round(time.perf_counter() - started, 1)}
    logger.info("ablation %s: MAP@100 %.5f, mAP@ALL %.4f, P@100 %.4f", variant.name, row["map"],
                row["map_all"], row["P_100"])
    return row


def run_ablations(data: AblationData, *, pca_dims: int, onehot_weight: float) -> dict[str, Any]:
    """Every table of `variant_groups` (each variant measured once) and the exact-vs-HNSW comparison."""
    groups = variant_groups(data.bundle, pca_dims=pca_dims, onehot_weight=onehot_weight)
    measured: dict[Variant, dict[str, Any]] = {}
    tables: dict[str, list[dict[str, Any]]] = {}
    for group, variants in groups.items():
        for variant in variants:
            if variant not in measured:
                measured[variant] = measure_variant(data, variant)
        tables[group] = [measured[variant] for variant in variants]
    if data.train_query_views is not None:
        tables["index_views"] = index_view_rows(data, Variant(pca_dims, onehot_weight))
    queries = fuse(data.bundle, data.test, pca_dims=pca_dims, onehot_weight=onehot_weight)
    documents = fuse(data.bundle, data.train, pca_dims=pca_dims, onehot_weight=onehot_weight)
    tables["search"] = compare_search(queries, documents, data.train_labels, data.test_labels, k=data.k)
    return {"defaults": {"pca_dims": pca_dims, "onehot_weight": onehot_weight}, "tables": tables}


def index_view_rows(data: AblationData, variant: Variant) -> list[dict[str, Any]]:
    """The served index (its single views) against one embedded with the queries' views (image + mirror);
    the queries are the same in both rows."""
    rows = []
    for views, train in (("image + mirror (as the queries)", data.train_query_views),
                         ("image only (as served)", data.train)):
        row = measure_variant(data, variant, train=train)
        rows.append({**row, "variant": f"index: {views}"})
    return rows


def compare_search(queries: np.ndarray, documents: np.ndarray, doc_labels: np.ndarray, query_labels: np.ndarray,
                   *, k: int, latency_queries: int = 500) -> list[dict[str, Any]]:
    """Exact (IndexFlatIP, as FaissStore) vs HNSW (IndexHNSWFlat, M=32): recall@k, quality, latency."""
    exact = faiss.IndexFlatIP(documents.shape[1])
    exact.add(documents)
    exact_row, exact_hits = _search_row(exact, queries, doc_labels, query_labels, k=k, exact_hits=None,
                                        latency_queries=latency_queries)
    rows = [{"search": "exact (IndexFlatIP)", "build_s": 0.0, **exact_row}]
    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(documents.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(documents)
    build_s = round(time.perf_counter() - started, 2)
    for ef in HNSW_EF_SEARCH:
        hnsw.hnsw.efSearch = ef
        row, _ = _search_row(hnsw, queries, doc_labels, query_labels, k=k, exact_hits=exact_hits,
                             latency_queries=latency_queries)
        rows.append({"search": f"HNSW M={HNSW_M} efSearch={ef}", "build_s": build_s, **row})
    return rows


def _search_row(index: faiss.Index, queries: np.ndarray, doc_labels: np.ndarray, query_labels: np.ndarray, *,
                k: int, exact_hits: np.ndarray | None, latency_queries: int) -> tuple[dict[str, Any], np.ndarray]:
    """Quality and single-query latency of one index, and its hits (recall is against `exact_hits`)."""
    _, hits = index.search(queries, k)
    metrics = retrieval_metrics(relevance(hits, doc_labels, query_labels), relevant_counts(doc_labels, query_labels))
    recall = 1.0 if exact_hits is None else float(np.mean(
        [np.isin(found, truth).sum() / k for found, truth in zip(hits, exact_hits, strict=True)]))
    latencies = []
    for query in queries[:latency_queries]:  # one query at a time, as the service searches
        started = time.perf_counter()
        index.search(query[np.newaxis], k)
        latencies.append((time.perf_counter() - started) * 1000)
    row = {"recall_at_k": recall, "map": float(metrics["map"].mean()), "P_100": float(metrics["P_100"].mean()),
           "latency_ms_p50": float(np.percentile(latencies, 50)), "latency_ms_p95": float(np.percentile(latencies, 95))}
    return row, hits
