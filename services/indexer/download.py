"""Fetch CIFAR-10 with torchvision and lay it out as `<split>/<class>/<NNNN>.jpg` (needs internet)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)


def download_cifar10(destination: Path) -> Path:
    """Download CIFAR-10 (torchvision) into `destination` as JPEG folders; returns `destination`."""
    from torchvision.datasets import CIFAR10

    with tempfile.TemporaryDirectory() as raw:
        for split, train in (("train", True), ("test", False)):
            dataset = CIFAR10(raw, train=train, download=True)
            counts: dict[str, int] = {}
            for image, label in tqdm(dataset, desc=f"writing {split}", unit="img"):
                name = dataset.classes[label]
                folder = destination / split / name
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{counts.get(name, 0):04d}.jpg", quality=95)
                counts[name] = counts.get(name, 0) + 1
    logger.info("CIFAR-10 written to %s", destination)
    return destination
