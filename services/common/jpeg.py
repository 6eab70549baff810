"""A fast path of the one image decoder (`images.decode_image`) for the common case of a collection: a plain
JPEG already at the model's side (CIFAR-10's 32×32 files), decoded by OpenCV's libjpeg-turbo.

Pillow spends most of a 32×32 JPEG's ~140 µs parsing its header in Python; OpenCV decodes it in ~30 µs,
pixel for pixel the same (both are libjpeg-turbo with its default IDCT and upsampling; `tests/common/test_jpeg.py`
compares them). Only files where nothing else of `decode_image` applies take it: baseline or progressive
JPEG, one (grey) or three (YCbCr) components, no EXIF (no orientation to apply), no Adobe marker (CMYK and
transforms), exactly `size`×`size` pixels (no resize: Pillow's resize to the same size is a copy). Anything
else — and any file this parser does not understand — goes through Pillow as before.
"""

from __future__ import annotations

import cv2
import numpy as np

_SOF_FAST = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman)
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, hierarchical, arithmetic
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: markers without a length field
_SOS, _APP1, _APP14 = 0xDA, 0xE1, 0xEE


def plain_jpeg_side(data: bytes) -> int | None:
    """The side of `data` when it is a JPEG the fast path may decode (square, 1 or 3 components, baseline or
    progressive, no EXIF or Adobe segment, ending where a JPEG ends); None otherwise, or when its header is not
    what this expects."""
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":  # a truncated file: Pillow's error
        return None
    side, position, end = None, 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _NO_LENGTH:
            position += 2
            continue
        length = int.from_bytes(data[position + 2:position + 4], "big")
        segment = data[position + 4:position + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker == _SOS:
            return side
        if marker in _SOF_OTHER or marker == _APP14 or (marker == _APP1 and segment.startswith(b"Exif")):
            return None
        if marker in _SOF_FAST:
            if side is not None or len(segment) < 6 or segment[5] not in (1, 3):
                return None
            height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
            if height != width or height == 0:
                return None
            side = width
        position += 2 + length
    return None


def decode_plain_jpeg(data: bytes, *, size: int) -> np.ndarray | None:
    """`(size, size, 3)` RGB uint8 pixels of `data` when it is a plain JPEG of exactly that side
    (`plain_jpeg_side`) and decodes; None when the caller should decode it the general way."""
    if plain_jpeg_side(data) != size:
        return None
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.shape != (size, size, 3):
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
