"""`cbir train-bovw` (services/training/bovw.py): the vocabulary sweep, a grid search per feature set and
classifier, the served pair, the bundle it writes, and the options it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import TINY_BOVW_OPTIONS, train_tiny_bovw_bundle

from services.common.errors import TrainingError
from services.training.bovw import CLASSIFIERS, get_args_parser, train_bovw


def test_it_sweeps_the_vocabulary_searches_every_cell_and_serves_the_best_by_cv(bovw_bundle_dir: Path) -> None:
    metadata = json.loads((bovw_bundle_dir / "bundle.json").read_text())
    assert metadata["family"] == "bovw" and metadata["format"] == 2
    training = metadata["training"]
    results = json.loads((bovw_bundle_dir.parent / "results.json").read_text())
    assert results["version"] == metadata["version"] and results["training"]["cells"] == training["cells"]

    sweep = training["vocabulary_sweep"]
    assert [r["words"] for r in sweep] == [8, 16, 24]
    chosen = min(sweep, key=lambda r: r["davies_bouldin"])
    assert [r["chosen"] for r in sweep] == [r is chosen for r in sweep]
    assert training["vocabulary_size"] == chosen["words"]

    cells = training["cells"]
    assert {(c["feature_set"], c["classifier"]) for c in cells} == {
        (f, c) for f in ("hog+sift", "gch") for c in ("logreg", "gnb")}
    for cell in cells:
        grid = CLASSIFIERS[cell["classifier"]][2]
        assert all(cell["best_params"][name] in values for name, values in grid.items())
        assert all(0 <= cell[m] <= 1 for m in ("cv_accuracy", "train_accuracy", "test_accuracy", "test_precision"))
    assert next(c for c in cells if c["feature_set"] == "hog+sift")["dims"] == 324 + chosen["words"]
    best = max(cells, key=lambda c: c["cv_accuracy"])
    assert training["served"] == {"feature_set": best["feature_set"], "classifier": best["classifier"]}
    assert metadata["metrics"]["test_accuracy"] == best["test_accuracy"]
    assert set(metadata["architecture"]["features"]) == set(best["feature_set"].split("+"))
    # Its keypoint measurement says why SIFT is dense.
    keypoints = training["sift_keypoints"]
    assert keypoints["images"] == 200 and keypoints["dense_grid"]["per_image"] == 49
    # HOG+SIFT learns something: better than chance on images it never saw (measured: about 0.3).
    assert max(c["test_accuracy"] for c in cells if c["feature_set"] == "hog+sift") > 0.15


def test_serve_picks_the_pair_it_names(tmp_path: Path, mini_collection: Path) -> None:
    directory = train_tiny_bovw_bundle(mini_collection, tmp_path, "--serve", "gch:gnb")
    metadata = json.loads((directory / "bundle.json").read_text())
    assert metadata["training"]["served"] == {"feature_set": "gch", "classifier": "gnb"}
    assert metadata["architecture"]["features"] == ["gch"] and metadata["version"].startswith("bovw-gch-10c-")
    assert metadata["vector"]["pca_dims"] == 32  # every component of the 32-bin histogram


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--classifiers", "logreg,svm", "--classifiers"),
    ("--feature-sets", "hog+hog", "--feature-sets"),
    ("--vocabulary-sizes", "8,many", "--vocabulary-sizes"),
    ("--folds", "1", "--folds"),
    ("--serve", "hog:rf", "--serve"),
])
def test_it_refuses_options_no_run_can_use(tmp_path: Path, mini_collection: Path, option: str, value: str,
                                           message: str) -> None:
    args = get_args_parser().parse_args(["--data-dir", str(mini_collection), "--output", str(tmp_path / "b"),
                                         *TINY_BOVW_OPTIONS, option, value])
    with pytest.raises(TrainingError, match=message):
        train_bovw(args)
    assert not (tmp_path / "b").exists()
