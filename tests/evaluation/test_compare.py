"""`cbir compare` (services/evaluation/compare.py): retrain and measure rows, render the study's tables from
their results, and reuse a committed result only while it describes the bundle present."""

from __future__ import annotations

import itertools
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
from sklearn.metrics import accuracy_score, precision_score
from tiny_models import TINY_BOVW_OPTIONS

from services.common.collection import REPO_ROOT
from services.common.errors import ConfigError
from services.embedder.bundle import load_bundle
from services.evaluation import compare
from services.evaluation.features import embed_split, load_collection_split

DEEP_ARGS = "--batch-size 50 --embedding-dim 32 --pca-components 16 --pca-dims 8"


def options(work: Path, *extra: str) -> list[str]:
    return ["--models-dir", str(work / "models"), "--results-dir", str(work / "results"), "--output-dir",
            str(work / "reports"), "--cache-dir", str(work / "cache"), "--rows", "bovw,cnn", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mini_collection: Path) -> Path:
    """`cbir compare --train` of the BOVW and small-CNN rows on the mini collection (a CNN budget of 3 s)."""
    work = tmp_path_factory.mktemp("compare")
    compare.main(options(work, "--train", "--budget-min", "0.05", "--data-dir", str(mini_collection),
                         "--train-args", DEEP_ARGS, "--bovw-args", shlex.join(TINY_BOVW_OPTIONS)))
    return work


def assert_measured_as_its_bundle_predicts(key: str, result: dict[str, Any], work: Path) -> None:
    """The row's retrieval figures are its `cbir evaluate` report's, and its accuracy and macro precision
    on each split are those of its bundle's predictions (from the features that evaluation cached)."""
    report = json.loads((work / "cache" / "reports" / f"{key}.json").read_text())
    assert result["retrieval"] == {name: report["metrics"][name]
                                   for name in ("map_at_100", "P_100", "map_all", "queries", "documents")}
    config, bundle, cache = report["config"], load_bundle(work / "models" / key), work / "cache" / "evaluation"
    for split, purpose, limit in (("train", "index", config["limit_per_class"]),
                                  ("test", "query", config["query_limit_per_class"])):
        images = load_collection_split(Path(config["data_dir"]), split, bundle.classes,
                                       preprocessing=bundle.preprocessing, cache_dir=cache, limit_per_class=limit)
        predicted = embed_split(bundle, images, purpose=purpose, cache_dir=cache).predicted
        assert result[split] == {
            "accuracy": round(float(accuracy_score(images.labels, predicted)), 4),
            "precision": round(float(precision_score(images.labels, predicted, average="macro", zero_division=0)), 4),
        }, (key, split)


@pytest.mark.slow
def test_train_retrains_measures_and_renders_the_rows_it_names(trained: Path) -> None:
    results = {key: json.loads((trained / "results" / f"{key}.json").read_text()) for key in ("bovw", "cnn")}
    assert sorted(p.name for p in (trained / "results").iterdir()) == ["bovw.json", "cnn.json"]
    cnn, bovw = results["cnn"], results["bovw"]
    assert cnn["bundle_version"] == json.loads((trained / "models" / "cnn" / "bundle.json").read_text())["version"]
    assert cnn["budget"]["minutes"] == 0.05 and cnn["budget"]["epochs_reached"] > 0
    assert {"--arch CifarCNN", "--time-budget-min 0.05"} <= {" ".join(pair) for pair in itertools.pairwise(
        cnn["train_command"].split())}
    assert cnn["retrieval"]["queries"] == 50 and cnn["retrieval"]["documents"] == 500
    assert bovw["family"] == "bovw" and len(bovw["bovw"]["cells"]) == 4
    for key, result in results.items():  # each row's numbers are its own bundle's, each split's its own
        assert_measured_as_its_bundle_predicts(key, result, trained)
    # BOVW's training measured its served cell on the same splits through its own code: the same numbers.
    served = json.loads((trained / "models" / "bovw" / "bundle.json").read_text())["metrics"]
    assert {split: bovw[split] for split in ("train", "test")} == {
        split: {"accuracy": served[f"{split}_accuracy"], "precision": served[f"{split}_precision"]}
        for split in ("train", "test")}

    report = (trained / "reports" / "comparison.md").read_text()
    cnn_line = next(line for line in report.splitlines() if line.startswith("| small CNN |"))
    assert f"{100 * cnn['test']['accuracy']:.1f}%" in cnn_line and "budget-limited: 0.05 min" in cnn_line
    assert f"{cnn['retrieval']['map_at_100']:.5f}" in cnn_line and "67.0%" in cnn_line  # the study's beside ours
    for row in compare.ROWS:  # every row of the study's table, measured or not
        assert f"| {row.title} | {row.study_title} |" in report
    assert report.count("not measured yet") == len(compare.ROWS) - 2
    for cell in bovw["bovw"]["cells"]:
        assert f"| {cell['feature_set']} | {cell['classifier_name']} | {cell['dims']} |" in report
    assert "chosen: **" in report and "500 train images" in report and "the 50 test images query" in report
    summary = json.loads((trained / "reports" / "comparison.json").read_text())
    assert [row["key"] for row in summary["rows"]] == list(compare.ROW_KEYS)
    for figure in summary["figures"].values():
        assert (trained / "reports" / figure).stat().st_size > 1000


@pytest.mark.slow
def test_committed_results_render_without_their_bundles_and_a_changed_bundle_is_measured_again(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mini_collection: Path) -> None:
    work = tmp_path / "clone"
    shutil.copytree(trained / "results", work / "results")  # a fresh clone: the results, no bundles

    def no_measuring(*args, **kwargs):
        raise AssertionError("a committed result was measured again")

    monkeypatch.setattr(compare, "measure_row", no_measuring)
    compare.main(options(work))
    report = (work / "reports" / "comparison.md").read_text()
    version = json.loads((work / "results" / "cnn.json").read_text())["bundle_version"]
    assert f"`{version}` (not here)" in report and "not measured yet" in report

    # The bundle present is not the one measured: measured again (and the result rewritten).
    shutil.copytree(trained / "models" / "cnn", work / "models" / "cnn")
    stale = json.loads((work / "results" / "cnn.json").read_text())
    (work / "results" / "cnn.json").write_text(json.dumps({**stale, "bundle_version": "cnn-10c-older"}))
    compare.main(options(work, "--rows", "bovw"))  # left out of --rows: shown, and said to be stale
    assert "`cnn-10c-older` (stale: the bundle here is another)" in (work / "reports" / "comparison.md").read_text()
    measured = []
    monkeypatch.setattr(compare, "measure_row", lambda row, bundle, args: measured.append(row.key) or stale)
    compare.main(options(work, "--data-dir", str(mini_collection)))
    assert measured == ["cnn"]
    assert json.loads((work / "results" / "cnn.json").read_text())["bundle_version"] == version


def test_it_names_the_rows_it_knows_when_asked_for_another(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--rows 'bovw,svm': name some of bovw, mlp, cnn"):
        compare.main(["--rows", "bovw,svm", "--results-dir", str(tmp_path)])


def test_the_committed_report_is_what_cbir_compare_renders_from_the_committed_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh clone has the results and the shipped bundle, not the other rows' bundles (here they may be
    # present, the ones measured): nothing is measured again.
    def no_measuring(*args, **kwargs):
        raise AssertionError("a committed result was measured again")

    monkeypatch.setattr(compare, "measure_row", no_measuring)
    monkeypatch.chdir(REPO_ROOT)
    compare.main(["--output-dir", str(tmp_path)])
    committed = (REPO_ROOT / "reports" / "comparison.md").read_text()
    rendered = (tmp_path / "comparison.md").read_text()
    assert rendered.replace(" (not here)", "") == committed.replace(" (not here)", "")
    for path in (REPO_ROOT / "reports" / "comparison").glob("*.json"):  # each committed row is in the report
        row = next(row for row in compare.ROWS if row.key == path.stem)
        line = next(line for line in committed.splitlines() if line.startswith(f"| {row.title} |"))
        assert "not measured yet" not in line and json.loads(path.read_text())["bundle_version"] in committed
    assert "not measured yet" not in committed  # and every row of the study's table has one
