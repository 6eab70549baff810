"""`cbir evaluate`: the metrics against trec_eval's own code, and the command end to end.

The end-to-end tests run the tiny bundle on the mini collection (50 train and 5 test images per
class, so R = 50 < k = 100 and the MAP@100 ceiling is 1), directly, against the indexed store,
and through the real search API served by uvicorn on a free local port.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytrec_eval
from reliability_fixtures import serve_in_thread

from services.common.documents import document_id
from services.embedder.bundle import Bundle
from services.evaluation import cli as evaluate
from services.evaluation.features import embed_split, fuse, load_collection_split
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
from services.evaluation.runs import SearchApiError, document_rows, search_api


def trec(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], measures: set[str]) -> dict:
    return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


def run_of(scores: list[float]) -> dict[str, float]:
    return {f"d{i}": score for i, score in enumerate(scores)}


# --- metrics on hand-built rankings --------------------------------------------------------------


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


# --- the command, end to end ---------------------------------------------------------------------


def read_run(run_file: Path) -> dict[str, dict[str, float]]:
    """query → {document: score}, documents in the file's (rank) order, from a TREC run file."""
    run: dict[str, dict[str, float]] = {}
    for line in run_file.read_text().splitlines():
        qid, _, docno, _, score, _ = line.split()
        run.setdefault(qid, {})[docno] = float(score)
    return run


def run_evaluate(tmp_path: Path, name: str, *extra: str) -> dict:
    evaluate.main(["--output-dir", str(tmp_path / "reports"), "--cache-dir", str(tmp_path / "cache"),
                   "--name", name, "--quiet", *extra])
    return json.loads((tmp_path / "reports" / f"{name}.json").read_text())


@pytest.mark.slow
def recompute(bundle: Bundle, collection: Path, cache: Path) -> dict:
    """Accuracy, confusion, per-class accuracy and mAP over every train image, by brute force from the
    embedder's vectors (the bundle's own vector settings)."""
    splits = {name: load_collection_split(collection, name, bundle.classes, preprocessing=bundle.preprocessing,
                                          cache_dir=cache) for name in ("test", "train")}
    features = {name: embed_split(bundle, split, cache_dir=cache) for name, split in splits.items()}
    test_labels, train_labels = splits["test"].labels, splits["train"].labels
    predicted = features["test"].probabilities.argmax(axis=1)
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (test_labels, predicted), 1)
    vector = bundle.vector_defaults
    queries, documents = (fuse(bundle, features[name], pca_dims=vector["pca_dims"],
                               onehot_weight=vector["onehot_weight"]) for name in ("test", "train"))
    precisions = []
    for query, label in zip(queries, test_labels, strict=True):
        hits = train_labels[np.argsort(-(documents @ query), kind="stable")] == label
        precisions.append((np.cumsum(hits) / np.arange(1, len(hits) + 1))[hits].mean())
    return {"accuracy": float(np.mean(predicted == test_labels)), "confusion": confusion.tolist(),
            "per_class_accuracy": {name: float(np.mean(predicted[test_labels == c] == c))
                                   for c, name in enumerate(bundle.classes)},
            "map_all": float(np.mean(precisions))}


def test_evaluate_writes_json_report_figures_and_trec_run(cbir_env: Path, tmp_path: Path, tiny_bundle: Bundle,
                                                          mini_collection: Path) -> None:
    from services.cli import main as cbir

    cbir(["evaluate", "--output-dir", str(tmp_path / "reports"), "--cache-dir", str(tmp_path / "cache"),
          "--ablations", "--write-qrels", "--quiet"])
    reports = tmp_path / "reports"
    result = json.loads((reports / "evaluation.json").read_text())
    metrics = result["metrics"]
    assert (metrics["queries"], metrics["documents"], metrics["k"]) == (50, 500, 100)
    assert metrics["map_at_100_ceiling"] == pytest.approx(1.0)  # R = 50 < k
    assert metrics["map_cut_100"] == pytest.approx(metrics["map_at_100"])
    assert metrics["numpy_vs_trec_eval_max_diff"] < 1e-9

    # Recomputed here from the model's own predictions and vectors, without the evaluation's metrics code.
    expected = recompute(tiny_bundle, mini_collection, tmp_path / "recompute")
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert result["confusion_matrix"] == expected["confusion"]
    assert {name: row["accuracy"] for name, row in result["per_class"].items()} == pytest.approx(
        expected["per_class_accuracy"], abs=1e-12)
    assert all(row["queries"] == 5 for row in result["per_class"].values())
    assert metrics["map_all"] == pytest.approx(expected["map_all"], abs=1e-6)
    assert len(result["precision_recall"]["recall"]) == 101
    tables = result["ablations"]["tables"]
    assert {row["onehot_weight"] for row in tables["onehot_weight"]} == {0, 0.25, 0.5, 1, 1.5, 2, 4}
    assert [row["pca_dims"] for row in tables["pca_dims_fused"]] == [16, 32, None]  # the tiny PCA keeps 32
    assert tables["search"][0]["recall_at_k"] == 1.0 and len(tables["search"]) == 4
    report = (reports / "evaluation.md").read_text()
    assert f"{expected['accuracy']:.4f}" in report and "## Ablations" in report
    for figure in result["figures"].values():
        assert (reports / figure).stat().st_size > 1000 and f"]({figure})" in report
    assert len(result["figures"]) == 4
    run_lines = (reports / result["files"]["run"]).read_text().splitlines()
    assert len(run_lines) == 50 * 100
    qid, q0, docno, rank, _score, _tag = run_lines[0].split()
    assert (qid, q0, rank) == ("test/airplane/0000.jpg", "Q0", "1") and docno.startswith("train/")
    assert len((reports / result["files"]["qrels"]).read_text().splitlines()) == 50 * 50
    # the files alone reproduce trec_eval's number: the run, and qrels rebuilt from the compact labels
    run = read_run(reports / result["files"]["run"])
    labels = dict(line.split("\t") for line in (reports / result["files"]["labels"]).read_text().splitlines())
    qrels = {qid: {doc: 1 for doc, label in labels.items() if doc.startswith("train/") and label == labels[qid]}
             for qid in run}
    measured = trec(qrels, run, {"map", "P.10", "P.100"})
    for ours, theirs in (("map_at_100", "map"), ("P_10", "P_10"), ("P_100", "P_100")):
        assert np.mean([m[theirs] for m in measured.values()]) == pytest.approx(metrics[ours], abs=1e-12), ours
    # MAP over the relevant documents each run retrieved, from the run file alone.
    normalised = []
    for qid, ranked in run.items():
        hits = np.array([labels[doc] == labels[qid] for doc in ranked])
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        normalised.append(float((precision * hits).sum() / hits.sum()) if hits.any() else 0.0)
    assert metrics["map_at_100_normalised"] == pytest.approx(np.mean(normalised), abs=1e-9)


@pytest.mark.slow
def test_search_api_and_store_give_the_direct_path_metrics(indexed_state: Path, tmp_path: Path) -> None:
    from services.search.app import create_app

    direct = run_evaluate(tmp_path, "direct")
    store = run_evaluate(tmp_path, "store", "--against-store")
    with serve_in_thread(create_app()) as url:
        api = run_evaluate(tmp_path, "api", "--url", url, "--concurrency", "4")
    assert api["config"]["model_version"] == direct["config"]["model_version"]
    direct_run = read_run(tmp_path / "reports" / direct["files"]["run"])
    for result in (store, api):
        mode = result["config"]["mode"]
        assert result["metrics"]["accuracy"] == direct["metrics"]["accuracy"], mode
        # The same rankings, up to swaps of near-tied neighbours: the direct path scores all queries in
        # one FAISS call (a BLAS matrix product), the store and the API one query at a time, and the two
        # can round a float32 cosine differently in its last bit on some CPUs.
        run = read_run(tmp_path / "reports" / result["files"]["run"])
        assert run.keys() == direct_run.keys()
        moved = sum(a != b for q in run for a, b in zip(run[q], direct_run[q], strict=True))  # by rank
        assert moved <= 0.01 * len(run) * 100, (mode, moved)
        for name in ("map_at_100", "P_10", "P_100", "map_at_100_normalised", "map_all"):
            assert result["metrics"][name] == pytest.approx(direct["metrics"][name], abs=1e-4), (name, mode)
        assert result["metrics"]["unknown_hits"] == 0
    assert api["config"]["mode"] == "api" and store["config"]["mode"] == "store"


# --- the search API client -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_search_api_retries_busy_answers_and_maps_hit_ids(tmp_path: Path) -> None:
    query = tmp_path / "q.jpg"
    query.write_bytes(b"jpeg bytes")
    paths = ["train/cat/0.jpg", "train/dog/1.jpg"]
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(503, json={"detail": "busy"}, headers={"Retry-After": "1"})
        hits = [{"id": document_id(paths[1]), "score": 1.9}, {"id": "not-in-the-collection", "score": 1.5}]
        return httpx.Response(200, json={"query": {"predicted_label": "dog", "confidence": 0.9}, "hits": hits})

    ranking = await search_api("http://search", [query], classes=["cat", "dog"], doc_rows=document_rows(paths),
                               k=3, transport=httpx.MockTransport(answer))
    assert len(calls) == 2 and calls[1].url.params["k"] == "3"
    assert ranking.hits.tolist() == [[1, -1, -1]] and ranking.unknown_hits == 1
    assert ranking.predicted.tolist() == [1]


@pytest.mark.anyio
async def test_search_api_names_the_query_it_could_not_search(tmp_path: Path) -> None:
    query = tmp_path / "broken.jpg"
    query.write_bytes(b"x")
    transport = httpx.MockTransport(lambda request: httpx.Response(415, json={"detail": "not an image"}))
    with pytest.raises(SearchApiError, match="broken.jpg.*HTTP 415"):
        await search_api("http://search", [query], classes=["cat"], doc_rows={}, k=5, transport=transport)


def test_report_cells_keep_four_significant_digits_below_a_tenth() -> None:
    from services.evaluation.report import _cell

    # MAP@100 just under the 0.0185 must not print as 0.0185.
    assert _cell(0.018478) == "0.01848"
    assert _cell(0.92516) == "0.9252"
    assert _cell(0.0) == "0.0000"
    assert _cell(None) == "n/a"
