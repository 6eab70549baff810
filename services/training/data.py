"""A collection split decoded once into arrays, cached as `.npz`: what training and evaluation read.

Images go through the service's own decoder (`decode_image`) at the bundle's size and resample
filter, so what a model is trained and measured on is what the upload path feeds it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from services.common.collection import CollectionImage, iter_images
from services.common.images import IMAGE_SIZE, RESAMPLE, decode_image
from services.embedder.inference import Preprocessing


def select_images(root: Path, split: str, *, limit_per_class: int | None) -> list[CollectionImage]:
    """The images of `root/split` in the collection's stable order, at most `limit_per_class` per class."""
    counts: dict[str, int] = {}
    selected = []
    for image in iter_images(root, split):
        if limit_per_class is not None and counts.get(image.label, 0) >= limit_per_class:
            continue
        counts[image.label] = counts.get(image.label, 0) + 1
        selected.append(image)
    return selected


def load_split(root: Path, split: str, classes: list[str], *, limit_per_class: int | None,
               preprocessing: Preprocessing, cache_dir: Path | None = None,
               quiet: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`select_images` decoded into `(N, S, S, 3)` uint8 (S = `preprocessing.image_size`) and `(N,)`
    class indices into `classes`, cached under `cache_dir` per root, split, limit, size and filter.

    >>> images, labels = load_split(root, "test", bundle.classes, limit_per_class=20,
    ...                             preprocessing=bundle.preprocessing)
    """
    size, resample = preprocessing.image_size, preprocessing.resize
    cache = None
    if cache_dir is not None:
        key = f"{root.resolve()}|{split}|{limit_per_class}"
        if (size, resample) != (IMAGE_SIZE, RESAMPLE):  # caches written before both were the bundle's stay valid
            key += f"|{size}|{resample}"
        cache = cache_dir / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
        if cache.exists():
            with np.load(cache, allow_pickle=False) as data:
                return data["images"], data["labels"]
    selected = select_images(root, split, limit_per_class=limit_per_class)
    files = [root / image.path for image in selected]

    def decode(path: Path) -> np.ndarray:
        return decode_image(path.read_bytes(), size=size, resample=resample)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images = list(tqdm(pool.map(decode, files, chunksize=256), total=len(files), desc=f"decode {split}",
                           unit="img", leave=False, disable=quiet))
    array = np.stack(images)
    labels = np.asarray([classes.index(image.label) for image in selected], dtype=np.int64)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=array, labels=labels)
    return array, labels
