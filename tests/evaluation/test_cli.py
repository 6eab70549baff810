"""`cbir evaluate` end to end, and the settings it reads.

The end-to-end tests run the tiny bundle on the mini collection (50 train and 5 test images per
class, so R = 50 < k = 100 and the MAP@100 ceiling is 1), directly, against the indexed store,
and through the real search API served by uvicorn on a free local port.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from servers import serve_in_thread

from services.embedder.bundle import Bundle
from services.evaluation import cli as evaluate
from services.evaluation.features import embed_split, fuse, load_collection_split
from services.evaluation.settings import EvaluationSettings


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


def recompute(bundle: Bundle, collection: Path, cache: Path) -> dict:
    """Accuracy, confusion, per-class accuracy and mAP over every train image, by brute force from the
    embedder's vectors (the bundle's own vector settings)."""
    splits = {name: load_collection_split(collection, name, bundle.classes, preprocessing=bundle.preprocessing,
                                          cache_dir=cache) for name in ("test", "train")}
    features = {name: embed_split(bundle, split, purpose="index" if name == "train" else "query", cache_dir=cache)
                for name, split in splits.items()}
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


@pytest.mark.slow
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
    # Not to the last bit: the evaluation scores a chunk of queries in one float32 matrix product, this one query
    # by query, and the two sum in different orders on some CPUs (an AMD EPYC: 1.2e-6 apart, 2026-12-05, where an
    # Intel Xeon agreed within 1e-6), which reorders near-tied documents.
    assert metrics["map_all"] == pytest.approx(expected["map_all"], abs=1e-5)
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
    measured = pytrec_eval.RelevanceEvaluator(qrels, {"map", "P.10", "P.100"}).evaluate(run)
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
    from services.serve.apps import gateway_app

    direct = run_evaluate(tmp_path, "direct")
    store = run_evaluate(tmp_path, "store", "--against-store")
    with serve_in_thread(gateway_app()) as url:
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


def test_evaluate_takes_its_defaults_from_settings_and_flags_win(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CBIR_MODEL_DIR", "CBIR_DATA_DIR", "CBIR_STATE_DIR", "CBIR_EVAL_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("CBIR_EVAL_API_KEY=from-dotenv\nCBIR_MODEL_DIR=models/other\n")
    settings = EvaluationSettings.load()
    assert settings.reproduction_env() == {"CBIR_MODEL_DIR": "models/other"}
    args = evaluate.get_args_parser().parse_args(["--data-dir", "mine"])
    evaluate._apply_settings(args, settings)
    assert (args.api_key, args.model_dir, args.data_dir, args.state_dir) == (
        "from-dotenv", Path("models/other"), Path("mine"), None)
    flagged = evaluate.get_args_parser().parse_args(["--api-key", "from-flag"])
    evaluate._apply_settings(flagged, settings)
    assert flagged.api_key == "from-flag"


@pytest.mark.slow
def test_ablations_compare_single_view_index_with_the_queries_views(cbir_env: Path, tmp_path: Path,
                                                                   tiny_bundle_dir: Path, mini_collection: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from factories import copy_bundle

    from services.embedder.bundle import load_bundle
    from services.evaluation.runs import exact_search

    def queries_only(metadata: dict) -> None:
        metadata["preprocessing"].update(flip_tta=True, index_flip_tta=False)

    bundle_dir = copy_bundle(tiny_bundle_dir, tmp_path / "bundle", queries_only)
    monkeypatch.setenv("CBIR_MODEL_DIR", str(bundle_dir))
    result = run_evaluate(tmp_path, "views", "--ablations")
    mirrored, served = result["ablations"]["tables"]["index_views"]
    assert "mirror" in mirrored["variant"] and "as served" in served["variant"]
    assert served["map"] == pytest.approx(result["metrics"]["map_at_100"], abs=1e-9)  # the run itself
    # The other row, recomputed here: the train split embedded with the image and its mirror.
    bundle = load_bundle(bundle_dir)
    vector = bundle.vector_defaults
    splits = {name: load_collection_split(mini_collection, name, bundle.classes, preprocessing=bundle.preprocessing,
                                          cache_dir=tmp_path / "recompute") for name in ("test", "train")}
    queries, documents = (fuse(bundle, embed_split(bundle, splits[name], purpose="query", cache_dir=tmp_path / "r"),
                               pca_dims=vector["pca_dims"], onehot_weight=vector["onehot_weight"])
                          for name in ("test", "train"))
    hits = exact_search(queries, documents, 100)
    relevant = splits["train"].labels[hits] == splits["test"].labels[:, None]
    precision_at_100 = float(relevant.mean())
    assert mirrored["P_100"] == pytest.approx(precision_at_100, abs=1e-9)
    assert "### Index-side views" in (tmp_path / "reports" / "views.md").read_text()
