"""Batch augmentation (services/training/augment.py): each image a crop of its zero- or reflect-padded copy,
mirrored or not; Cutout erases one clipped square per image, and nothing when it is off; the random draws come
from the generator alone, on its device; the normalisation is the embedder's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.embedder.inference import to_model_input
from services.training.augment import augment, normalise, to_device


@pytest.mark.parametrize("side", [1, 8, 16])
def test_cutout_zeroes_one_square_per_image_clipped_at_the_border(side: int) -> None:
    batch = torch.ones(64, 3, 32, 32)
    out = augment(batch, torch.Generator().manual_seed(0), pad=0, cutout=side)
    erased = out == 0
    # The same pixels are erased in every channel, and the square is at most side × side.
    assert torch.equal(erased.all(dim=1), erased.any(dim=1))
    counts = erased[:, 0].sum(dim=(1, 2))
    assert counts.max().item() == side * side  # some square lies wholly inside
    assert counts.min().item() >= ((side + 1) // 2) ** 2 > 0  # a corner centre keeps at least a quarter
    rows = erased[:, 0].any(dim=2).sum(dim=1)
    cols = erased[:, 0].any(dim=1).sum(dim=1)
    assert torch.equal(counts, rows * cols)  # a rectangle: clipped, never wrapped around
    assert len({tuple(m.nonzero()[0].tolist()) for m in erased[:, 0]}) > 1  # a different place per image


def test_no_cutout_erases_nothing() -> None:
    out = augment(torch.ones(16, 3, 32, 32), torch.Generator().manual_seed(0), pad=0)
    assert bool((out == 1).all())


@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_each_image_is_a_crop_of_its_padded_copy_mirrored_or_not(padding: str) -> None:
    torch.manual_seed(0)
    batch = torch.randn(32, 3, 8, 8)
    out = augment(batch, torch.Generator().manual_seed(1), pad=2, padding=padding)
    padded = F.pad(batch, (2, 2, 2, 2), mode="constant" if padding == "zeros" else "reflect")
    shifts = set()
    for image, source in zip(out, padded, strict=True):
        crops = {(y, x): source[:, y:y + 8, x:x + 8] for y in range(5) for x in range(5)}
        views = [(y, x, flip) for (y, x), crop in crops.items() for flip in (False, True)
                 if torch.equal(image, crop.flip(2) if flip else crop)]
        assert views, "not a crop of the padded image"
        shifts.update(views)
    assert len(shifts) > 10  # the offsets and mirrors vary from image to image


def test_reflect_padding_fills_the_border_with_the_image_and_zeros_with_the_mean() -> None:
    batch = torch.ones(256, 3, 8, 8)  # the mean after normalisation is 0, so "zeros" shows as zeros
    zeros = augment(batch, torch.Generator().manual_seed(0), pad=4)
    reflect = augment(batch, torch.Generator().manual_seed(0), pad=4, padding="reflect")
    assert bool((zeros == 0).any()) and bool((reflect == 1).all())
    with pytest.raises(ValueError, match="padding 'wrap' is not one of: zeros, reflect"):
        augment(batch, torch.Generator(), padding="wrap")


def test_the_draws_come_from_the_generator_alone() -> None:
    batch = torch.randn(16, 3, 8, 8)
    first = augment(batch, torch.Generator().manual_seed(3), pad=2, cutout=4)
    torch.manual_seed(99)  # torch's global stream plays no part
    assert torch.equal(augment(batch, torch.Generator(device=batch.device).manual_seed(3), pad=2, cutout=4), first)
    assert not torch.equal(augment(batch, torch.Generator().manual_seed(4), pad=2, cutout=4), first)
    assert to_device(batch, batch.device) is batch  # draws already on the batch's device are not copied


def test_normalise_is_the_embedders_input_arithmetic() -> None:
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    expected = to_model_input(images, mean=mean, std=std, device=torch.device("cpu"))
    got = normalise(images, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))
    assert torch.equal(got, expected) and got.is_contiguous(memory_format=torch.channels_last)
