"""The score scale, one place: cosine + 1.0, on the FAISS and the Elasticsearch kNN scales alike."""

from __future__ import annotations

import pytest

from services.common.scoring import score_from_cosine, score_from_es_knn


def test_score_is_cosine_plus_one_on_both_scales() -> None:
    assert score_from_cosine(1.0) == 2.0
    assert score_from_cosine(-1.0) == 0.0
    assert score_from_cosine(0.25) == pytest.approx(1.25)
    # Elasticsearch kNN reports (1 + cos) / 2 for cosine similarity.
    assert score_from_es_knn((1 + 0.25) / 2) == pytest.approx(1.25)
    assert score_from_cosine(1.0000001) == 2.0  # float noise never leaves [0, 2]
