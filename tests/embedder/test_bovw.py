"""The Bag-of-Visual-Words descriptors and model (services/embedder/bovw.py): what each descriptor
measures, the dense SIFT grid, quantisation against the vocabulary, early fusion, and the bundle's
model through the embedder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.svm import LinearSVC

from services.embedder import bovw
from services.embedder.bundle import load_bundle
from services.embedder.runtime import Embedder


def flat(value: int, count: int = 1) -> np.ndarray:
    return np.full((count, 32, 32, 3), value, np.uint8)


def stripes(vertical: bool) -> np.ndarray:
    image = np.zeros((32, 32, 3), np.uint8)
    if vertical:
        image[:, ::4] = 255
    else:
        image[::4] = 255
    return image[None]


def test_gray_colour_histogram_puts_every_pixel_in_its_gray_level_bin() -> None:
    histogram = bovw.gch_descriptors(bovw.gray(np.concatenate([flat(0), flat(200)])))
    assert histogram.shape == (2, bovw.GCH_BINS)
    np.testing.assert_allclose(histogram.sum(axis=1), 1.0)
    assert histogram[0, 0] == 1.0 and histogram[1, 200 * bovw.GCH_BINS // 256] == 1.0
    half = flat(0)
    half[0, :16] = 255
    assert bovw.gch_descriptors(bovw.gray(half))[0, [0, -1]].tolist() == [0.5, 0.5]


def test_hog_has_324_values_at_32x32_and_tells_edge_directions_apart() -> None:
    vertical, horizontal = (bovw.hog_descriptors(bovw.gray(stripes(v))) for v in (True, False))
    assert vertical.shape == (1, 324)
    assert not bovw.hog_descriptors(bovw.gray(flat(90))).any()  # no gradients, no histogram mass
    assert np.linalg.norm(vertical - horizontal) > 1.0


def test_dense_sift_computes_the_same_grid_on_every_image_where_the_detector_finds_nothing() -> None:
    images = np.concatenate([flat(128), stripes(True), stripes(False)])
    grays = bovw.gray(images)
    assert bovw.detected_keypoints(grays[:1]).tolist() == [0]  # why the descriptors are dense
    descriptors = bovw.sift_descriptors(grays)
    assert descriptors.shape == (3, 49, 128) and len(bovw.dense_keypoints(32)) == 49
    assert not descriptors[0].any() and descriptors[1].any()
    np.testing.assert_array_equal(descriptors, bovw.sift_descriptors(grays))  # deterministic


def test_word_histograms_count_each_descriptor_at_its_nearest_centre() -> None:
    rng = np.random.default_rng(0)
    vocabulary = rng.normal(size=(12, 128)).astype(np.float32)
    sift = rng.normal(size=(5, 49, 128)).astype(np.float32)
    histograms = bovw.word_histograms(sift, vocabulary)
    nearest = np.linalg.norm(sift[:, :, None, :] - vocabulary[None, None], axis=-1).argmin(axis=-1)
    expected = np.stack([np.bincount(row, minlength=12) / 49 for row in nearest])
    np.testing.assert_allclose(histograms, expected, atol=1e-6)


def test_early_fusion_concatenates_the_blocks_in_one_order_whatever_order_is_asked() -> None:
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    descriptors = bovw.Descriptors.of(images)
    vocabulary = np.random.default_rng(2).uniform(0, 60, (10, 128)).astype(np.float32)
    fused = descriptors.fused(["sift", "gch"], vocabulary)
    assert fused.shape == (4, bovw.GCH_BINS + 10)
    np.testing.assert_array_equal(fused[:, :bovw.GCH_BINS], descriptors.gch)
    np.testing.assert_allclose(fused[:, bovw.GCH_BINS:].sum(axis=1), 1.0, atol=1e-6)
    for bad in (["hog", "hog"], ["colour"], []):
        with pytest.raises(ValueError, match="gch, hog, sift"):
            bovw.check_features(bad)


def test_a_linear_svm_confidence_is_a_softmax_of_its_decision_values() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(60, 4)), np.arange(60) % 3
    svm = LinearSVC(dual="auto").fit(x, y)
    probabilities = bovw.class_probabilities(svm, x)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), svm.predict(x))


def test_the_embedder_runs_a_bovw_bundle_as_it_runs_a_network(bovw_bundle_dir: Path, mini_collection: Path) -> None:
    bundle = load_bundle(bovw_bundle_dir)
    assert bundle.family == "bovw" and bundle.version.startswith("bovw-")
    embedder = Embedder(bundle, device="cpu", compile=True)
    assert embedder.compile_sizes == ()  # nothing of a BOVW model compiles
    images = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    embeddings = embedder.embed_batch(images)
    assert [len(e.vector) for e in embeddings] == [embedder.dims] * 3
    np.testing.assert_allclose([np.linalg.norm(e.vector) for e in embeddings], 1.0, rtol=1e-5)
    descriptors, probabilities = bundle.model.predict(images)
    assert [e.label for e in embeddings] == [bundle.classes[i] for i in probabilities.argmax(axis=1)]
    assert descriptors.shape == (3, bundle.model.dims)
