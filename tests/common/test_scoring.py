"""The score scale, one place: cosine + 1.0, on the FAISS and the Elasticsearch kNN scales alike; and the visual
similarity read off it."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.scoring import score_from_cosine, score_from_es_knn, visual_similarities
from services.embedder.vectors import PcaProjection, build_vectors


def test_score_is_cosine_plus_one_on_both_scales() -> None:
    assert score_from_cosine(1.0) == 2.0
    assert score_from_cosine(-1.0) == 0.0
    assert score_from_cosine(0.25) == pytest.approx(1.25)
    # Elasticsearch kNN reports (1 + cos) / 2 for cosine similarity.
    assert score_from_es_knn((1 + 0.25) / 2) == pytest.approx(1.25)
    assert score_from_cosine(1.0000001) == 2.0  # float noise never leaves [0, 2]


def fused(count: int, *, visual_dims: int = 8, classes: int = 3, weight: float = 2.0, seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    """`count` vectors as the embedder builds them (`build_vectors`), and their predicted classes."""
    rng = np.random.default_rng(seed)
    projection = PcaProjection(mean=np.zeros(visual_dims, np.float32), components=np.eye(visual_dims, dtype=np.float32))
    predicted = rng.integers(0, classes, size=count)
    vectors = build_vectors(rng.normal(size=(count, visual_dims)).astype(np.float32), predicted,
                            projection=projection, pca_dims=visual_dims, onehot_weight=weight, num_classes=classes)
    return vectors, predicted


def visual_cosine(a: np.ndarray, b: np.ndarray, visual_dims: int = 8) -> float:
    a, b = a[:visual_dims].astype(np.float64), b[:visual_dims].astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("weight", [0.0, 1.0, 2.0, 3.0])
def test_visual_similarity_is_the_cosine_of_the_visual_parts(weight: float) -> None:
    vectors, predicted = fused(40, weight=weight)
    query = vectors[0]
    rocchio = vectors[1] + vectors[2] - 0.5 * vectors[3]  # a query by examples: no image's layout
    rocchio /= np.linalg.norm(rocchio)
    for q in (query, rocchio):
        scores = [score_from_cosine(float(np.float32(q @ vector))) for vector in vectors]  # float32, as stored
        similarities = visual_similarities(scores, [int(c) for c in predicted], query=q, visual_dims=8,
                                           onehot_weight=weight)
        assert similarities == pytest.approx([visual_cosine(q, vector) for vector in vectors], abs=2e-6)


def test_same_class_hits_that_score_alike_are_told_apart() -> None:
    vectors, predicted = fused(200, classes=2)
    same = [i for i in range(1, 200) if predicted[i] == predicted[0]]
    scores = [score_from_cosine(float(vectors[0] @ vectors[i])) for i in same]
    similarities = visual_similarities(scores, [int(predicted[0])] * len(scores), query=vectors[0], visual_dims=8,
                                       onehot_weight=2.0)
    assert max(scores) - min(scores) < 0.5  # the one-hot crowds them near 2.0 ...
    assert max(similarities) - min(similarities) > 1.0  # ... the visual part alone spreads them over [-1, 1]


def test_visual_similarity_is_undefined_without_a_visual_part_or_a_known_class() -> None:
    onehot_only = np.zeros(10, np.float32)
    onehot_only[8] = 1.0
    assert visual_similarities([1.8], [0], query=onehot_only, visual_dims=8, onehot_weight=2.0) == [None]
    vectors, _ = fused(1)
    assert visual_similarities([1.8, 1.8], [None, 5], query=vectors[0], visual_dims=8, onehot_weight=2.0) == [
        None, None]
