"""A split decoded into arrays (services/training/data.py): which images, in which order, decoded as the
service decodes an upload at the bundle's size, labelled by the classes given, and cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.collection import list_classes
from services.common.images import IMAGE_SIZE, RESAMPLE, decode_image
from services.embedder.inference import Preprocessing
from services.training import data
from services.training.data import load_split, select_images


def test_it_selects_the_first_images_of_every_class_in_the_collections_order(mini_collection: Path) -> None:
    classes = list_classes(mini_collection, "test")
    selected = select_images(mini_collection, "test", limit_per_class=2)
    expected = [f"test/{label}/{name}" for label in classes
                for name in sorted(p.name for p in (mini_collection / "test" / label).iterdir())[:2]]
    assert [image.path for image in selected] == expected
    assert len(select_images(mini_collection, "test", limit_per_class=None)) == 5 * len(classes)


def test_it_decodes_the_split_as_an_upload_is_and_labels_it_by_the_classes_given(mini_collection: Path) -> None:
    classes = list_classes(mini_collection, "test")
    images, labels = load_split(mini_collection, "test", classes, limit_per_class=2, preprocessing=Preprocessing(),
                                quiet=True)
    selected = select_images(mini_collection, "test", limit_per_class=2)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and [classes[i] for i in labels] == [image.label for image in selected]
    for index in (0, 7, 19):
        image = (mini_collection / selected[index].path).read_bytes()
        decoded = decode_image(image, size=IMAGE_SIZE, resample=RESAMPLE)
        assert np.array_equal(images[index], decoded)

    reordered = classes[::-1]
    _, reversed_labels = load_split(mini_collection, "test", reordered, limit_per_class=2,
                                    preprocessing=Preprocessing(), quiet=True)
    assert [reordered[i] for i in reversed_labels] == [classes[i] for i in labels]


def test_the_bundles_size_decides_the_arrays_and_each_size_is_cached_apart(
        mini_collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    classes = list_classes(mini_collection, "test")
    small, labels = load_split(mini_collection, "test", classes, limit_per_class=1, preprocessing=Preprocessing(),
                               cache_dir=tmp_path, quiet=True)
    large, _ = load_split(mini_collection, "test", classes, limit_per_class=1,
                          preprocessing=Preprocessing(image_size=48), cache_dir=tmp_path, quiet=True)
    assert small.shape == (10, 32, 32, 3) and large.shape == (10, 48, 48, 3)
    assert len(list(tmp_path.glob("test-*.npz"))) == 2

    def no_decoding(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("a cached split was decoded again")

    monkeypatch.setattr(data, "decode_image", no_decoding)
    cached, cached_labels = load_split(mini_collection, "test", classes, limit_per_class=1,
                                       preprocessing=Preprocessing(), cache_dir=tmp_path, quiet=True)
    assert np.array_equal(cached, small) and np.array_equal(cached_labels, labels)
