"""The one place that knows a hit's score: cosine similarity + 1.0, so scores lie in [0, 2]; and how the
similarity a person reads (the cosine of the visual parts alone) follows from it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SCORE_OFFSET = 1.0

# Elasticsearch's exact search; script_score rejects negative scores, hence the offset.
ES_SCRIPT_SOURCE = f"cosineSimilarity(params.query_vector, 'features') + {SCORE_OFFSET}"


def score_from_cosine(cosine: float) -> float:
    """Map a cosine similarity in [-1, 1] to the service's score in [0, 2]."""
    return float(min(max(cosine, -1.0), 1.0)) + SCORE_OFFSET


def score_from_es_knn(knn_score: float) -> float:
    """Elasticsearch's kNN score for `cosine` similarity is (1 + cos) / 2; bring it to our scale."""
    return score_from_cosine(2.0 * knn_score - 1.0)


def visual_similarities(scores: Sequence[float], hit_classes: Sequence[int | None], *, query: np.ndarray,
                        visual_dims: int, onehot_weight: float) -> list[float | None]:
    """The cosine of the visual parts alone (the PCA embedding, without the one-hot) of the `query` vector and
    each hit, read off the hit's score and the index of its predicted class (its one-hot's position).

    A stored vector is `[u, w·e_c] / √(1 + w²)` with `u` of unit length (`build_vectors`), so for any query
    vector `q = [q_v, q_o]` the fused cosine is `(q_v·u + w·q_o[c]) / √(1 + w²)`, and
    `cos(q_v, u) = (cos_fused·√(1 + w²) − w·q_o[c]) / |q_v|`: exact, with no vector read back. For an image
    query (`q_o = w·e_p / √(1 + w²)`) it is `cos_fused·(1 + w²) − w²·[c = p]`; the float32 scores of either
    store carry it to about 1e-6. None where it is undefined: a query with no visual part, or a hit whose
    class is not the model's (None in `hit_classes`).

    >>> visual_similarities([1.99995], [3], query=vector, visual_dims=64, onehot_weight=2.0)
    [0.99975]
    """
    values = np.asarray(query, dtype=np.float64).ravel()
    visual_norm = float(np.linalg.norm(values[:visual_dims]))
    if visual_norm < 1e-6:
        return [None] * len(scores)
    stretch, weight = math.sqrt(1.0 + onehot_weight * onehot_weight), float(onehot_weight)
    onehot = values[visual_dims:].tolist()
    similarities: list[float | None] = []
    for score, hit_class in zip(scores, hit_classes, strict=True):
        if hit_class is None or hit_class >= len(onehot):
            similarities.append(None)
            continue
        cosine = ((score - SCORE_OFFSET) * stretch - weight * onehot[hit_class]) / visual_norm
        similarities.append(min(max(cosine, -1.0), 1.0))
    return similarities
