"""The one place that knows a hit's score: cosine similarity + 1.0, so scores lie in [0, 2]."""

from __future__ import annotations

SCORE_OFFSET = 1.0

# Elasticsearch's exact search; script_score rejects negative scores, hence the offset.
ES_SCRIPT_SOURCE = f"cosineSimilarity(params.query_vector, 'features') + {SCORE_OFFSET}"


def score_from_cosine(cosine: float) -> float:
    """Map a cosine similarity in [-1, 1] to the service's score in [0, 2]."""
    return float(min(max(cosine, -1.0), 1.0)) + SCORE_OFFSET


def score_from_es_knn(knn_score: float) -> float:
    """Elasticsearch's kNN score for `cosine` similarity is (1 + cos) / 2; bring it to our scale."""
    return score_from_cosine(2.0 * knn_score - 1.0)
