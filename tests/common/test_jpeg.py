"""The JPEG fast path of the one decoder: which files take it, and that they decode to Pillow's pixels exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sample_images import encode, exif_rotated_jpeg, sample_image

from services.common import images
from services.common.images import decode_image
from services.common.jpeg import decode_plain_jpeg, plain_jpeg_side


def pillow_pixels(data: bytes, *, size: int = 32) -> np.ndarray:
    """What `decode_image` gives without the fast path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "decode_plain_jpeg", lambda data, *, size: None)
        return decode_image(data, size=size)


def test_cifar_files_take_the_fast_path_and_decode_to_pillows_pixels(mini_collection: Path) -> None:
    files = sorted((mini_collection / "train").glob("*/*.jpg"))
    assert len(files) >= 100
    for file in files:
        data = file.read_bytes()
        fast = decode_plain_jpeg(data, size=32)
        assert fast is not None, file
        assert fast.dtype == np.uint8 and fast.shape == (32, 32, 3)
        np.testing.assert_array_equal(fast, pillow_pixels(data), err_msg=str(file))


@pytest.mark.parametrize("options", [{"quality": 90}, {"quality": 50, "subsampling": 0}, {"progressive": True},
                                     {"optimize": True, "subsampling": 2}], ids=["q90", "444", "progressive", "420"])
def test_every_plain_encoding_matches_pillow(options: dict) -> None:
    data = encode(sample_image((32, 32)), "JPEG", **options)
    assert plain_jpeg_side(data) == 32
    np.testing.assert_array_equal(decode_image(data), pillow_pixels(data))


def test_a_grey_jpeg_matches_pillow() -> None:
    data = encode(sample_image((32, 32)).convert("L"), "JPEG")
    assert plain_jpeg_side(data) == 32
    np.testing.assert_array_equal(decode_image(data), pillow_pixels(data))


@pytest.mark.parametrize("name", ["other size", "not square", "exif", "cmyk", "truncated", "png", "trailing bytes"])
def test_files_the_fast_path_leaves_to_pillow(name: str) -> None:
    card = sample_image((32, 32))
    data = {"other size": encode(sample_image((48, 48)), "JPEG"),
            "not square": encode(sample_image((48, 40)), "JPEG"),
            "exif": exif_rotated_jpeg(card, 6),
            "cmyk": encode(card.convert("CMYK"), "JPEG"),
            "truncated": encode(card, "JPEG")[:-40],
            "png": encode(card, "PNG"),
            "trailing bytes": encode(card, "JPEG") + b"\x00" * 8}[name]
    assert decode_plain_jpeg(data, size=32) is None


def test_the_side_must_be_the_one_asked_for() -> None:
    data = encode(sample_image((32, 32)), "JPEG")
    assert decode_plain_jpeg(data, size=64) is None
    assert decode_image(data, size=64).shape == (64, 64, 3)  # Pillow resizes it


def test_headers_it_does_not_understand_are_left_to_pillow() -> None:
    data = encode(sample_image((32, 32)), "JPEG")
    assert plain_jpeg_side(data[:2] + b"\x00\x00" + data[4:]) is None  # no marker where one must be
    assert plain_jpeg_side(data[:4] + b"\xff\xff" + data[6:]) is None  # a segment longer than the file
    assert plain_jpeg_side(b"\xff\xd8\xff\xd9") is None  # no frame at all
