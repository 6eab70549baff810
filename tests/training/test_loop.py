"""The training loop's pieces: the learning-rate schedule of short runs, the clock-driven one-cycle of a
time budget, SWA's batch-norm statistics, the learning rate scaled with the batch and its linear warm-up,
and a SAM step (eager and compiled)."""

from __future__ import annotations

import copy

import pytest
import torch

from services.embedder.inference import Preprocessing, to_model_input
from services.embedder.model import CIFAR10_MEAN, CIFAR10_STD, CifarVGG16
from services.training import get_args_parser, loop
from services.training.augment import augment
from services.training.loop import make_scheduler, one_cycle
from services.training.sam import SharpnessAwareMinimization


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


def test_scale_lr_multiplies_the_peak_by_the_batch_over_256_in_every_schedule() -> None:
    args = get_args_parser().parse_args(["--lr", "0.1", "--batch-size", "1024", "--scale-lr", "--epochs", "2"])
    assert loop.peak_lr(args) == pytest.approx(0.4)
    assert loop.peak_lr(get_args_parser().parse_args(["--lr", "0.1", "--batch-size", "1024"])) == 0.1
    model = torch.nn.Linear(2, 2)
    optimizer = loop.make_optimizer(model, args)
    scheduler = make_scheduler(args, optimizer, steps_per_epoch=100)
    rates = []
    for _ in range(200):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(0.4)  # OneCycleLR's peak
    cosine = get_args_parser().parse_args(["--lr", "0.1", "--batch-size", "512", "--scale-lr", "--schedule", "cosine"])
    assert loop.make_optimizer(model, cosine).param_groups[0]["lr"] == pytest.approx(0.2)


def test_warm_up_ramps_the_scheduled_rates_linearly_then_leaves_them_alone() -> None:
    args = get_args_parser().parse_args(["--lr", "0.1", "--epochs", "4", "--warmup-epochs", "1.5", "--schedule",
                                         "cosine", "--batch-size", "10"])
    model = CifarVGG16(width_mult=0.125, embedding_dim=8)
    run = loop.TrainingRun.start(model, args, train_images=40, frozen=())  # 4 steps an epoch: 6 warm-up steps
    plain = loop.TrainingRun.start(model, get_args_parser().parse_args(
        ["--lr", "0.1", "--epochs", "4", "--schedule", "cosine", "--batch-size", "10"]), train_images=40)
    assert run.warmup_steps == 6
    for step in range(16):
        scheduled = plain.optimizer.param_groups[0]["lr"]
        with loop.warmed_up(run):
            used = run.optimizer.param_groups[0]["lr"]
        assert run.optimizer.param_groups[0]["lr"] == pytest.approx(scheduled)  # the schedule's value is back
        assert used == pytest.approx(scheduled * min(1.0, (step + 1) / 6)), step
        run.steps += 1
        for each in (run, plain):
            each.optimizer.step()
            each.scheduler.step()


def _sam_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = CifarVGG16(width_mult=0.125, embedding_dim=16).to(memory_format=torch.channels_last).train()
    images = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,))
    args = get_args_parser().parse_args(["--no-bf16", "--sam-rho", "0.5", "--lr", "0.1"])
    return model, images, labels, args


def _batch_norm_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def test_a_sam_step_updates_with_the_gradient_at_the_weights_moved_uphill() -> None:
    model, images, labels, args = _sam_setup()
    reference = copy.deepcopy(model)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = loop.make_optimizer(model, args)
    torch.manual_seed(5)  # dropout's masks: the same draws in both computations
    loss, _ = loop.train_step(model, optimizer, criterion, images, labels, torch.Generator().manual_seed(1), args,
                              preprocessing=Preprocessing(), sam=SharpnessAwareMinimization(optimizer, rho=0.5))

    # The same step by hand: the gradient at w, then the one at w + rho g / |g|, applied at w.
    torch.manual_seed(5)
    inputs = augment(to_model_input(images, mean=CIFAR10_MEAN, std=CIFAR10_STD, device=torch.device("cpu")),
                     torch.Generator().manual_seed(1))
    first = criterion(reference(inputs)[1], labels)
    params = list(reference.parameters())
    grads = torch.autograd.grad(first, params)
    statistics = _batch_norm_state(reference)  # after the first pass only
    norm = torch.cat([g.flatten() for g in grads]).norm()
    moved = copy.deepcopy(reference)
    with torch.no_grad():
        for p, g in zip(moved.parameters(), grads, strict=True):
            p.add_(g * 0.5 / norm)
    moved_grads = torch.autograd.grad(criterion(moved(inputs)[1], labels), list(moved.parameters()))
    for p, g in zip(params, moved_grads, strict=True):
        p.grad = g
    reference_optimizer = loop.make_optimizer(reference, args)
    reference_optimizer.step()

    assert loss.item() == pytest.approx(first.item())  # the loss reported is the first pass's
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    for name, value in _batch_norm_state(model).items():
        torch.testing.assert_close(value, statistics[name], msg=name)  # the second pass left them alone
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_sam_keeps_the_batch_norm_statistics_of_its_first_pass_under_torch_compile_too() -> None:
    """torch.compile guards on the batch norms' momentum: the second pass runs a graph of its own."""
    model, images, labels, args = _sam_setup(seed=1)
    reference = copy.deepcopy(model)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = loop.make_optimizer(model, args)
    compiled = torch.compile(model, backend="eager")  # dynamo's graphs and guards, no code generation
    loop.train_step(compiled, optimizer, criterion, images, labels, torch.Generator().manual_seed(1), args,
                    preprocessing=Preprocessing(), sam=SharpnessAwareMinimization(optimizer, rho=0.5))
    inputs = augment(to_model_input(images, mean=CIFAR10_MEAN, std=CIFAR10_STD, device=torch.device("cpu")),
                     torch.Generator().manual_seed(1))
    reference(inputs)
    for name, value in _batch_norm_state(reference).items():
        torch.testing.assert_close(_batch_norm_state(model)[name], value, msg=name)
