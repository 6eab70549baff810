"""The retrieval metrics against trec_eval's own code (pytrec_eval), on hand-built rankings."""

from __future__ import annotations

import numpy as np
import pytest
import pytrec_eval

from services.evaluation.metrics import (
    average_precision_at_k,
    confusion_matrix,
    full_ranking,
    normalised_average_precision_at_k,
    per_class_mean,
    precision_at,
    relevance,
    relevant_counts,
    retrieval_metrics,
    trec_eval,
)


def trec(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], measures: set[str]) -> dict:
    return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


def run_of(scores: list[float]) -> dict[str, float]:
    return {f"d{i}": score for i, score in enumerate(scores)}


def test_average_precision_divides_by_all_relevant_like_trec_eval() -> None:
    # relevant at ranks 1 and 3 of a 5-deep run, 10 relevant documents in all
    relevant = np.array([[True, False, True, False, False]])
    expected = (1 / 1 + 2 / 3) / 10
    assert average_precision_at_k(relevant, np.array([10]))[0] == pytest.approx(expected)
    qrels = {"q": {f"d{i}": 1 for i in (0, 2)} | {f"r{i}": 1 for i in range(8)}}
    run = {"q": run_of([0.9, 0.8, 0.7, 0.6, 0.5])}
    assert trec(qrels, run, {"map"})["q"]["map"] == pytest.approx(expected)


def test_map_at_100_with_r_larger_than_the_cutoff_matches_trec_map_and_map_cut() -> None:
    rng = np.random.default_rng(3)
    relevant = rng.random((1, 150)) < 0.4
    qrels = {"q": {f"d{i}": 1 for i in np.flatnonzero(relevant[0])} | {f"unseen{i}": 1 for i in range(5000)}}
    num_relevant = np.array([len(qrels["q"])])
    cut = relevant[:, :100]
    ours = average_precision_at_k(cut, num_relevant)[0]
    assert ours <= 100 / num_relevant[0]  # the ceiling k / R
    run_100 = {"q": run_of(list(np.linspace(1, 0, 150))[:100])}
    run_150 = {"q": run_of(list(np.linspace(1, 0, 150)))}
    assert trec(qrels, run_100, {"map"})["q"]["map"] == pytest.approx(ours, abs=1e-12)
    assert trec(qrels, run_150, {"map_cut.100"})["q"]["map_cut_100"] == pytest.approx(ours, abs=1e-12)


def test_precision_at_k_counts_missing_hits_as_not_relevant() -> None:
    relevant = np.array([[True, True, False]])  # only 3 hits came back
    assert precision_at(relevant, 10)[0] == pytest.approx(0.2)
    qrels = {"q": {"d0": 1, "d1": 1, "x": 1}}
    assert trec(qrels, {"q": run_of([3, 2, 1])}, {"P.10"})["q"]["P_10"] == pytest.approx(0.2)


def test_normalised_average_precision_divides_by_relevant_retrieved() -> None:
    relevant = np.array([[False, True, True, False], [False, False, False, False]])
    assert normalised_average_precision_at_k(relevant) == pytest.approx([(1 / 2 + 2 / 3) / 2, 0.0])


def test_full_ranking_average_precision_and_precision_recall_curve() -> None:
    # one-dimensional "vectors": the inner product is the document's value
    documents = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]], dtype=np.float32)
    doc_labels = np.array([1, 0, 1, 0, 1])
    result = full_ranking(np.array([[1.0]], dtype=np.float32), np.array([1]), documents, doc_labels,
                          recall_points=11)
    assert result.average_precision[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert result.precision[0] == pytest.approx(1.0)
    assert result.precision[-1] == pytest.approx(3 / 5)
    assert np.all(np.diff(result.precision) <= 1e-12)  # interpolated precision never rises


def test_full_ranking_matches_trec_eval_map_on_a_full_run() -> None:
    rng = np.random.default_rng(0)
    documents = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(12, 8)).astype(np.float32)
    doc_labels, query_labels = rng.integers(0, 3, 300), rng.integers(0, 3, 12)
    result = full_ranking(queries, query_labels, documents, doc_labels, chunk=5)
    scores = queries @ documents.T
    qrels = {f"q{q}": {f"d{d}": 1 for d in np.flatnonzero(doc_labels == query_labels[q])} for q in range(12)}
    run = {f"q{q}": run_of(scores[q].tolist()) for q in range(12)}
    expected = trec(qrels, run, {"map"})
    assert result.average_precision == pytest.approx([expected[f"q{q}"]["map"] for q in range(12)], abs=1e-9)


def test_trec_eval_wrapper_agrees_with_the_numpy_metrics_across_chunks() -> None:
    rng = np.random.default_rng(1)
    doc_labels, query_labels = rng.integers(0, 4, 400), rng.integers(0, 4, 30)
    hits = np.stack([rng.permutation(400)[:100] for _ in range(30)])
    hits[0, 90:] = -1  # a query with fewer hits than k
    doc_ids = [f"train/{i}" for i in range(400)]
    measured = trec_eval([f"test/{q}" for q in range(30)], query_labels, hits, doc_ids, doc_labels, chunk=7)
    ours = retrieval_metrics(relevance(hits, doc_labels, query_labels), relevant_counts(doc_labels, query_labels))
    for name in ("map", "P_10", "P_100"):
        assert measured[name] == pytest.approx(ours[name], abs=1e-12), name
    assert measured["map_cut_100"] == pytest.approx(measured["map"], abs=1e-12)
    assert measured["num_rel"] == pytest.approx(relevant_counts(doc_labels, query_labels))


def test_confusion_matrix_and_per_class_means() -> None:
    true, predicted = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0])
    assert confusion_matrix(true, predicted, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert per_class_mean(np.array([1.0, 0.0, 1.0, 1.0, 0.0]), true, 4)[:3] == pytest.approx([0.5, 1.0, 0.5])
    assert np.isnan(per_class_mean(np.zeros(5), true, 4)[3])
