"""The one image decoder, used for uploads and for indexing alike.

Bytes in any common raster format become a square RGB uint8 array: EXIF orientation applied,
any mode converted to RGB, resized with antialiasing. The side and the resample filter are the
bundle's (`Preprocessing.image_size` and `.resize`; 32 px and Lanczos for every bundle so far);
normalisation belongs to the model. A `Box` (a region of the image as displayed) is cut out at full
resolution before that resize (`/search?box=`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.errors import EmptyImageError, ImageDecodeError, ImageRegionError, ImageTooLargeError
from services.common.jpeg import decode_plain_jpeg

IMAGE_SIZE = 32
RESAMPLE = "lanczos"
# Resample filters by the names bundles record them under.
RESAMPLE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_CONCURRENT_DECODES = 4

_HIGH_BIT_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# What turns the stored pixels upright, by EXIF orientation (as `ImageOps.exif_transpose` does).
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


class Box(NamedTuple):
    """A region of an image as displayed (after its EXIF orientation), in pixels of its full resolution:
    `x`, `y` its top-left corner, `width` and `height` its size."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Box:
        """`"x,y,w,h"` (integers; spaces allowed) as a box; `ValueError` naming the form otherwise."""
        try:
            x, y, width, height = (int(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"box must be four integers x,y,w,h (pixels), got {text[:80]!r}") from None
        return cls(x, y, width, height)

    def check_inside(self, width: int, height: int) -> None:
        """Raise `ImageRegionError` unless the box is non-empty and lies within a `width` × `height` image."""
        if self.width < 1 or self.height < 1:
            raise ImageRegionError(f"the box {self.width}×{self.height} is empty; give it a width and height of "
                                   "at least 1 pixel")
        if self.x < 0 or self.y < 0 or self.x + self.width > width or self.y + self.height > height:
            raise ImageRegionError(
                f"the box x={self.x}, y={self.y}, {self.width}×{self.height} is not inside the image, which is "
                f"{width}×{height} pixels as displayed")

    def stored(self, orientation: int, width: int, height: int) -> tuple[float, float, float, float]:
        """The box's (left, upper, right, lower) in the file's stored pixels (`width` × `height`, before the EXIF
        `orientation` turns them upright)."""
        left, top, right, bottom = self.x, self.y, self.x + self.width, self.y + self.height
        corners = {2: (width - right, top, width - left, bottom),
                   3: (width - right, height - bottom, width - left, height - top),
                   4: (left, height - bottom, right, height - top),
                   5: (top, left, bottom, right),
                   6: (top, height - right, bottom, height - left),
                   7: (width - bottom, height - right, width - top, height - left),
                   8: (width - bottom, left, width - top, right)}
        return corners.get(orientation, (left, top, right, bottom))


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    size: int = IMAGE_SIZE,
    resample: str = RESAMPLE,
    box: Box | None = None,
) -> np.ndarray:
    """Decode an encoded image into a `(size, size, 3)` uint8 RGB array, resized with the
    `resample` filter (a name of `RESAMPLE_FILTERS`); with `box`, only that region of the image as
    displayed, cut out at full resolution (`ImageRegionError` when it is empty or not inside).

    >>> decode_image(open("cat.jpg", "rb").read()).shape
    (32, 32, 3)
    >>> decode_image(data, size=bundle.preprocessing.image_size, resample=bundle.preprocessing.resize)

    Raises `EmptyImageError`, `ImageTooLargeError` (bytes or pixels over the limits, or a
    decompression bomb) or `ImageDecodeError` (not a supported image, or a broken one); a `size`
    below 1 or an unknown `resample` is the caller's mistake and raises `ValueError`.
    """
    resample_filter = resample_filter_named(resample)
    if size < 1:
        raise ValueError(f"size must be at least 1 pixel, got {size}")
    if box is not None:
        return _decode_region(data, box, max_bytes=max_bytes, max_pixels=max_pixels, size=size,
                              resample_filter=resample_filter)
    within_limits = len(data) <= max_bytes and size * size <= max_pixels
    if within_limits and (pixels := decode_plain_jpeg(data, size=size)) is not None:
        return pixels  # a plain JPEG of exactly this side: the same pixels, several times faster (`jpeg`)
    # JPEG can decode straight at a reduced scale: far less work for large photos.
    with _opened(data, max_bytes=max_bytes, max_pixels=max_pixels, draft=(size * 4, size * 4)) as (rgb, _):
        rgb = rgb.resize((size, size), resample_filter, reducing_gap=3.0)
        return np.asarray(rgb, dtype=np.uint8).copy()


def _decode_region(data: bytes, box: Box, *, max_bytes: int, max_pixels: int, size: int,
                   resample_filter: Image.Resampling) -> np.ndarray:
    """`box` of the image as displayed, resized to `size`: cut out of the stored pixels, then turned upright. A
    JPEG decodes at a reduced size when the crop keeps at least 4 × `size` pixels a side; the box is scaled by
    the decoder's own factor, so it covers the same part of the picture."""
    with _open(data, max_bytes=max_bytes, max_pixels=max_pixels) as image:
        orientation = _orientation(image)
        stored_width, stored_height = image.size
        upright = (stored_height, stored_width) if orientation in (5, 6, 7, 8) else (stored_width, stored_height)
        box.check_inside(*upright)  # before a pixel is decoded
        scale = 1.0
        reduction = min(box.width, box.height) / (size * 4)  # how far the decode may shrink the crop
        if reduction >= 2:
            drafted = image.draft("RGB", (math.ceil(stored_width / reduction), math.ceil(stored_height / reduction)))
            if drafted is not None:  # the full image's extent in the reduced pixels: width / scale
                scale = stored_width / drafted[1][2]
        image.load()
        corners = tuple(corner / scale for corner in box.stored(orientation, stored_width, stored_height))
        cut = _to_rgb(image).resize((size, size), resample_filter, box=corners, reducing_gap=3.0)
        if orientation in _ORIENTATIONS:
            cut = cut.transpose(_ORIENTATIONS[orientation])
        return np.asarray(cut, dtype=np.uint8).copy()


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image (1: stored upright)."""
    with contextlib.suppress(Exception):  # a broken EXIF block is ignored, as exif_transpose ignores it
        return int(image.getexif().get(0x0112, 1))
    return 1


def reencode_image(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
    """The image re-encoded from its decoded pixels at full size, upright (EXIF orientation applied), with
    no metadata at all (no EXIF, GPS, ICC or text chunks): JPEG (quality 95) for a JPEG, PNG for anything
    else. Returns the bytes and the file extension; raises what `decode_image` raises."""
    with _opened(data, max_bytes=max_bytes, max_pixels=max_pixels, draft=None) as (rgb, original_format):
        clean = Image.fromarray(np.asarray(rgb, dtype=np.uint8))  # a new image: nothing of the file's info
        buffer = io.BytesIO()
        if original_format == "JPEG":
            clean.save(buffer, format="JPEG", quality=95)
            return buffer.getvalue(), "jpg"
        clean.save(buffer, format="PNG")
        return buffer.getvalue(), "png"


@contextlib.contextmanager
def _opened(data: bytes, *, max_bytes: int, max_pixels: int,
            draft: tuple[int, int] | None) -> Iterator[tuple[Image.Image, str]]:
    """The upright RGB image of `data` and its format (`draft`: a JPEG may decode at a reduced size down to it)."""
    with _open(data, max_bytes=max_bytes, max_pixels=max_pixels) as image:
        if draft is not None:
            image.draft("RGB", draft)
        image.load()
        yield _to_rgb(ImageOps.exif_transpose(image)), image.format or ""


@contextlib.contextmanager
def _open(data: bytes, *, max_bytes: int, max_pixels: int) -> Iterator[Image.Image]:
    """`data` opened (not yet loaded) within the limits; every failure, of this or of the caller's work on the
    image, turned into an `ImageError`."""
    if not data:
        raise EmptyImageError("the uploaded file is empty")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that; treat it as the bomb it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"the image is {width}×{height} pixels; the limit is {max_pixels} pixels"
                    )
                yield image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"the image has too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            "the file is not a supported image; send one of: " + ", ".join(SUPPORTED_FORMATS)
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"the image could not be decoded: {exc}") from exc


class UploadDecoder:
    """Decodes uploads within the upload limits (`max_bytes`, `max_pixels`: `CBIR_MAX_UPLOAD_BYTES`,
    `CBIR_MAX_IMAGE_PIXELS`) in worker threads, at most `limit` at a time.

    A large image takes hundreds of MB while it decodes (a 36-MP PNG peaks at about 530 MB:
    `bench/decode_memory.py`), so the number of decodes in flight, not the number of requests,
    bounds that memory. Requests over the limit wait their turn.

    >>> decoder = UploadDecoder(4, max_bytes=10 * 2**20, max_pixels=40_000_000)
    >>> pixels = await decoder.decode(data, size=info.image_size, resample=info.resize)
    """

    def __init__(self, limit: int = DEFAULT_MAX_CONCURRENT_DECODES, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._slots = asyncio.Semaphore(limit)
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    async def decode(self, data: bytes, *, size: int = IMAGE_SIZE, resample: str = RESAMPLE,
                     box: Box | None = None) -> np.ndarray:
        """`decode_image` off the event loop, once a slot is free; `size` and `resample` are the
        bundle's (`EmbedderInfo.image_size` and `.resize`), `box` the region to search by, if any."""
        async with self._slots:
            return await asyncio.to_thread(decode_image, data, max_bytes=self.max_bytes, max_pixels=self.max_pixels,
                                           size=size, resample=resample, box=box)

    async def reencode(self, data: bytes) -> tuple[bytes, str]:
        """`reencode_image` off the event loop, in the same slots as decodes (it takes as much memory)."""
        async with self._slots:
            return await asyncio.to_thread(reencode_image, data, max_bytes=self.max_bytes,
                                           max_pixels=self.max_pixels)


def resample_filter_named(name: str) -> Image.Resampling:
    """Pillow's filter for a bundle's `resize` name; `ValueError` names the known ones otherwise."""
    try:
        return RESAMPLE_FILTERS[name]
    except KeyError:
        raise ValueError(f"resample filter {name!r} is not one of: {', '.join(RESAMPLE_FILTERS)}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        # Pillow's own conversion clips 16-bit samples to 255; scale them down instead.
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (array.size and array.max() > 255):
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
