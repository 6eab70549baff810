"""Batch augmentation: cutout erases one clipped square per image, and nothing when it is off."""

from __future__ import annotations

import pytest
import torch

from services.training.augment import augment


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
