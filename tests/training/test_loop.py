"""The training loop's pieces: the learning-rate schedule of short runs, SWA's batch-norm statistics."""

from __future__ import annotations

import pytest
import torch

from services.embedder.inference import Preprocessing
from services.embedder.model import CifarVGG16
from services.training import get_args_parser, loop
from services.training.loop import make_scheduler


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 20])
def test_schedule_works_for_short_runs(schedule: str, steps: int) -> None:
    # A quick run on a few images can have a single step per epoch; OneCycleLR alone fails below ~8 steps.
    args = get_args_parser().parse_args(["--epochs", "1", "--lr", "0.1", "--schedule", schedule])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    scheduler = make_scheduler(args, optimizer, steps_per_epoch=steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert all(0 < rate <= args.lr + 1e-12 for rate in rates)
    assert max(rates) > args.lr / 4


def test_swa_batch_norm_statistics_describe_the_whole_split_even_when_it_is_stored_class_by_class() -> None:
    torch.manual_seed(0)
    model = CifarVGG16(width_mult=0.125, embedding_dim=32).to(memory_format=torch.channels_last)
    # Two "classes" of very different brightness, stored one after the other like a decoded split.
    images = torch.cat([torch.full((100, 32, 32, 3), 20, dtype=torch.uint8),
                        torch.full((100, 32, 32, 3), 230, dtype=torch.uint8)])

    def first_bn_variance(batch_size: int) -> torch.Tensor:
        swa = torch.optim.swa_utils.AveragedModel(model)
        swa.update_parameters(model)
        averaged = loop.averaged_model(swa, images, torch.Generator().manual_seed(0), bf16=False, cutout=0,
                                       batch_size=batch_size, preprocessing=Preprocessing())
        return averaged.features[1].running_var

    whole = first_bn_variance(batch_size=200)  # one batch: the split's own statistics
    ratio = first_bn_variance(batch_size=20) / whole
    assert 0.8 < ratio.median().item() < 1.2  # single-class batches would give a fraction of it
