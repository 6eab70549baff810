"""`decode_image` on odd but valid images, at the bundle's size and filter, on hostile bytes, and under a
bounded mutation fuzz."""

from __future__ import annotations

import io
import random
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from sample_images import encode, exif_rotated_jpeg, odd_images, png_bomb, png_bytes, sample_image

from services.common.collection import REPO_ROOT
from services.common.errors import (
    EmptyImageError,
    ImageDecodeError,
    ImageError,
    ImageRegionError,
    ImageTooLargeError,
)
from services.common.images import Box, UploadDecoder, decode_image

CAT = REPO_ROOT.parent / "shared" / "cifar10" / "test" / "cat" / "0000.jpg"


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(CAT).convert("RGB") if CAT.is_file() else sample_image((32, 32))


@pytest.fixture(scope="module")
def odd(photo: Image.Image) -> dict[str, bytes]:
    return odd_images(photo)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- odd but valid ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(odd_images(sample_image())))
def test_odd_images_decode_to_32x32_rgb(odd: dict[str, bytes], name: str) -> None:
    pixels = decode_image(odd[name])
    assert pixels.shape == (32, 32, 3)
    assert pixels.dtype == np.uint8


def test_lossless_formats_decode_identically(photo: Image.Image) -> None:
    small = photo.resize((32, 32))
    reference = decode_image(encode(small, "PNG"))
    for format in ("BMP", "TIFF"):
        assert np.array_equal(decode_image(encode(small, format)), reference), format
    assert mean_abs_diff(decode_image(encode(small, "WEBP", lossless=True)), reference) == 0


def test_grayscale_and_sixteen_bit_agree(odd: dict[str, bytes]) -> None:
    gray = decode_image(odd["grayscale.png"])
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    # 16-bit samples are scaled down (v / 257), not clipped at 255
    assert np.array_equal(decode_image(odd["sixteen-bit.png"]), gray)


def test_cmyk_jpeg_is_close_to_rgb(photo: Image.Image, odd: dict[str, bytes]) -> None:
    reference = decode_image(encode(photo.resize((32, 32)), "PNG"))
    assert mean_abs_diff(decode_image(odd["cmyk.jpg"]), reference) < 12


def test_transparency_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    assert (decode_image(encode(clear, "PNG")) == 255).all()
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    assert (decode_image(encode(palette, "PNG", transparency=0)) == 255).all()
    assert (decode_image(encode(palette, "GIF", transparency=0)) == 255).all()


def test_one_pixel_image_fills_the_square() -> None:
    pixels = decode_image(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    assert (pixels == np.array([10, 200, 30], dtype=np.uint8)).all()


def test_animated_gif_uses_its_first_frame(photo: Image.Image, odd: dict[str, bytes]) -> None:
    first = photo.resize((32, 32))
    single = io.BytesIO()
    first.save(single, format="GIF")
    assert np.array_equal(decode_image(odd["animated.gif"]), decode_image(single.getvalue()))


def test_large_photo_is_reduced(odd: dict[str, bytes], photo: Image.Image) -> None:
    started = time.perf_counter()
    pixels = decode_image(odd["large.jpg"])
    assert time.perf_counter() - started < 2.0
    assert mean_abs_diff(pixels, decode_image(encode(photo.resize((32, 32)), "PNG"))) < 12


# EXIF orientation → the transpose that undoes it
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied_exactly(orientation: int) -> None:
    card = sample_image((48, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = decode_image(encode(card, "PNG", exif=exif.tobytes()))
    assert np.array_equal(tagged, decode_image(encode(card.transpose(ORIENTATIONS[orientation]), "PNG")))


def test_exif_rotated_jpeg_equals_the_manually_rotated_one() -> None:
    card = sample_image((64, 48))
    rotated = decode_image(exif_rotated_jpeg(card, 6))
    manual = decode_image(encode(card.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95))
    unrotated = decode_image(encode(card, "JPEG", quality=95))
    assert mean_abs_diff(rotated, manual) < 3
    assert mean_abs_diff(rotated, unrotated) > 20  # the rotation did happen


# --- size and resample filter (the bundle's) ---------------------------------------------------


def test_size_and_resample_filter_are_the_callers(photo: Image.Image) -> None:
    data = encode(photo.resize((32, 32)), "PNG")
    assert decode_image(data, size=48).shape == (48, 48, 3)
    # Nearest-neighbour doubling repeats every pixel; Lanczos blends them.
    doubled = decode_image(data, size=64, resample="nearest")
    assert np.array_equal(doubled, np.asarray(photo.resize((32, 32))).repeat(2, axis=0).repeat(2, axis=1))
    assert not np.array_equal(decode_image(data, size=64), doubled)
    assert np.array_equal(decode_image(data), decode_image(data, size=32, resample="lanczos"))


def test_an_unknown_resample_filter_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="resample filter 'sinc' is not one of: nearest, box, bilinear"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), resample="sinc")


@pytest.mark.anyio
async def test_the_upload_decoder_passes_size_and_filter_on(photo: Image.Image) -> None:
    data = encode(photo.resize((32, 32)), "PNG")
    decoded = await UploadDecoder(limit=1).decode(data, size=16, resample="box")
    assert np.array_equal(decoded, decode_image(data, size=16, resample="box"))
    assert not np.array_equal(decoded, decode_image(data, size=16))


# --- hostile ---------------------------------------------------------------------------------


def test_empty_bytes() -> None:
    with pytest.raises(EmptyImageError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("data", [b"hello, I am text", bytes(random.Random(1).randbytes(4096)),
                                  b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                                  b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"], ids=["text", "random", "svg", "pdf"])
def test_not_an_image(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="not a supported image"):
        decode_image(data)


def test_truncated_jpeg(photo: Image.Image) -> None:
    data = encode(photo.resize((256, 256)), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match="could not be decoded"):
        decode_image(data[: len(data) * 6 // 10])


def test_png_header_claiming_100000x100000() -> None:
    with pytest.raises(ImageTooLargeError, match="too many pixels"):
        decode_image(png_bytes(100_000, 100_000, idat=zlib.compress(b"\x00" * 64)))


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = png_bomb(16_000, 16_000)
    assert len(bomb) < 100_000  # 256 megapixels in under 100 KB
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="too many pixels"):
        decode_image(bomb)
    assert time.perf_counter() - started < 1.0


def test_pixel_and_byte_limits() -> None:
    with pytest.raises(ImageTooLargeError, match="7000×7000 pixels; the limit is 40000000"):
        decode_image(png_bomb(7000, 7000))
    with pytest.raises(ImageTooLargeError, match="the limit is 100 pixels"):
        decode_image(encode(Image.new("RGB", (11, 10)), "PNG"), max_pixels=100)
    with pytest.raises(ImageTooLargeError, match="the limit is 50"):
        decode_image(encode(Image.new("RGB", (11, 10)), "PNG"), max_bytes=50)


# --- bounded mutation fuzz --------------------------------------------------------------------


def _mutate(data: bytes, rng: random.Random) -> bytes:
    mutated = bytearray(data)
    choice = rng.random()
    if choice < 0.4:
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
    elif choice < 0.7:
        del mutated[rng.randrange(1, len(mutated)):]
    else:
        at = rng.randrange(len(mutated))
        mutated[at:at] = rng.randbytes(rng.randint(1, 32))
    return bytes(mutated)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("format", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_mutated_images_fail_only_with_image_errors(format: str) -> None:
    rng = random.Random(f"cbir-{format}")
    seed = encode(sample_image(), format)
    decoded, refused = [], []
    started = time.perf_counter()
    for _ in range(150):
        try:
            decoded.append(decode_image(_mutate(seed, rng)))
        except ImageError as exc:  # anything else (struct.error, IndexError...) would be a 500
            refused.append(exc)
    assert time.perf_counter() - started < 20
    # The seeded mutations reach both paths (17 to 107 of 150 decode, by format), and each path ends
    # where the API expects: a usable image, or a 4xx the user can read.
    assert decoded and refused
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in decoded)
    assert all(exc.status_code in (400, 413, 415) and exc.message for exc in refused)


# --- a region (`box`) of the image as displayed ---------------------------------------------------


def region_card(size: tuple[int, int]) -> Image.Image:
    """A card whose every region looks different: gradients across, a red block top left, a blue block at
    (60%, 55%) of the picture."""
    card = sample_image(size)
    width, height = size
    card.paste((20, 40, 240), (int(width * 0.6), int(height * 0.55), int(width * 0.8), int(height * 0.8)))
    return card


@pytest.mark.parametrize("orientation", [1, *sorted(ORIENTATIONS)])
def test_a_box_is_the_region_of_the_image_as_displayed(orientation: int) -> None:
    stored = region_card((301, 207))
    displayed = stored.transpose(ORIENTATIONS[orientation]) if orientation in ORIENTATIONS else stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = encode(stored, "PNG", exif=exif.tobytes())
    width, height = displayed.size
    box = Box(int(width * 0.55), int(height * 0.5), int(width * 0.3), int(height * 0.35))
    expected = decode_image(encode(displayed.crop((box.x, box.y, box.x + box.width, box.y + box.height)), "PNG"))
    cut = decode_image(tagged, box=box)
    assert mean_abs_diff(cut, expected) < 2.0
    assert mean_abs_diff(cut, decode_image(tagged)) > 20  # not the whole picture


@pytest.mark.parametrize("orientation", [1, 6, 3])
def test_a_box_on_a_large_jpeg_maps_onto_the_reduced_decode(orientation: int) -> None:
    """A large JPEG decodes at 1/2–1/8 scale; the box covers the same part of the picture as at full size, also
    where the reduced image's last pixel is partial (odd sizes) and the orientation flips that edge over."""
    stored = region_card((2003, 1501))
    displayed = stored.transpose(ORIENTATIONS[orientation]) if orientation in ORIENTATIONS else stored
    data = exif_rotated_jpeg(stored, orientation)
    width, height = displayed.size
    box = Box(width - 900, height - 700, 900, 700)  # the bottom-right corner: where a wrong scale shows most
    full = Image.open(io.BytesIO(data))
    full = ImageOps.exif_transpose(full).convert("RGB")
    reference = full.resize((32, 32), Image.Resampling.LANCZOS,
                            box=(box.x, box.y, box.x + box.width, box.y + box.height))
    assert mean_abs_diff(decode_image(data, box=box), np.asarray(reference)) < 3.0
    shifted = Box(box.x - 64, box.y - 64, box.width, box.height)  # 64 px off: one 1/8-scale step of 8 pixels
    assert mean_abs_diff(decode_image(data, box=shifted), np.asarray(reference)) > 3.0


@pytest.mark.parametrize("box", [Box(0, 0, 0, 10), Box(0, 0, 10, 0), Box(-1, 0, 10, 10), Box(0, -1, 10, 10),
                                 Box(40, 0, 9, 10), Box(0, 31, 10, 10), Box(100, 100, 5, 5)])
def test_a_box_empty_or_outside_the_image_is_refused(box: Box) -> None:
    data = encode(sample_image((48, 40)), "PNG")
    with pytest.raises(ImageRegionError, match=r"48×40|empty") as caught:
        decode_image(data, box=box)
    assert caught.value.status_code == 422
    assert decode_image(data, box=Box(0, 0, 48, 40)).shape == (32, 32, 3)  # the whole image is a box too


def test_a_box_is_checked_against_the_size_as_displayed() -> None:
    data = exif_rotated_jpeg(sample_image((48, 40)), 6)  # stored 48×40, displayed 40×48
    assert decode_image(data, box=Box(0, 40, 40, 8)).shape == (32, 32, 3)
    with pytest.raises(ImageRegionError, match="40×48"):
        decode_image(data, box=Box(0, 0, 48, 40))
