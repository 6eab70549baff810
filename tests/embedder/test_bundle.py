"""The model bundle: a round trip gives the trained predictions, damage is refused by name, and the
bundle carries its preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factories import BUNDLE_DAMAGES, copy_bundle, damage_bundle

from services.common.errors import BundleError
from services.embedder.bundle import load_bundle
from services.embedder.inference import Preprocessing
from services.embedder.runtime import Embedder


def test_bundle_round_trip_gives_the_trained_predictions(tiny_bundle_dir: Path, mini_collection: Path) -> None:
    bundle = load_bundle(tiny_bundle_dir)
    metadata = json.loads((tiny_bundle_dir / "bundle.json").read_text())
    assert metadata["version"] == bundle.version
    assert metadata["classes"][0] == "airplane" and len(metadata["classes"]) == 10
    assert {"test_accuracy", "test_accuracy_flip_tta"} <= metadata["metrics"].keys()
    assert metadata["training"]["command"].startswith("cbir train")
    embedder = Embedder(bundle)
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    first, again = embedder.embed_batch(images), Embedder(load_bundle(tiny_bundle_dir)).embed_batch(images)
    np.testing.assert_allclose(first[0].vector, again[0].vector, atol=1e-6)
    assert embedder.dims == 26 and first[0].vector.shape == (26,)


@pytest.mark.parametrize("damage", BUNDLE_DAMAGES)
def test_broken_bundle_is_refused_with_a_clear_message(tmp_path: Path, tiny_bundle_dir: Path, damage: str) -> None:
    bundle = copy_bundle(tiny_bundle_dir, tmp_path / "bundle")
    damage_bundle(bundle, damage)
    with pytest.raises(BundleError, match="cbir train|do not match"):
        load_bundle(bundle)


def test_the_bundle_carries_its_preprocessing_and_older_bundles_get_the_defaults(
        tmp_path: Path, tiny_bundle_dir: Path) -> None:
    written = load_bundle(tiny_bundle_dir).preprocessing
    assert written == Preprocessing(image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                                    resize="lanczos", flip_tta=True)
    bundle = copy_bundle(tiny_bundle_dir, tmp_path / "bundle",
                         lambda m: m.update(preprocessing={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    older = load_bundle(bundle).preprocessing
    assert (older.image_size, older.resize, older.flip_tta, older.mean) == (32, "lanczos", False, (0.5, 0.5, 0.5))
    info = Embedder(load_bundle(bundle)).info()
    assert (info.image_size, info.resize) == (32, "lanczos")


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["preprocessing"].update(resize="sinc"), "resample filter 'sinc' is not one of: nearest"),
    (lambda m: m["preprocessing"].update(std=[0.2, 0.0, 0.2]), "positive deviations"),
    (lambda m: m["architecture"].update(name="ResNet9"), "architecture 'ResNet9' is not one of: CifarVGG16"),
])
def test_a_bundle_with_unknown_preprocessing_or_architecture_is_refused(
        tmp_path: Path, tiny_bundle_dir: Path, change, message: str) -> None:
    bundle = copy_bundle(tiny_bundle_dir, tmp_path / "bundle", change)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_format_1_bundles_load_as_deep_ones_and_unknown_formats_or_families_are_refused(
        tmp_path: Path, tiny_bundle_dir: Path) -> None:
    def as_format_1(metadata: dict) -> None:
        metadata["format"] = 1
        del metadata["family"]

    old = load_bundle(copy_bundle(tiny_bundle_dir, tmp_path / "old", as_format_1))
    assert old.family == "deep" and old.version == load_bundle(tiny_bundle_dir).version
    with pytest.raises(BundleError, match="format 3; this cbir reads formats 1, 2"):
        load_bundle(copy_bundle(tiny_bundle_dir, tmp_path / "new", lambda m: m.update(format=3)))
    with pytest.raises(BundleError, match="family 'svm'; this cbir runs deep, bovw"):
        load_bundle(copy_bundle(tiny_bundle_dir, tmp_path / "svm", lambda m: m.update(family="svm")))


def test_a_bovw_classifier_holding_an_untrusted_type_is_refused_before_it_is_loaded(
        tmp_path: Path, bovw_bundle_dir: Path) -> None:
    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    bundle = copy_bundle(bovw_bundle_dir, tmp_path / "bundle")
    skops.io.dump(FunctionTransformer(func=print), bundle / "classifier.skops")  # a function it would call
    with pytest.raises(BundleError, match="holds types this cbir does not load: builtins.print"):
        load_bundle(bundle)
    (bundle / "classifier.skops").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="is corrupt"):
        load_bundle(bundle)


def test_a_bovw_bundle_whose_parts_do_not_fit_is_refused(tmp_path: Path, bovw_bundle_dir: Path) -> None:
    bundle = copy_bundle(bovw_bundle_dir, tmp_path / "bundle",
                         lambda m: m["architecture"].update(features=["hog", "colour"]))
    with pytest.raises(BundleError, match="the BOVW model in .* is invalid: feature set"):
        load_bundle(bundle)
