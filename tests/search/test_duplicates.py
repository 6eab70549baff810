"""The near-duplicate building blocks: the image signature, the exact self-join and groups that never chain."""

from __future__ import annotations

import numpy as np
import pytest
from duplicates_calibration import variants
from factories import make_document
from PIL import Image
from sample_images import encode, sample_image

from services.common.errors import ImageDecodeError
from services.search.duplicates import (
    DEFAULT_THRESHOLD,
    SIGNATURE_DIMS,
    image_signature,
    link_groups,
    similar_pairs,
    suggested_keep,
)


def test_a_signature_is_unit_length_and_near_one_for_copies_only(mini_collection) -> None:
    original = (mini_collection / "train" / "cat" / "0000.jpg").read_bytes()
    other = (mini_collection / "train" / "cat" / "0001.jpg").read_bytes()
    signature = image_signature(original)
    assert signature.shape == (SIGNATURE_DIMS,) and abs(float(np.linalg.norm(signature)) - 1) < 1e-5
    copies = variants(original)
    for kind in ("jpeg", "resize", "shift", "bright"):
        assert float(image_signature(copies[kind]) @ signature) >= DEFAULT_THRESHOLD, kind
    assert float(image_signature(copies["mirror"]) @ signature) < DEFAULT_THRESHOLD  # a mirror is no copy
    assert float(image_signature(other) @ signature) < DEFAULT_THRESHOLD


def test_a_flat_image_signs_as_zeros_and_a_non_image_is_refused() -> None:
    flat = encode(Image.new("RGB", (20, 20), (90, 90, 90)), "PNG")
    assert not np.any(image_signature(flat))
    with pytest.raises(ImageDecodeError):
        image_signature(b"not an image")
    big = encode(sample_image((400, 300)), "JPEG", quality=90)
    assert float(image_signature(big) @ image_signature(encode(sample_image((100, 75)), "PNG"))) > 0.98


def test_similar_pairs_is_the_brute_force_join_in_any_block_size() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, 16))
    points = np.concatenate([centres, centres[:10] + rng.normal(scale=0.05, size=(10, 16))])
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    sims = points @ points.T
    expected = {(i, j) for i in range(len(points)) for j in range(i + 1, len(points)) if sims[i, j] >= 0.9}
    assert expected  # the copies are there
    for block_rows in (1, 7, 1024):
        seen: list[int] = []
        rows, cols, values = similar_pairs(points, threshold=0.9, block_rows=block_rows, progress=seen.append)
        assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == expected
        assert np.allclose(values, sims[rows, cols], atol=1e-5)
        assert seen[-1] == len(points)


def test_groups_never_chain_through_look_alikes() -> None:
    # A chain 0-1-2-3-4 where each is paired only with its neighbours: no group holds two items that are not
    # both paired with its representative, so 0 and 4 (and 0 and 3) are never together.
    rows, cols = np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4])
    groups = link_groups(5, rows, cols)
    pairs = set(zip(rows.tolist(), cols.tolist(), strict=True))
    for members in groups:
        representative, *others = members
        assert all((min(representative, m), max(representative, m)) in pairs for m in others)
    assert sum(len(m) for m in groups) <= 5 and all(len(m) >= 2 for m in groups)
    assert not any({0, 3} <= set(m) or {0, 4} <= set(m) for m in groups)


def test_groups_are_built_around_the_best_connected_item() -> None:
    # 2 is paired with 0, 1 and 3; 5 and 6 are a pair of their own; 4 is alone.
    groups = link_groups(7, np.array([0, 1, 2, 5]), np.array([2, 2, 3, 6]))
    assert groups == [[2, 0, 1, 3], [5, 6]]


def test_the_copy_to_keep_is_the_largest_then_the_oldest() -> None:
    vector = np.ones(4, dtype=np.float32)
    small = make_document("a", vector, size=100, mtime=1.0).stored()
    large_new = make_document("b", vector, size=900, mtime=9.0).stored()
    large_old = make_document("c", vector, size=900, mtime=5.0).stored()
    assert suggested_keep([small, large_new, large_old]).id == "c"
    assert suggested_keep([small]).id == "a"
