"""The ablations (services/evaluation/ablations.py) on small arrays whose answers are known: the variants
around the defaults in force, each measured once, what the one-hot weight does to the ranking, and
HNSW against exact search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.embedder.bundle import Bundle
from services.embedder.inference import Preprocessing
from services.evaluation import ablations
from services.evaluation.ablations import (
    HNSW_EF_SEARCH,
    ONEHOT_WEIGHTS,
    AblationData,
    Variant,
    compare_search,
    measure_variant,
    run_ablations,
    variant_groups,
)
from services.evaluation.features import Features, fuse, identity_projection

CLASSES, DIMS, PER_CLASS, QUERIES_PER_CLASS = 4, 40, 10, 3


def features(labels: np.ndarray, predicted: np.ndarray, *, seed: int) -> Features:
    """Embeddings near their class's centre (noisy enough that classes overlap) and the predicted classes'
    probabilities."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(CLASSES, DIMS))
    embeddings = centres[labels] + rng.normal(scale=2.0, size=(len(labels), DIMS))
    return Features(embeddings=embeddings.astype(np.float32),
                    probabilities=np.eye(CLASSES, dtype=np.float32)[predicted])


@pytest.fixture
def data() -> AblationData:
    """A 'bundle' whose PCA keeps the raw embedding; every document and query predicted correctly."""
    bundle = Bundle(path=Path("synthetic"), metadata={"classes": [f"class{c}" for c in range(CLASSES)]}, model=None,
                    projection=identity_projection(DIMS), preprocessing=Preprocessing())
    doc_labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    query_labels = np.repeat(np.arange(CLASSES), QUERIES_PER_CLASS)
    return AblationData(bundle=bundle, train=features(doc_labels, doc_labels, seed=1),
                        test=features(query_labels, query_labels, seed=2), train_labels=doc_labels,
                        test_labels=query_labels, k=PER_CLASS)


def test_the_variants_surround_the_defaults_in_force(data: AblationData) -> None:
    groups = variant_groups(data.bundle, pca_dims=4, onehot_weight=3.0)
    assert [v.pca_dims for v in groups["pca_dims_fused"]] == [4, 16, 32, None]  # 64 and up exceed the PCA's 40
    assert {v.onehot_weight for v in groups["pca_dims_fused"]} == {3.0}
    assert [v.onehot_weight for v in groups["onehot_weight"]] == sorted({*ONEHOT_WEIGHTS, 3.0})
    assert [v.name for v in groups["fusion"]] == ["raw, w=0", "raw, w=3", "PCA 4, w=0", "PCA 4, w=3"]
    assert {v.onehot_weight for v in groups["pca_dims_embedding_only"]} == {0.0}


def test_a_one_hot_heavier_than_root_two_ranks_every_image_of_the_predicted_class_first(data: AblationData) -> None:
    fused = measure_variant(data, Variant(16, 2.0))
    assert fused["dims"] == 16 + CLASSES and fused["variant"] == "PCA 16, w=2"
    assert fused["map"] == pytest.approx(1.0) and fused["P_10"] == pytest.approx(1.0)
    assert fused["map_all"] == pytest.approx(1.0)
    embedding_only = measure_variant(data, Variant(None, 0.0))
    assert embedding_only["dims"] == DIMS + CLASSES
    assert embedding_only["map"] < 0.95 and embedding_only["map_all"] < 0.95  # the classes overlap
    assert 0 < embedding_only["P_10"] < 1


def test_every_table_is_measured_with_each_variant_once(data: AblationData, monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[Variant] = []
    real = ablations.measure_variant

    def counting(data: AblationData, variant: Variant, **kwargs: object) -> dict:
        measured.append(variant)
        return real(data, variant, **kwargs)

    monkeypatch.setattr(ablations, "measure_variant", counting)
    result = run_ablations(data, pca_dims=16, onehot_weight=2.0)
    groups = variant_groups(data.bundle, pca_dims=16, onehot_weight=2.0)
    assert len(measured) == len(set(measured)) == len({v for variants in groups.values() for v in variants})
    assert result["defaults"] == {"pca_dims": 16, "onehot_weight": 2.0}
    assert set(result["tables"]) == {*groups, "search"}  # no index-views table without the queries' views
    for name, variants in groups.items():
        assert [row["variant"] for row in result["tables"][name]] == [v.name for v in variants]

    data.train_query_views = features(data.train_labels, data.train_labels, seed=3)
    rows = run_ablations(data, pca_dims=16, onehot_weight=2.0)["tables"]["index_views"]
    assert [row["variant"] for row in rows] == ["index: image + mirror (as the queries)",
                                                "index: image only (as served)"]


def test_hnsw_finds_what_exact_search_finds_on_a_small_collection(data: AblationData) -> None:
    queries = fuse(data.bundle, data.test, pca_dims=16, onehot_weight=0.0)
    documents = fuse(data.bundle, data.train, pca_dims=16, onehot_weight=0.0)
    rows = compare_search(queries, documents, data.train_labels, data.test_labels, k=5, latency_queries=3)
    assert [row["search"] for row in rows] == ["exact (IndexFlatIP)"] + [
        f"HNSW M=32 efSearch={ef}" for ef in HNSW_EF_SEARCH]
    exact = rows[0]
    assert exact["recall_at_k"] == 1.0 and exact["build_s"] == 0.0
    truth = np.argsort(-(queries @ documents.T), axis=1, kind="stable")[:, :5]
    relevant = data.train_labels[truth] == data.test_labels[:, None]
    assert exact["P_100"] == pytest.approx(relevant.sum() / (100 * len(queries)))
    for row in rows[1:]:  # 40 documents: every efSearch visits them all
        assert row["recall_at_k"] == 1.0 and row["map"] == pytest.approx(exact["map"])
        assert row["latency_ms_p95"] >= row["latency_ms_p50"] > 0
