"""Crafted and odd images for the upload and decoding tests: encodings, hand-written PNGs, bombs."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image


def encode(image: Image.Image, format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def sample_image(size: tuple[int, int] = (48, 40)) -> Image.Image:
    """An asymmetric RGB test card: a rotation or flip of it never looks like the original."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[np.newaxis, :].repeat(height, axis=0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, np.newaxis].repeat(width, axis=1)
    pixels = np.stack([x, y, np.full_like(x, 60)], axis=-1)
    pixels[: height // 3, : width // 4] = (250, 20, 20)  # a red block in the top-left corner
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, idat: bytes = b"") -> bytes:
    """A PNG written by hand, so its IHDR may claim any size (every chunk has a valid CRC)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def png_bomb(width: int, height: int) -> bytes:
    """A real 1-bit PNG of `width`×`height` black pixels: tens of KB on disk, compressed row by row."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_bytes(width, height, bit_depth=1, color_type=0, idat=idat)


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def odd_images(photo: Image.Image) -> dict[str, bytes]:
    """Valid but unusual uploads, each one encoding of `photo` (an RGB image)."""
    small = photo.resize((32, 32))
    palette = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    rgba = small.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((32, 32)))
    sixteen_bit = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257)  # I;16
    frames = [small, small.transpose(Image.Transpose.FLIP_LEFT_RIGHT), small.rotate(90)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "rgba.png": encode(rgba, "PNG"),
        "palette-transparent.png": encode(palette, "PNG", transparency=0),
        "grayscale.png": encode(small.convert("L"), "PNG"),
        "cmyk.jpg": encode(small.convert("CMYK"), "JPEG", quality=95),
        "sixteen-bit.png": encode(sixteen_bit, "PNG"),
        "one-pixel.png": encode(small.resize((1, 1)), "PNG"),
        "large.jpg": encode(photo.resize((3000, 2000)), "JPEG", quality=85),
        "animated.gif": gif.getvalue(),
        "image.webp": encode(small, "WEBP", quality=90),
        "image.bmp": encode(small, "BMP"),
        "image.tiff": encode(small, "TIFF"),
        "exif-rotated.jpg": exif_rotated_jpeg(photo.resize((40, 24))),
    }
