"""The training loop's pieces: the learning-rate schedule of short runs, the clock-driven one-cycle of a
time budget, SWA's batch-norm statistics."""

from __future__ import annotations

import pytest
import torch

from services.embedder.inference import Preprocessing
from services.embedder.model import CifarVGG16
from services.training import get_args_parser, loop
from services.training.loop import make_scheduler, one_cycle


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


def test_the_time_budget_one_cycle_is_torchs_one_cycle_as_a_function_of_the_fraction_spent() -> None:
    args = get_args_parser().parse_args(["--epochs", "10", "--lr", "0.1"])
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=args.lr, momentum=0.9, nesterov=True)
    scheduler = make_scheduler(args, optimizer, steps_per_epoch=100)  # OneCycleLR over 1,000 steps
    for step in range(1000):
        group = optimizer.param_groups[0]
        lr, momentum = one_cycle(step / 999, max_lr=args.lr)
        # The phase boundary falls at step 249 for torch and at 0.25 of the budget here: within a step.
        assert lr == pytest.approx(group["lr"], abs=args.lr * 0.005), step
        assert momentum == pytest.approx(group["momentum"], abs=0.001), step
        optimizer.step()
        scheduler.step()
    assert one_cycle(0.0, max_lr=0.1) == pytest.approx((0.01, 0.95))
    assert one_cycle(0.25, max_lr=0.1) == pytest.approx((0.1, 0.85))
    assert one_cycle(1.5, max_lr=0.1) == pytest.approx((1e-4, 0.95))  # past the budget: the end of the cycle


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
