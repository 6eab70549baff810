"""`cbir train`'s command line: `get_args_parser()` (extend it, as torchvision's references do), built from
one function per group of options, and what every training command records of its options (`jsonable`,
`recorded_command`). It imports nothing else of services.training, which all imports it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from services.embedder.bundle import DEFAULT_BUNDLE_DIR
from services.embedder.model import BACKBONES, DEFAULT_BACKBONE

# Options that change how a run goes but not what it makes; the recorded command leaves them out.
_NOT_RECORDED = ("resume", "quiet", "threads", "checkpoint_every", "compile", "test_every", "profile_steps")
_NEGATIVE_FLAGS = {"flip_tta": "--no-flip-tta", "bf16": "--no-bf16"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir train", description="Train the image embedder and write its bundle",
                                     add_help=add_help)
    add_file_arguments(parser)
    add_schedule_arguments(parser)
    add_model_arguments(parser)
    add_loss_arguments(parser)
    add_vector_arguments(parser)
    add_run_arguments(parser)
    return parser


def add_file_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the collection is read and the bundle and checkpoint are written."""
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="collection root with train/ and test/ splits (default: CBIR_DATA_DIR, "
                        "else data/cifar10, else ../shared/cifar10)")
    parser.add_argument("--output", type=Path, default=DEFAULT_BUNDLE_DIR, help="bundle directory to write")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("state/train"),
                        help="where the per-epoch checkpoint and the decoded-image cache live")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="write the checkpoint every this many epochs (and after the last)")


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """How long training runs and how the optimizer steps: epochs or a time budget, SGD, augmentation, SWA."""
    parser.add_argument("--epochs", type=int, default=40, help="total epochs of the schedule")
    parser.add_argument("--time-budget-min", type=float, default=None,
                        help="train for this many minutes of training steps instead of --epochs epochs (the "
                        "one-cycle schedule follows the clock; the last epoch stops where the budget ends; the "
                        "per-epoch test measurement is not counted): how `cbir compare --train` gives every "
                        "model the same budget")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (SGD, Nesterov)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--cutout", type=int, default=0,
                        help="side of the square each training image loses (Cutout; 0 = off, 16 is usual for CIFAR)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    parser.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle",
                        help="learning-rate schedule over the run's epochs before the SWA ones")
    parser.add_argument("--swa-epochs", type=int, default=0,
                        help="the last this many epochs run at the constant --swa-lr and the bundle gets the "
                        "average of the weights at their ends (stochastic weight averaging; 0 = off)")
    parser.add_argument("--swa-lr", type=float, default=0.01, help="learning rate of the SWA epochs")
    parser.add_argument("--crop-padding", choices=("zeros", "reflect"), default="zeros",
                        help="how the 4 pixels the random crop may shift into are filled: zeros (the dataset mean "
                        "after normalisation) or the image reflected at its border")
    parser.add_argument("--scale-lr", action="store_true",
                        help="peak learning rate --lr x --batch-size / 256 (Goyal et al.'s linear scaling rule, "
                        "for batches larger than the recipe's 256)")
    parser.add_argument("--warmup-epochs", type=float, default=0.0,
                        help="multiply the schedule's learning rate by a linear ramp from 0 to 1 over this many "
                        "epochs of steps (0 = off: the schedule's own warm-up alone)")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="the bundle gets an exponential moving average of the weights and batch-norm "
                        "statistics, updated every --ema-every steps with this decay (0 = off; e.g. 0.999)")
    parser.add_argument("--ema-every", type=int, default=1,
                        help="with --ema-decay: steps between updates of the average (each update reads its "
                        "counter on the host: on CUDA one wait for the GPU's queue)")
    parser.add_argument("--sam-rho", type=float, default=0.0,
                        help="sharpness-aware minimisation: each step takes its gradient at the weights moved "
                        "this far (L2) uphill, two forward and backward passes a step (0 = off; 0.05 is usual)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The network and the weights it starts from."""
    parser.add_argument("--arch", choices=list(BACKBONES), default=DEFAULT_BACKBONE,
                        help="the backbone: our VGG-16 (default) or one of the study's other models, adapted to "
                             "32x32 (services/embedder/backbones.py)")
    parser.add_argument("--embedding-dim", type=int, default=512, help="width of the hidden FC layer")
    parser.add_argument("--width-mult", type=float, default=1.0,
                        help="scale of every convolution's width (1.0 = VGG-16)")
    parser.add_argument("--pretrained", choices=("none", "imagenet"), default="none",
                        help="start the convolutions from torchvision's ImageNet weights (downloads; VGG-16, AlexNet, "
                             "GoogLeNet, ResNet-50)")
    parser.add_argument("--freeze-pretrained", action="store_true",
                        help="with --pretrained imagenet: train only the layers it did not copy (the embedding "
                             "head, the classifier, the stems adapted to 32x32); the copied ones keep their ImageNet "
                             "weights and batch-norm statistics, as in the study's transfer learning")
    parser.add_argument("--init-bundle", type=Path, default=None,
                        help="start from the weights of this bundle (e.g. continue the shipped model with a "
                        "new schedule); its architecture must match")


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """The terms added to the cross-entropy: a metric loss on the embedding, distillation from teachers."""
    parser.add_argument("--metric-loss", choices=("none", "triplet"), default="none",
                        help="add a batch-hard triplet loss on the normalised embedding")
    parser.add_argument("--metric-weight", type=float, default=0.5, help="weight of the metric loss")
    parser.add_argument("--triplet-margin", type=float, default=0.2, help="triplet margin (cosine distance)")
    parser.add_argument("--teacher", type=Path, action="append", default=None, metavar="BUNDLE",
                        help="distil from this bundle (repeat for an ensemble: their softened probabilities are "
                        "averaged); each teacher sees the student's augmented batch")
    parser.add_argument("--distill-weight", type=float, default=0.9,
                        help="with --teacher: weight of the distillation term; the cross-entropy gets 1 minus it")
    parser.add_argument("--distill-temperature", type=float, default=4.0,
                        help="with --teacher: softmax temperature of teachers and student in the distillation term")


def add_vector_arguments(parser: argparse.ArgumentParser) -> None:
    """What the bundle says about the search vector: its PCA, the one-hot's weight, flip TTA."""
    parser.add_argument("--pca-components", type=int, default=256, help="PCA components kept in the bundle")
    parser.add_argument("--pca-dims", type=int, default=64, help="default PCA dims of the search vector")
    parser.add_argument("--onehot-weight", type=float, default=2.0,
                        help="default weight of the predicted-class one-hot in the search vector")
    parser.add_argument("--no-flip-tta", dest="flip_tta", action="store_false",
                        help="embed images without averaging with their mirror image")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """How much of the collection a run reads, and the machine it runs on."""
    parser.add_argument("--limit-per-class", type=int, default=None,
                        help="use at most this many train images per class (quick runs, tests)")
    parser.add_argument("--test-limit-per-class", type=int, default=None,
                        help="use at most this many test images per class")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--compile", choices=("auto", "off", "default", "reduce-overhead", "max-autotune"),
                        default="auto", help="torch.compile the network for training steps with this mode; auto: "
                        "the default mode on CUDA, off on the CPU (where compiling costs more than it saves on "
                        "short runs)")
    parser.add_argument("--test-every", type=int, default=1,
                        help="measure the test split every this many epochs (and after the last)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile this many training steps after the first three (torch.profiler) and write "
                        "the table of the costliest operations to profile.txt in --checkpoint-dir (0 = off)")


def defaults() -> dict[str, Any]:
    """Every option's default, as `vars(args)` holds it."""
    return vars(get_args_parser().parse_args([]))


def jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """`vars(args)` with paths as strings, for `bundle.json` and the checkpoint."""
    def plain(value: Any) -> Any:
        if isinstance(value, list):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return {k: plain(v) for k, v in values.items()}


def recorded_command(args: argparse.Namespace, *, parser: argparse.ArgumentParser | None = None,
                     not_recorded: tuple[str, ...] = _NOT_RECORDED) -> str:
    """The command (`cbir train`, or `parser`'s) with the options that differ from their defaults: the
    command that remakes the bundle."""
    parser = parser or get_args_parser()
    default = vars(parser.parse_args([]))
    words = []
    for key, value in vars(args).items():
        if key in not_recorded or value == default.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(_NEGATIVE_FLAGS.get(key, flag))
        elif isinstance(value, list):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return " ".join([parser.prog, *words])
