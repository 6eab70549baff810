"""Vector fusion: dims, norms, one-hot placement, the configuration limits."""

from __future__ import annotations

import numpy as np
import pytest

from services.embedder.vectors import PcaProjection, build_vectors, check_vector_config


@pytest.fixture
def projection() -> PcaProjection:
    rng = np.random.default_rng(0)
    return PcaProjection.fit(rng.normal(size=(300, 32)).astype(np.float32), dims=16)


def test_fused_vectors_have_pca_plus_class_dims_and_unit_norm(projection: PcaProjection) -> None:
    embeddings = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    vectors = build_vectors(embeddings, np.array([0, 3, 9, 3, 1]), projection=projection, pca_dims=8,
                            onehot_weight=2.0, num_classes=10)
    assert vectors.shape == (5, 18)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_one_hot_sits_after_the_embedding_at_the_predicted_class(projection: PcaProjection) -> None:
    embeddings = np.random.default_rng(2).normal(size=(3, 32)).astype(np.float32)
    vectors = build_vectors(embeddings, np.array([4, 0, 9]), projection=projection, pca_dims=8,
                            onehot_weight=2.0, num_classes=10)
    onehots = vectors[:, 8:]
    assert onehots.argmax(axis=1).tolist() == [4, 0, 9]
    assert np.count_nonzero(onehots, axis=1).tolist() == [1, 1, 1]
    # The reduced embedding has norm 1 before the second normalisation: w / sqrt(1 + w²) of it is one-hot.
    np.testing.assert_allclose(onehots.max(axis=1), 2.0 / np.sqrt(5.0), rtol=1e-5)


def test_weight_above_sqrt2_ranks_every_same_class_image_first(projection: PcaProjection) -> None:
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(200, 32)).astype(np.float32)
    predicted = rng.integers(0, 10, size=200)
    vectors = build_vectors(embeddings, predicted, projection=projection, pca_dims=16, onehot_weight=1.5,
                            num_classes=10)
    similarities = vectors @ vectors[0]
    same = predicted == predicted[0]
    assert similarities[same].min() > similarities[~same].max()


def test_zero_weight_is_the_embedding_alone(projection: PcaProjection) -> None:
    embeddings = np.random.default_rng(4).normal(size=(4, 32)).astype(np.float32)
    vectors = build_vectors(embeddings, np.array([1, 2, 3, 4]), projection=projection, pca_dims=8,
                            onehot_weight=0.0, num_classes=10)
    assert not vectors[:, 8:].any()


def test_vector_config_limits() -> None:
    with pytest.raises(ValueError, match="outside"):
        check_vector_config(pca_dims=300, num_classes=10, max_pca_dims=256)
    with pytest.raises(ValueError, match="exceeds 4096"):
        check_vector_config(pca_dims=4090, num_classes=10, max_pca_dims=5000)
