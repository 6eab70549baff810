"""`cbir train`: train an embedder (VGG-16 by default) on a `<root>/<split>/<class>/<image>` collection.

bf16 autocast and channels_last on CPU or CUDA (torch.compile on CUDA, `--compile`), random-crop + flip
augmentation (optionally Cutout, reflect padding), one-cycle or cosine schedule (optionally a linear
warm-up and a learning rate scaled with the batch), label smoothing, an optional batch-hard triplet loss
on the embedding, optional distillation from teacher bundles (`--teacher`), optional SAM, SWA or weight
EMA, a checkpoint every `--checkpoint-every` epochs (`--resume` continues from it, and re-plans the
schedule for a new `--epochs`), then PCA on the train embeddings and a bundle written to `--output`.

>>> from services.training import get_args_parser, train
>>> train(get_args_parser().parse_args(["--epochs", "1", "--output", "models/try"]))["version"]
'vgg16-10c-…'
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services.common.collection import find_data_dir, list_classes
from services.common.errors import BundleError, ConfigError, TrainingError
from services.embedder.bundle import load_bundle
from services.embedder.inference import Preprocessing, pick_device
from services.embedder.model import CIFAR10_MEAN, CIFAR10_STD, backbone, build_model
from services.training.cli import jsonable, recorded_command
from services.training.data import load_split
from services.training.loop import (
    CHECKPOINT_FILE,
    DeviceSplit,
    TrainingRun,
    accuracy_of,
    averaged_model,
    checkpoint_state,
    peak_lr,
    resume,
    save_checkpoint,
    train_epoch,
)
from services.training.settings import TrainingSettings
from services.training.writer import training_record, write_bundle

logger = logging.getLogger("cbir.train")

def train(args: argparse.Namespace, *, settings: TrainingSettings | None = None) -> dict[str, Any]:
    """Train as `args` (from `get_args_parser()`) say and write the bundle; returns its version and
    test metrics. `TrainingError` names the option that cannot work; `settings` (default: read from
    `CBIR_*` and `.env`) fill in what the command line leaves out."""
    check_options(args)
    settings = settings or TrainingSettings.load()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
    except ConfigError as exc:
        raise TrainingError(f"--device: {exc.message}") from exc
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    root = find_data_dir(args.data_dir or settings.data_dir)
    classes = list_classes(root, "train")
    arch = args.arch
    architecture = {"name": arch, "embedding_dim": args.embedding_dim, "width_mult": args.width_mult}
    preprocessing = Preprocessing(image_size=backbone(arch).input_size, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                                  flip_tta=args.flip_tta)
    cache_dir = args.checkpoint_dir / "cache"
    train_x, train_y = load_split(root, "train", classes, limit_per_class=args.limit_per_class,
                                  preprocessing=preprocessing, cache_dir=cache_dir, quiet=args.quiet)
    test_x, test_y = load_split(root, "test", classes, limit_per_class=args.test_limit_per_class,
                                preprocessing=preprocessing, cache_dir=cache_dir, quiet=args.quiet)
    logger.info("data: %s, %d train and %d test images, %d classes, device %s",
                root, len(train_x), len(test_x), len(classes), device)

    model, pretrained = initial_model(args, architecture, len(classes))
    frozen = freeze(model, pretrained) if args.freeze_pretrained else []
    model = model.to(device, memory_format=torch.channels_last)
    teachers = load_teachers(args.teacher or [], classes, device)
    run = TrainingRun.start(model, args, train_images=len(train_x), frozen=frozen)
    if args.resume:
        resume(run, args, args.checkpoint_dir / CHECKPOINT_FILE, device)
    train_data = DeviceSplit(images=torch.from_numpy(train_x).to(device), labels=torch.from_numpy(train_y).to(device))
    with profiling(run, args, device):
        run_epochs(run, args, train_data, (test_x, test_y), teachers=teachers, preprocessing=preprocessing)
    if run.swa_model is not None:
        model = averaged_model(run.swa_model, train_data.images, run.generator, bf16=args.bf16, cutout=args.cutout,
                               batch_size=args.batch_size, preprocessing=preprocessing, padding=args.crop_padding)
    elif run.ema_model is not None:
        model = run.ema_model.module
        logger.info("EMA: the bundle gets the average of %d updates", int(run.ema_model.n_averaged.item()))
    training = training_record(command=recorded_command(args), recipe=jsonable(vars(args)), history=run.history,
                               replans=run.replans, init_bundle=args.init_bundle, teachers=args.teacher or ())
    training["environment"] = environment_record(run, args, device)
    if run.budget_s is not None:
        training["budget"] = {"minutes": args.time_budget_min, "trained_seconds": round(run.trained_s, 1),
                              "images_seen": run.images_seen,
                              "epochs_reached": round(run.images_seen / len(train_x), 3)}
    return write_bundle(args.output, model=model, device=device, classes=classes, architecture=architecture,
                        preprocessing=preprocessing, train_images=train_x, test_images=test_x, test_labels=test_y,
                        pca_components=args.pca_components, pca_dims=args.pca_dims,
                        onehot_weight=args.onehot_weight, training=training, bf16=args.bf16, seed=args.seed)


def check_options(args: argparse.Namespace) -> None:
    """Refuse option values no run can use, before anything is loaded."""
    if args.checkpoint_every < 1:
        raise TrainingError("--checkpoint-every must be at least 1")
    if not 0 <= args.swa_epochs <= args.epochs:
        raise TrainingError("--swa-epochs must be between 0 and --epochs")
    if args.time_budget_min is not None and (args.time_budget_min <= 0 or args.swa_epochs):
        raise TrainingError("--time-budget-min must be above 0, and cannot be combined with --swa-epochs")
    if args.freeze_pretrained and (args.pretrained != "imagenet" or args.swa_epochs):
        raise TrainingError("--freeze-pretrained needs --pretrained imagenet, and cannot be combined with "
                            "--swa-epochs (which re-estimates every batch norm's statistics)")
    if not 0 <= args.distill_weight <= 1 or args.distill_temperature <= 0:
        raise TrainingError("--distill-weight must be between 0 and 1 and --distill-temperature above 0")
    if not 0 <= args.ema_decay < 1 or args.ema_every < 1 or (args.ema_decay and args.swa_epochs):
        raise TrainingError("--ema-decay must be at least 0 and below 1, --ema-every at least 1, and --ema-decay "
                            "cannot be combined with --swa-epochs (each replaces the weights the bundle gets)")
    if args.sam_rho < 0 or args.warmup_epochs < 0 or args.test_every < 1 or args.profile_steps < 0:
        raise TrainingError("--sam-rho, --warmup-epochs and --profile-steps must be at least 0, --test-every at "
                            "least 1")


def initial_model(args: argparse.Namespace, architecture: dict[str, Any],
                  num_classes: int) -> tuple[nn.Module, list[str]]:
    """A fresh network, with `--pretrained` convolutions or the weights of `--init-bundle` (unless resuming),
    and the names of the parameters copied from ImageNet."""
    pretrained: list[str] = []
    try:
        model = build_model(architecture, num_classes)
        if args.pretrained == "imagenet":
            pretrained = model.load_imagenet_features()
    except ValueError as exc:  # an option this backbone does not take (width, ImageNet weights)
        raise TrainingError(f"--arch {architecture['name']}: {exc}") from exc
    if args.init_bundle is not None and not args.resume:
        try:
            parent = load_bundle(args.init_bundle)
        except BundleError as exc:
            raise TrainingError(f"--init-bundle {args.init_bundle}: {exc}") from exc
        if parent.family != "deep":
            raise TrainingError(f"--init-bundle {args.init_bundle}: a {parent.family} bundle has no network")
        try:
            model.load_state_dict(parent.model.state_dict())
        except RuntimeError as exc:
            raise TrainingError(f"--init-bundle {args.init_bundle}: its network is not --arch's ({exc})") from exc
        logger.info("starting from the weights of %s", args.init_bundle)
    return model, pretrained


def freeze(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """Stop training the named parameters; return the batch norms left with nothing to train, which the
    loop keeps in eval mode so that their running statistics stay those they came with."""
    names_set = set(names)
    for name, parameter in model.named_parameters():
        if name in names_set:
            parameter.requires_grad_(False)
    frozen = [module for module in model.modules() if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d)
              and not any(parameter.requires_grad for parameter in module.parameters())]
    trained = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    logger.info("--freeze-pretrained: %d parameter tensors frozen (%d batch norms in eval mode); %d weights train",
                len(names_set), len(frozen), trained)
    return frozen


def load_teachers(directories: list[Path], classes: list[str], device: torch.device) -> list[nn.Module]:
    """The `--teacher` bundles' networks in eval mode on `device`; their classes must be the collection's."""
    teachers = []
    for directory in directories:
        try:
            bundle = load_bundle(directory)
        except BundleError as exc:
            raise TrainingError(f"--teacher {directory}: {exc}") from exc
        if bundle.family != "deep":
            raise TrainingError(f"--teacher {directory}: a {bundle.family} bundle has no logits to distil")
        if bundle.classes != classes:
            raise TrainingError(f"--teacher {directory}: its classes {bundle.classes} are not the collection's "
                                f"{classes}")
        teachers.append(bundle.model.eval().to(device, memory_format=torch.channels_last))
        logger.info("distilling from %s (%s)", directory, bundle.version)
    return teachers


def run_epochs(run: TrainingRun, args: argparse.Namespace, train_data: DeviceSplit,
               test: tuple[np.ndarray, np.ndarray], *, teachers: list[nn.Module],
               preprocessing: Preprocessing) -> None:
    """The epochs from `run.start_epoch` to `--epochs` (with `--time-budget-min`: until the budget is spent,
    the last epoch partial), each measured on the test split and recorded, with a checkpoint every
    `--checkpoint-every` epochs and after the last."""
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    device = train_data.images.device
    last = args.epochs if run.budget_s is None else sys.maxsize
    for epoch in range(run.start_epoch, last):
        if run.budget_spent:
            break
        stats = train_epoch(run, epoch, train_data, args=args, criterion=criterion, teachers=teachers,
                            preprocessing=preprocessing)
        record = {"epoch": epoch + 1, "epochs_reached": round(run.images_seen / len(train_data.images), 3),
                  "trained_seconds": round(run.trained_s, 1), "loss": stats["loss"],
                  "train_accuracy": stats["train_accuracy"]}
        # The last epoch: --epochs' last, or with a time budget the one that spent it (--epochs plays no part).
        last_epoch = run.budget_spent if run.budget_s is not None else epoch + 1 == args.epochs
        if (epoch + 1) % args.test_every == 0 or last_epoch:
            record["test_accuracy"] = accuracy_of(run.model, *test, preprocessing=preprocessing, device=device,
                                                  bf16=args.bf16)
            if run.ema_model is not None:
                record["ema_test_accuracy"] = accuracy_of(run.ema_model.module, *test, preprocessing=preprocessing,
                                                          device=device, bf16=args.bf16)
        record.update(lr=round(run.optimizer.param_groups[0]["lr"], 6),
                      images_per_second=stats["images_per_second"], seconds=stats["seconds"])
        run.history.append(record)
        measured = "".join(f", {name.replace('_', ' ')} {record[name]:.4f}"
                           for name in ("test_accuracy", "ema_test_accuracy") if name in record)
        logger.info("epoch %d: loss %.4f, train accuracy %.4f%s, %.1f img/s, %.0f s", record["epoch"],
                    record["loss"], record["train_accuracy"], measured, record["images_per_second"],
                    record["seconds"])
        if (epoch + 1) % args.checkpoint_every and not last_epoch:
            continue
        save_checkpoint(args.checkpoint_dir / CHECKPOINT_FILE, checkpoint_state(run, args, epoch, device))


def profiling(run: TrainingRun, args: argparse.Namespace, device: torch.device) -> Any:
    """With `--profile-steps N`: torch.profiler over training steps 4 to N + 3 (the first, which may compile,
    and two more left out), its table of the costliest operations written to `profile.txt` in
    `--checkpoint-dir` when they are done (or when training ends first). Without it, nothing."""
    if not args.profile_steps:
        return nullcontext()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    path = args.checkpoint_dir / "profile.txt"

    def write(profiler: torch.profiler.profile) -> None:
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        try:
            table = profiler.key_averages().table(sort_by=sort, row_limit=40)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(table + "\n")
        except Exception:  # noqa: BLE001 - a diagnostic: training goes on without it
            logger.exception("the profile of the training steps could not be written")
            return
        logger.info("profiled %d training steps into %s", args.profile_steps, path)

    run.profiler = torch.profiler.profile(
        activities=activities, on_trace_ready=write,
        schedule=torch.profiler.schedule(wait=2, warmup=1, active=args.profile_steps, repeat=1))
    return run.profiler


def environment_record(run: TrainingRun, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Where the run trained, for `bundle.json`: the device, torch, whether the steps were compiled (and
    how long the first took), where the augmentation's random draws were made, the peak learning rate."""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
            "torch": torch.__version__, "python": platform.python_version(),
            "compiled": run.compiled is not None,
            "compile_seconds": None if run.compile_s is None else round(run.compile_s, 1),
            "random_draws": run.generator.device.type, "peak_lr": round(peak_lr(args), 6), "steps": run.steps}
