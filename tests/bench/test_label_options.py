"""bench/label_options.py: its shifted views, its nearest-neighbour vote and its ensembles."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from bench_helpers import load_bench_script
from tiny_models import train_tiny_bundle

from services.embedder.bundle import load_bundle
from services.evaluation.features import embed_split, load_collection_split


def load_script() -> ModuleType:
    return load_bench_script("label_options")


def test_shifted_moves_pixels_and_fills_with_zeros() -> None:
    batch = torch.zeros(1, 3, 8, 8)
    batch[0, :, 5, 6] = 1.0  # row 5, column 6
    left = load_script().shifted(batch, dx=2, dy=0)  # the window moves right, the content left
    assert left.shape == batch.shape
    assert left[0, 0, 5, 4] == 1.0 and left.sum() == 3.0
    down = load_script().shifted(batch, dx=0, dy=-2)
    assert down[0, 0, 7, 6] == 1.0 and down.sum() == 3.0
    assert load_script().shifted(batch, dx=-2, dy=0)[0, 0, 5].sum() == 0.0  # column 8 is off the frame


def test_prints_every_option_and_the_one_nearest_neighbour_vote(
    tiny_bundle_dir: Path, mini_collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load_script().main(["--model-dir", str(tiny_bundle_dir), "--data-dir", str(mini_collection),
                        "--cache-dir", str(tmp_path), "--batch-size", "20"])
    rows = dict(line.split(" | ", 1) for line in capsys.readouterr().out.splitlines() if " | " in line)
    views = load_script().VIEW_SETS
    assert all(0.0 <= float(rows[name]) <= 1.0 for name in views)

    # k = 1: the class of the train image with the most similar raw embedding, computed here.
    bundle = load_bundle(tiny_bundle_dir)
    test, train = (load_collection_split(mini_collection, split, bundle.classes, preprocessing=bundle.preprocessing,
                                         cache_dir=tmp_path) for split in ("test", "train"))
    query = embed_split(bundle, test, purpose="query", cache_dir=tmp_path).embeddings
    document = embed_split(bundle, train, purpose="index", cache_dir=tmp_path).embeddings
    query, document = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (query, document))
    nearest = train.labels[(query @ document.T).argmax(axis=1)]
    assert float(rows["1"].split(" | ")[0]) == pytest.approx((nearest == test.labels).mean(), abs=1e-4)
    assert {"5", "10", "20", "50", "100"} <= rows.keys()


def test_ensembles_every_combination_of_the_bundles(
    tiny_bundle_dir: Path, mini_collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = train_tiny_bundle(mini_collection, tmp_path / "other", epochs=2, seed=2)  # a second network
    load_script().main(["--model-dir", str(tiny_bundle_dir), "--data-dir", str(mini_collection),
                        "--cache-dir", str(tmp_path / "cache"), "--with-bundle", str(other)])
    out = capsys.readouterr().out
    rows = dict(line.split(" | ", 1) for line in out.split("ensemble", 1)[1].splitlines()[1:] if " | " in line)
    bundles = [load_bundle(path) for path in (tiny_bundle_dir, other)]
    assert list(rows) == [bundles[0].version, bundles[1].version, f"{bundles[0].version} + {bundles[1].version}"]

    test = load_collection_split(mini_collection, "test", bundles[0].classes, preprocessing=bundles[0].preprocessing,
                                 cache_dir=tmp_path)
    served = [embed_split(bundle, test, purpose="query", cache_dir=tmp_path).probabilities for bundle in bundles]
    expected = ((served[0] + served[1]).argmax(axis=1) == test.labels).mean()
    assert float(rows[f"{bundles[0].version} + {bundles[1].version}"]) == pytest.approx(expected, abs=1e-4)
