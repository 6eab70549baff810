"""Can the query's predicted class get better without retraining? Three levers, measured.

    python bench/label_options.py --model-dir models/vgg16-cifar10 [--with-bundle DIR ...]

1. More test-time views: the classifier's probabilities averaged over the image, its mirror and
   copies shifted by 1 or 2 pixels (zero padding, as the training crops). The service uses 2
   views (flip); every view is one more forward pass per query and per indexed image.
2. A vote of the nearest indexed images: the k nearest train images by cosine of the raw
   embedding (before the one-hot fusion, which would only echo the classifier) vote for their
   true class; the vote alone, and added to the classifier's probabilities with weight λ.
3. An ensemble (with `--with-bundle`, repeatable): the served probabilities (each bundle with its
   own flip TTA) of other bundles averaged with this one's, for every combination of two or more.
   Each member is a whole network's forward passes per query and per indexed image.

All 10,000 CIFAR-10 test images against the 50,000 train images; prints the test accuracy of
each option. Decoded images and embeddings are cached under `--cache-dir`, as `cbir evaluate`
caches them.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from services.common.collection import find_data_dir
from services.embedder.bundle import load_bundle
from services.embedder.inference import Preprocessing, autocast, to_model_input
from services.evaluation.features import embed_split, load_collection_split

SHIFTS = {1: [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)], 2: [(0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)]}
VIEW_SETS = {
    "1 view (the image)": [((0, 0), False)],
    "2 views (+ mirror, as served)": [((0, 0), False), ((0, 0), True)],
    "10 views (mirror × shifts of 1 px)": [(s, f) for s in SHIFTS[1] for f in (False, True)],
    "10 views (mirror × shifts of 2 px)": [(s, f) for s in SHIFTS[2] for f in (False, True)],
    "18 views (mirror × shifts of 1 and 2 px)": [(s, f) for s in dict.fromkeys(SHIFTS[1] + SHIFTS[2])
                                                 for f in (False, True)],
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("models/vgg16-cifar10"), help="bundle to measure")
    parser.add_argument("--data-dir", type=Path, default=None, help="collection root (default: as cbir serve)")
    parser.add_argument("--cache-dir", type=Path, default=Path("state/evaluation"),
                        help="decoded images and embeddings are cached here")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    parser.add_argument("--with-bundle", type=Path, action="append", default=[], metavar="DIR",
                        help="another bundle to ensemble with (repeatable)")
    return parser


def shifted(batch: torch.Tensor, dx: int, dy: int, pad: int = 2) -> torch.Tensor:
    """The batch seen through a window moved by (dx, dy) pixels: the content moves by (-dx, -dy),
    zeros come in at the edge."""
    padded = F.pad(batch, (pad, pad, pad, pad))
    return padded[:, :, pad + dy:pad + dy + batch.shape[2], pad + dx:pad + dx + batch.shape[3]]


def view_probabilities(model: torch.nn.Module, images: np.ndarray, batch_size: int, preprocessing: Preprocessing
                       ) -> dict[tuple[tuple[int, int], bool], torch.Tensor]:
    """Softmax probabilities of every view any set uses, bf16 on the CPU as the embedder runs,
    normalised as the bundle's `preprocessing` says."""
    views = list(dict.fromkeys(view for views in VIEW_SETS.values() for view in views))
    out: dict = {view: [] for view in views}
    device = torch.device("cpu")
    with torch.inference_mode(), autocast(device, True):
        for start in range(0, len(images), batch_size):
            batch = to_model_input(images[start:start + batch_size], mean=preprocessing.mean,
                                   std=preprocessing.std, device=device)
            for (dx, dy), mirror in views:
                view = shifted(batch, dx, dy) if (dx, dy) != (0, 0) else batch
                view = view.flip(3) if mirror else view
                _, logits = model(view.contiguous(memory_format=torch.channels_last))
                out[((dx, dy), mirror)].append(logits.float().softmax(dim=1))
    return {view: torch.cat(parts) for view, parts in out.items()}


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    bundle = load_bundle(args.model_dir)
    root = find_data_dir(args.data_dir)
    train, test = (load_collection_split(root, split, bundle.classes, preprocessing=bundle.preprocessing,
                                         cache_dir=args.cache_dir) for split in ("train", "test"))
    truth = torch.from_numpy(test.labels)
    print(f"{bundle.version}: {len(test)} test queries, {len(train)} train images")

    def accuracy(scores: torch.Tensor) -> str:
        return f"{(scores.argmax(dim=1) == truth).float().mean().item():.4f}"

    model = bundle.model.eval().to(memory_format=torch.channels_last)
    probabilities = view_probabilities(model, test.images, args.batch_size, bundle.preprocessing)
    print("\ntest-time views | accuracy")
    for name, views in VIEW_SETS.items():
        print(f"{name} | {accuracy(sum(probabilities[view] for view in views))}")

    # The service's own features (its flip TTA): raw embeddings and averaged probabilities.
    query = embed_split(bundle, test, purpose="query", cache_dir=args.cache_dir)
    document = embed_split(bundle, train, purpose="index", cache_dir=args.cache_dir)
    served = torch.from_numpy(query.probabilities)
    similarity = F.normalize(torch.from_numpy(query.embeddings), dim=1) @ F.normalize(
        torch.from_numpy(document.embeddings), dim=1).T
    neighbours = torch.from_numpy(train.labels)[similarity.topk(100, dim=1).indices]
    lambdas = (0.25, 0.5, 1.0, 2.0)
    print(f"\nclassifier as served: {accuracy(served)}")
    print("k | vote alone | " + " | ".join(f"probabilities + {lam} × vote" for lam in lambdas))
    for k in (1, 5, 10, 20, 50, 100):
        votes = torch.zeros_like(served).scatter_add_(1, neighbours[:, :k], torch.ones(len(truth), k)) / k
        print(f"{k} | {accuracy(votes)} | " + " | ".join(accuracy(served + lam * votes) for lam in lambdas))

    if args.with_bundle:
        members = {bundle.version: served}
        for directory in args.with_bundle:
            other = load_bundle(directory)
            if other.classes != bundle.classes:
                raise SystemExit(f"{directory} predicts {other.classes}, not {bundle.classes}")
            decoded_as = (other.preprocessing.image_size, other.preprocessing.resize)
            if decoded_as != (bundle.preprocessing.image_size, bundle.preprocessing.resize):
                raise SystemExit(f"{directory} takes images decoded as {decoded_as}, not as {args.model_dir}")
            served = embed_split(other, test, purpose="query", cache_dir=args.cache_dir)
            members[other.version] = torch.from_numpy(served.probabilities)
        print("\nensemble (served probabilities averaged) | accuracy")
        for size in range(1, len(members) + 1):
            for names in itertools.combinations(members, size):
                print(f"{' + '.join(names)} | {accuracy(sum(members[name] for name in names))}")


if __name__ == "__main__":
    main()
