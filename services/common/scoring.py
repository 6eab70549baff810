"""The one place that knows a hit's score: cosine similarity + 1.0, so scores lie in [0, 2]; and how the
similarity a person reads (the cosine of the visual parts alone) follows from it."""

from __future__ import annotations

import math

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


def visual_similarity(score: float, hit_class: int | None, *, query: np.ndarray, visual_dims: int,
                      onehot_weight: float) -> float | None:
    """The cosine of the visual parts alone (the PCA embedding, without the one-hot) of the query vector and
    a hit, from the hit's `score` and its predicted class's index `hit_class` (its one-hot's position).

    A stored vector is `[u, w·e_c] / √(1 + w²)` with `u` of unit length (`build_vectors`), so for any query
    vector `q = [q_v, q_o]` the fused cosine is `(q_v·u + w·q_o[c]) / √(1 + w²)`, and
    `cos(q_v, u) = (cos_fused·√(1 + w²) − w·q_o[c]) / |q_v|`: exact, with no vector read back. For an image
    query (`q_o = w·e_p / √(1 + w²)`) it is `cos_fused·(1 + w²) − w²·[c = p]`; the float32 scores of either
    store carry it to about 1e-6. None when it is undefined: a query with no visual part, or a hit whose
    class is not the model's (`hit_class` None).

    >>> visual_similarity(1.99995, 3, query=vector, visual_dims=64, onehot_weight=2.0)
    0.99975
    """
    values = np.asarray(query, dtype=np.float64).ravel()
    visual_norm = float(np.linalg.norm(values[:visual_dims]))
    if hit_class is None or visual_norm < 1e-6:
        return None
    onehot = values[visual_dims + hit_class] if visual_dims + hit_class < values.size else 0.0
    weight = float(onehot_weight)
    cosine = ((score - SCORE_OFFSET) * math.sqrt(1.0 + weight * weight) - weight * onehot) / visual_norm
    return min(max(cosine, -1.0), 1.0)
