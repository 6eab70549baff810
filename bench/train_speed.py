"""Training throughput of `cbir train`'s step on this machine, and what an epoch will cost.

    python bench/train_speed.py --batch-size 256 --steps 50

Runs `cbir train`'s own step (`train_step`: augment with Cutout, bf16 autocast forward, label-smoothed
cross-entropy, backward, Nesterov SGD from `make_optimizer`) of the full-width VGG-16 with
`cbir train`'s defaults, on random uint8 images held on the device, after `--warmup` untimed
steps (cuDNN autotuning, allocator growth). Prints images per second and the seconds one epoch of
`--train-images` takes at that rate, as JSON; per-epoch extras (the test-set check, checkpoints)
come on top.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from services.embedder.inference import Preprocessing, pick_device
from services.embedder.model import DEFAULT_BACKBONE, build_model
from services.training import get_args_parser
from services.training.loop import make_optimizer, train_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--train-images", type=int, default=50_000, help="images per epoch")
    parser.add_argument("--cutout", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    recipe = get_args_parser().parse_args(["--batch-size", str(args.batch_size), "--cutout", str(args.cutout)])
    model = build_model({"name": DEFAULT_BACKBONE, "embedding_dim": recipe.embedding_dim,
                         "width_mult": recipe.width_mult}, 10)
    preprocessing = Preprocessing()  # CIFAR-10's mean and std, as `cbir train` normalises
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = make_optimizer(model, recipe)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    generator = torch.Generator(device=device).manual_seed(0)  # as `cbir train`: the draws stay on the device
    size = preprocessing.image_size
    images = torch.randint(0, 256, (args.batch_size * 4, size, size, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (args.batch_size * 4,), device=device)

    def step(i: int) -> None:
        index = torch.arange(args.batch_size, device=device) + (i % 4) * args.batch_size
        train_step(model, optimizer, criterion, images[index], labels[index], generator, recipe,
                   preprocessing=preprocessing)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    synchronize()
    started = time.perf_counter()
    for i in range(args.steps):
        step(i)
    synchronize()
    seconds = time.perf_counter() - started
    rate = args.steps * args.batch_size / seconds
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "batch_size": args.batch_size, "steps": args.steps,
        "images_per_second": round(rate, 1), "epoch_seconds": round(args.train_images / rate, 2),
    }))


if __name__ == "__main__":
    main()
