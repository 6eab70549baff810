"""Retrieval and classification metrics: trec_eval's own code (through pytrec_eval) and numpy twins.

The study's protocol: every train image of the query's class is relevant (R = 5,000 on
CIFAR-10), the run is cut at 100, and trec_eval's `map` divides by R, so MAP@100 is at most
100 / 5,000 = 0.02. The numpy functions compute the same numbers for the ablations (tested to
match trec_eval) plus two trec_eval does not: mAP over the full ranking and the deep-hashing
literature's mAP@k (divided by the relevant images retrieved instead of by R).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytrec_eval

# trec_eval measures: `map` on a 100-deep run is the study's MAP@100 (= map_cut_100).
TREC_MEASURES = frozenset({"map", "map_cut.100", "P.10,100", "recip_rank", "num_rel_ret", "num_rel"})
TREC_OUTPUT = ("map", "map_cut_100", "P_10", "P_100", "recip_rank", "num_rel_ret", "num_rel")


def relevance(hits: np.ndarray, doc_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """`(Q, k)` bool: hit j of query i is an image of the query's class (-1, an unknown hit, never is)."""
    return (hits >= 0) & (doc_labels[np.maximum(hits, 0)] == query_labels[:, None])


def relevant_counts(doc_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """R of each query: how many documents share its class."""
    return np.bincount(doc_labels, minlength=int(query_labels.max(initial=0)) + 1)[query_labels]


def average_precision_at_k(relevant: np.ndarray, num_relevant: np.ndarray) -> np.ndarray:
    """trec_eval's AP of each k-deep ranking: Σ precision at each relevant hit / R.

    >>> average_precision_at_k(np.array([[True, False, True]]), np.array([4]))
    array([0.41666667])
    """
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision = np.cumsum(relevant, axis=1) / ranks
    return (precision * relevant).sum(axis=1) / np.maximum(num_relevant, 1)


def normalised_average_precision_at_k(relevant: np.ndarray) -> np.ndarray:
    """The deep-hashing mAP@k: Σ precision at each relevant hit / relevant hits in the top k (0 if none)."""
    return average_precision_at_k(relevant, relevant.sum(axis=1))


def precision_at(relevant: np.ndarray, k: int) -> np.ndarray:
    """trec_eval's P@k: relevant hits in the top k / k, also when fewer than k were returned."""
    return relevant[:, :k].sum(axis=1) / k


@dataclass
class FullRanking:
    """AP of every query over the whole collection, and the mean interpolated precision–recall curve."""

    average_precision: np.ndarray  # (Q,)
    recall: np.ndarray  # (P,) recall levels 0..1
    precision: np.ndarray  # (P,) mean interpolated precision at each level


def full_ranking(query_vectors: np.ndarray, query_labels: np.ndarray, doc_vectors: np.ndarray,
                 doc_labels: np.ndarray, *, chunk: int = 256, recall_points: int = 101) -> FullRanking:
    """Rank every document for every query by inner product (chunked, so 10k × 50k fits in memory).

    Only the ranks of the relevant documents matter: the i-th best relevant one sits at rank
    i + (irrelevant documents scored above it), found by binary search in the sorted irrelevant scores.
    """
    grid = np.linspace(0.0, 1.0, recall_points)
    ap = np.zeros(len(query_vectors))
    curve = np.zeros(recall_points)
    for start in range(0, len(query_vectors), chunk):
        scores = query_vectors[start:start + chunk] @ doc_vectors.T
        labels = query_labels[start:start + chunk]
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            mask = doc_labels == label
            if not mask.any():
                continue
            positive = -np.sort(-scores[np.ix_(rows, np.flatnonzero(mask))], axis=1)  # best first
            negative = np.sort(scores[np.ix_(rows, np.flatnonzero(~mask))], axis=1)
            for row, pos, neg in zip(rows, positive, negative, strict=True):
                precision = _precision_at_each_relevant(pos, neg)
                ap[start + row] = precision.mean()
                # interpolated precision at recall r: the best precision at any recall ≥ r
                interpolated = np.maximum.accumulate(precision[::-1])[::-1]
                curve += interpolated[np.clip(np.ceil(grid * len(pos)).astype(int) - 1, 0, len(pos) - 1)]
    return FullRanking(average_precision=ap, recall=grid, precision=curve / max(len(query_vectors), 1))


def _precision_at_each_relevant(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Precision at the rank of each relevant document, given relevant scores best first and
    irrelevant scores ascending (ties count in the relevant document's favour)."""
    above = len(negative) - np.searchsorted(negative, positive, side="right")
    found = np.arange(1, len(positive) + 1)
    return found / (found + above)


def retrieval_metrics(relevant: np.ndarray, num_relevant: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query top-k metrics of a ranking, named like trec_eval's where trec_eval has them."""
    return {
        "map": average_precision_at_k(relevant, num_relevant),
        "map_normalised": normalised_average_precision_at_k(relevant),
        "P_10": precision_at(relevant, 10),
        "P_100": precision_at(relevant, 100),
    }


def trec_eval(query_ids: Sequence[str], query_labels: np.ndarray, hits: np.ndarray, doc_ids: Sequence[str],
              doc_labels: np.ndarray, *, chunk: int = 250) -> dict[str, np.ndarray]:
    """trec_eval's per-query measures (`TREC_MEASURES`) through pytrec_eval, in order of `query_ids`.

    Qrels list every same-class document (10k queries × 5k = 50M judgements), too many to hold at
    once, so queries go through in chunks; a query with no hits scores 0 (trec_eval -c).
    """
    judged = {int(label): {doc_ids[i]: 1 for i in np.flatnonzero(doc_labels == label)}
              for label in np.unique(query_labels)}
    per_query: dict[str, list[float]] = {name: [] for name in TREC_OUTPUT}
    for start in range(0, len(query_ids), chunk):
        ids = query_ids[start:start + chunk]
        qrels = {qid: judged[int(label)] for qid, label in zip(ids, query_labels[start:start + chunk], strict=True)}
        run = {qid: run_entries(hits[start + i], doc_ids) for i, qid in enumerate(ids)}
        results = pytrec_eval.RelevanceEvaluator(qrels, set(TREC_MEASURES)).evaluate(run)
        for qid in ids:
            measures = results.get(qid, {})
            for name in TREC_OUTPUT:
                per_query[name].append(measures.get(name, 0.0))
    return {measure: np.asarray(values) for measure, values in per_query.items()}


def run_entries(hits: np.ndarray, doc_ids: Sequence[str]) -> dict[str, float]:
    """One query's run as trec_eval reads it, best first: docno → score (unknown hits left out).

    trec_eval re-sorts each run by score held as a 32-bit float, ties broken by docno, so cosines
    closer than ~1e-7 would swap; a score of k − position keeps the system's order exactly.
    """
    return {doc_ids[hit]: float(len(hits) - position) for position, hit in enumerate(hits) if hit >= 0}


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """`(C, C)` counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def per_class_mean(values: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean of a per-query value over the queries of each class (NaN for a class without queries)."""
    sums = np.bincount(labels, weights=values, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    return np.divide(sums, counts, out=np.full(num_classes, np.nan), where=counts > 0)
