"""The tests' tiny models: a narrow VGG-16 and a Bag-of-Visual-Words bundle trained in seconds."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from services.common.images import decode_image
from services.embedder.bundle import Bundle
from services.embedder.runtime import Embedder
from services.training import get_args_parser, train


def tiny_training_args(collection: Path, work: Path, *extra: str, epochs: int = 10, seed: int = 1,
                       output: Path | None = None) -> argparse.Namespace:
    """`cbir train` options for a narrow VGG-16 on `collection` (seconds): the one tiny recipe of the
    tests. `work` holds the checkpoint; the bundle goes to `output` (default `work/bundle`); `extra`
    options come last, so they override the recipe's."""
    return get_args_parser().parse_args([
        "--data-dir", str(collection), "--output", str(output or work / "bundle"),
        "--checkpoint-dir", str(work / "train"), "--epochs", str(epochs), "--batch-size", "50", "--lr", "0.05",
        "--width-mult", "0.125", "--embedding-dim", "64", "--pca-components", "32", "--pca-dims", "16", "--quiet",
        "--seed", str(seed), *extra,
    ])


def train_tiny_bundle(collection: Path, work: Path, *extra: str, epochs: int = 10, seed: int = 1) -> Path:
    """A narrow VGG-16 trained on `collection` for ten epochs (3 s on one core: about 0.35 accuracy on
    CIFAR-10 images it never saw, where 4 epochs gave 0.23–0.26); returns its bundle directory."""
    args = tiny_training_args(collection, work, *extra, epochs=epochs, seed=seed)
    train(args)
    return args.output


# `cbir train-bovw` on the mini collection in seconds: two feature sets, two fast classifiers, a tiny vocabulary.
TINY_BOVW_OPTIONS = ("--feature-sets", "hog+sift,gch", "--classifiers", "logreg,gnb", "--vocabulary-sizes", "8,16,24",
                     "--kmeans-descriptors", "4000", "--db-descriptors", "1000", "--grid-images", "200",
                     "--folds", "3", "--jobs", "1", "--quiet")


def train_tiny_bovw_bundle(collection: Path, work: Path, *extra: str) -> Path:
    """A BOVW bundle trained on `collection` with `TINY_BOVW_OPTIONS` (a few seconds); returns its directory.
    Its measurements are also in `work/results.json`."""
    from services.training.bovw import get_args_parser as bovw_parser
    from services.training.bovw import train_bovw

    args = bovw_parser().parse_args(["--data-dir", str(collection), "--output", str(work / "bovw"), "--cache-dir",
                                     str(work / "cache"), "--results", str(work / "results.json"),
                                     *TINY_BOVW_OPTIONS, *extra])
    train_bovw(args)
    return args.output


def classify_test_images(bundle: Bundle, collection: Path, *, per_class: int,
                         skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true class names of `per_class` test images a class (after the first `skip`),
    decoded and embedded as an upload is: `decode_image` at the bundle's size and filter, then `Embedder`."""
    pre = bundle.preprocessing
    paths = [(path, name) for name in bundle.classes
             for path in sorted((collection / "test" / name).iterdir())[skip:skip + per_class]]
    images = np.stack([decode_image(path.read_bytes(), size=pre.image_size, resample=pre.resize) for path, _ in paths])
    predicted = [embedding.label for embedding in Embedder(bundle, device="cpu").embed_batch(images)]
    return np.asarray(predicted), np.asarray([name for _, name in paths])
