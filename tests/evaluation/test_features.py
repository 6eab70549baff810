"""The collection decoded once and embedded once (services/evaluation/features.py): the split's files in
the decoded arrays' order, a cache that knows when the collection changed, features cached per bundle and
views, and vectors that are the embedder's own."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from factories import copy_collection

from services.common.collection import list_classes
from services.embedder.bundle import Bundle
from services.embedder.inference import Preprocessing
from services.embedder.runtime import Embedder
from services.evaluation import features
from services.evaluation.features import (
    EMBED_BATCH,
    Features,
    check_classes,
    embed_split,
    fuse,
    identity_projection,
    load_collection_split,
)
from services.training.data import load_split


def test_a_split_lists_its_files_in_the_order_of_its_decoded_images(mini_collection: Path, tmp_path: Path) -> None:
    classes = list_classes(mini_collection, "test")
    split = load_collection_split(mini_collection, "test", classes, preprocessing=Preprocessing(),
                                  cache_dir=tmp_path, limit_per_class=3)
    images, labels = load_split(mini_collection, "test", classes, limit_per_class=3, preprocessing=Preprocessing())
    assert len(split) == 30 and split.name == "test" and split.classes == classes
    assert np.array_equal(split.images, images) and np.array_equal(split.labels, labels)
    assert [path.split("/")[1] for path in split.paths] == [classes[label] for label in split.labels]
    assert all((mini_collection / path).is_file() for path in split.paths)


def test_a_collection_changed_since_it_was_cached_is_refused(mini_collection: Path, tmp_path: Path) -> None:
    root = copy_collection(mini_collection, tmp_path / "collection", test=2)
    classes = list_classes(root, "test")
    load_collection_split(root, "test", classes, preprocessing=Preprocessing(), cache_dir=tmp_path / "cache")
    shutil.copyfile(root / "test" / "cat" / "0000.jpg", root / "test" / "cat" / "9999.jpg")
    with pytest.raises(ValueError, match="changed since it was cached in .*cache; delete the cache"):
        load_collection_split(root, "test", classes, preprocessing=Preprocessing(), cache_dir=tmp_path / "cache")


def test_a_collection_of_other_classes_than_the_models_is_refused(mini_collection: Path) -> None:
    classes = list_classes(mini_collection, "train")
    check_classes(mini_collection, classes)
    with pytest.raises(ValueError, match=r"has classes \['airplane', .*the model predicts \['cat', 'dog'\]"):
        check_classes(mini_collection, ["cat", "dog"])


def test_the_vectors_built_from_the_features_are_the_embedders_and_the_features_are_cached(
        tiny_bundle: Bundle, mini_collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = load_collection_split(mini_collection, "test", tiny_bundle.classes,
                                  preprocessing=tiny_bundle.preprocessing, cache_dir=tmp_path)
    embedded = embed_split(tiny_bundle, split, purpose="query", cache_dir=tmp_path, device="cpu")
    assert embedded.embeddings.shape == (50, tiny_bundle.metadata["architecture"]["embedding_dim"])
    assert embedded.probabilities.shape == (50, 10)
    np.testing.assert_allclose(embedded.probabilities.sum(axis=1), 1.0, atol=1e-3)

    defaults = tiny_bundle.vector_defaults
    vectors = fuse(tiny_bundle, embedded, pca_dims=defaults["pca_dims"], onehot_weight=defaults["onehot_weight"])
    served = Embedder(tiny_bundle, device="cpu", max_batch=EMBED_BATCH).embed_batch(split.images, purpose="query")
    np.testing.assert_allclose(vectors, np.stack([e.vector for e in served]), atol=1e-6)
    assert [tiny_bundle.classes[c] for c in embedded.predicted] == [e.label for e in served]

    def no_forward_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("cached features were computed again")

    monkeypatch.setattr(features, "predict", no_forward_pass)
    again = embed_split(tiny_bundle, split, purpose="query", cache_dir=tmp_path, device="cpu")
    assert np.array_equal(again.embeddings, embedded.embeddings)
    assert len(list(tmp_path.glob("features-test-*.npz"))) == 1
    # The index side with other views than the queries' (`index_flip_tta`): other features, not the cached ones.
    pre = tiny_bundle.preprocessing
    single_view_index = replace(tiny_bundle, preprocessing=replace(pre, index_flip_tta=not pre.flip_tta))
    assert np.array_equal(embed_split(single_view_index, split, purpose="query", cache_dir=tmp_path).embeddings,
                          embedded.embeddings)
    with pytest.raises(AssertionError, match="computed again"):
        embed_split(single_view_index, split, purpose="index", cache_dir=tmp_path, device="cpu")


def test_fusing_without_pca_keeps_the_raw_embedding_beside_the_weighted_one_hot(tiny_bundle: Bundle) -> None:
    rng = np.random.default_rng(0)
    raw = Features(embeddings=rng.random((4, 6), dtype=np.float32),
                   probabilities=np.eye(10, dtype=np.float32)[[2, 2, 7, 0]])
    vectors = fuse(tiny_bundle, raw, pca_dims=None, onehot_weight=0.0)
    assert vectors.shape == (4, 6 + 10)
    np.testing.assert_allclose(vectors[:, :6], raw.embeddings / np.linalg.norm(raw.embeddings, axis=1,
                                                                               keepdims=True), rtol=1e-6)
    assert not vectors[:, 6:].any()
    weighted = fuse(tiny_bundle, raw, pca_dims=None, onehot_weight=1.0)
    assert list(weighted[:, 6:].argmax(axis=1)) == [2, 2, 7, 0]
    np.testing.assert_allclose(np.linalg.norm(weighted, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weighted[:, 6:].max(axis=1), 1 / np.sqrt(2), rtol=1e-6)  # one-hot as heavy as the rest

    identity = identity_projection(3)
    assert identity.max_dims == 3 and np.array_equal(identity.components, np.eye(3)) and not identity.mean.any()

