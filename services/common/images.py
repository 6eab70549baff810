"""The one image decoder, used for uploads and for indexing alike.

Bytes in any common raster format become a 32×32 RGB uint8 array: EXIF orientation applied,
any mode converted to RGB, resized with antialiasing. Normalisation belongs to the model.
"""

from __future__ import annotations

import asyncio
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.errors import EmptyImageError, ImageDecodeError, ImageTooLargeError

IMAGE_SIZE = 32
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_CONCURRENT_DECODES = 4

_HIGH_BIT_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    size: int = IMAGE_SIZE,
) -> np.ndarray:
    """Decode an encoded image into a `(size, size, 3)` uint8 RGB array.

    >>> decode_image(open("cat.jpg", "rb").read()).shape
    (32, 32, 3)

    Raises `EmptyImageError`, `ImageTooLargeError` (bytes or pixels over the limits, or a
    decompression bomb) or `ImageDecodeError` (not a supported image, or a broken one).
    """
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
                # JPEG can decode straight at a reduced scale: far less work for large photos.
                image.draft("RGB", (size * 4, size * 4))
                image.load()
                rgb = _to_rgb(ImageOps.exif_transpose(image))
                rgb = rgb.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
                return np.asarray(rgb, dtype=np.uint8).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"the image has too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            "the file is not a supported image; send one of: " + ", ".join(SUPPORTED_FORMATS)
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"the image could not be decoded: {exc}") from exc


class UploadDecoder:
    """Decodes uploads in worker threads, at most `limit` at a time.

    A large image takes hundreds of MB while it decodes (a 36-MP PNG peaks at about 530 MB:
    `bench/decode_memory.py`), so the number of decodes in flight, not the number of requests,
    bounds that memory. Requests over the limit wait their turn.
    """

    def __init__(self, limit: int = DEFAULT_MAX_CONCURRENT_DECODES) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._slots = asyncio.Semaphore(limit)

    async def decode(self, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """`decode_image` off the event loop, once a slot is free."""
        async with self._slots:
            return await asyncio.to_thread(decode_image, data, max_bytes=max_bytes, max_pixels=max_pixels)


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
