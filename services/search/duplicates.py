"""Near-duplicate groups: which documents are copies of each other (re-encoded, resized, shifted by a pixel,
brightened), found by an exact self-join of the collection's image signatures and linked into groups around
representatives, so a group never chains distinct images together through a series of look-alikes.

The signature is the image itself, tiny: its 8×8 RGB thumbnail (colour and layout) beside the detail of its 16×16
grey thumbnail, slightly smoothed (what a 4×4 blur of it leaves out), each centred and scaled to unit length, so
the similarity of two images is the mean of the two correlations: a brightened or re-encoded copy keeps both near
1, and two photos of the same empty sky differ in their detail. The search vector is not used: measured on
CIFAR-10 copies (reports/duplicates.md), its embedding is trained to bring every image of a class together and
ranks distinct images of the same class as close as copies. The default threshold is calibrated by
`bench/duplicates_calibration.py`.

    >>> signatures = np.stack([image_signature(data) for data in files])
    >>> rows, cols, sims = similar_pairs(signatures, threshold=DEFAULT_THRESHOLD)
    >>> groups = link_groups(len(signatures), rows, cols)   # [[representative, member, ...], ...]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from services.common.documents import StoredImage
from services.common.images import decode_image

# Calibrated on CIFAR-10 copies (reports/duplicates.md): the signature similarity from which two images are near
# duplicates.
DEFAULT_THRESHOLD = 0.8825
SIGNATURE_SIZE = 16  # pixels a side of the grey thumbnail; the colour one is half as wide
SIGNATURE_DIMS = (SIGNATURE_SIZE // 2) ** 2 * 3 + SIGNATURE_SIZE**2
BLOCK_ROWS = 1024  # rows of one block of the self-join: a 1024 × N block of float32 similarities at a time


def image_signature(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """The near-duplicate signature of an encoded image (after its EXIF orientation), `SIGNATURE_DIMS` long and of
    unit length: its 8×8 RGB thumbnail and the detail of its 16×16 grey one, each centred at unit length (zeros for
    a part without any variation), halved in weight. Raises `ImageError` for bytes that are no image."""
    limits = {} if max_pixels is None else {"max_pixels": max_pixels}
    pixels = decode_image(data, size=SIGNATURE_SIZE, resample="box", max_bytes=len(data) + 1, **limits)
    rgb = pixels.astype(np.float32)
    half = SIGNATURE_SIZE // 2
    colour = rgb.reshape(half, 2, half, 2, 3).mean(axis=(1, 3))  # the 8×8 box-filtered thumbnail
    grey = _smoothed(rgb @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32))  # a pixel's shift moves it less
    blurred = Image.fromarray(grey, mode="F").reduce(4).resize(grey.shape[::-1], Image.Resampling.BILINEAR)
    detail = grey - np.asarray(blurred, dtype=np.float32)
    return np.concatenate([_unit(colour.ravel()), _unit(detail.ravel())]) / np.float32(np.sqrt(2))


def _smoothed(image: np.ndarray) -> np.ndarray:
    """`image` filtered by the [1, 2, 1] / 4 kernel along each axis (edges repeated)."""
    for axis in (0, 1):
        padded = np.pad(image, [(1, 1) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        before, middle, after = (np.take(padded, range(k, k + image.shape[axis]), axis=axis) for k in (0, 1, 2))
        image = (before + 2 * middle + after) / 4
    return image.astype(np.float32)


def _unit(values: np.ndarray) -> np.ndarray:
    values = values - values.mean()
    norm = float(np.linalg.norm(values))
    return (values / norm).astype(np.float32) if norm > 1e-3 else np.zeros(values.size, dtype=np.float32)


def similar_pairs(signatures: np.ndarray, *, threshold: float, block_rows: int = BLOCK_ROWS,
                  progress: Callable[[int], object] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair `i < j` of rows of `signatures` (unit rows) whose inner product is at least `threshold`: the rows,
    the columns and the similarities. Exact: blockwise matrix products over the upper triangle. `progress(rows)`
    is called after each block with the rows compared so far."""
    count = len(signatures)
    found_rows, found_cols, found_sims = [], [], []
    for start in range(0, count, block_rows):
        stop = min(start + block_rows, count)
        sims = signatures[start:stop] @ signatures[start:].T  # this block against itself and every later row
        rows, cols = np.nonzero(sims >= threshold)
        cols_global = cols + start
        above_diagonal = cols_global > rows + start
        found_rows.append(rows[above_diagonal] + start)
        found_cols.append(cols_global[above_diagonal])
        found_sims.append(sims[rows[above_diagonal], cols[above_diagonal]])
        if progress is not None:
            progress(stop)
    if not found_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(found_rows).astype(np.int64), np.concatenate(found_cols).astype(np.int64),
            np.concatenate(found_sims).astype(np.float32))


def link_groups(count: int, rows: np.ndarray, cols: np.ndarray) -> list[list[int]]:
    """Groups of at least two of `count` items, from the pairs (`rows[i]`, `cols[i]`) within the threshold, each
    built around a representative (listed first) and holding only items paired with it: every member is within
    the threshold of its representative, so a group never chains. The representatives are taken greedily, the
    item with the most pairs first (ties: the lower index), each taking its neighbours not yet in a group."""
    neighbours: list[list[int]] = [[] for _ in range(count)]
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        neighbours[i].append(j)
        neighbours[j].append(i)
    degrees = np.asarray([len(n) for n in neighbours], dtype=np.int64)
    order = np.lexsort((np.arange(count), -degrees))  # most pairs first, then by index
    grouped = np.zeros(count, dtype=bool)
    groups: list[list[int]] = []
    for item in order.tolist():
        if grouped[item] or not degrees[item]:
            continue
        members = [item] + sorted(j for j in neighbours[item] if not grouped[j])
        if len(members) > 1:
            grouped[members] = True
            groups.append(members)
    return groups


def suggested_keep(images: Sequence[StoredImage]) -> StoredImage:
    """The copy to keep: the largest file, then the oldest, then the lowest id."""
    return min(images, key=lambda image: (-image.size, image.mtime, image.id))
