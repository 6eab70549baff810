"""The collection decoded once and embedded once: what every evaluation mode and ablation reuses.

Images go through the service's own decoder (`load_split` → `decode_image`, at the bundle's size and
resample filter) and the service's own forward pass (`predict`, bf16, the bundle's normalisation and
flip-TTA, chunks of the embedder's batch size), so the vectors built from them match those the
indexer stores.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.common.collection import list_classes
from services.common.embedding import Purpose
from services.common.settings import ModelSettings
from services.embedder.bundle import Bundle
from services.embedder.inference import Preprocessing, pick_device, predict
from services.embedder.vectors import PcaProjection, build_vectors
from services.training.data import load_split, select_images

logger = logging.getLogger(__name__)

# The embedder's default micro-batch: the same chunking as the indexer, hence the same numerics.
EMBED_BATCH = ModelSettings.model_fields["max_batch"].default


@dataclass
class Split:
    """One split of the collection: files, true classes and decoded images, in a stable order."""

    name: str
    paths: list[str]  # relative to the collection root, as the store records them
    labels: np.ndarray  # (N,) class index into `classes`
    images: np.ndarray  # (N, S, S, 3) uint8, S the bundle's image_size
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Features:
    """The model's raw output for a split: hidden-layer embeddings and class probabilities."""

    embeddings: np.ndarray  # (N, E) float32
    probabilities: np.ndarray  # (N, C) float32

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


def check_classes(root: Path, classes: list[str]) -> None:
    """The collection must have exactly the classes the model predicts, in the same order."""
    found = list_classes(root, "train")
    if found != classes:
        raise ValueError(f"the collection at {root} has classes {found}; the model predicts {classes}")


def load_collection_split(root: Path, split: str, classes: list[str], *, preprocessing: Preprocessing,
                          cache_dir: Path, limit_per_class: int | None = None) -> Split:
    """Decode `root/split` as `preprocessing` (the bundle's) says, cached as `.npz` under `cache_dir`,
    and list its files in the same order."""
    images, labels = load_split(root, split, classes, limit_per_class=limit_per_class, preprocessing=preprocessing,
                                cache_dir=cache_dir)
    paths = [image.path for image in select_images(root, split, limit_per_class=limit_per_class)]
    if len(paths) != len(labels):
        raise ValueError(f"{root}/{split} changed since it was cached in {cache_dir}; delete the cache")
    return Split(name=split, paths=paths, labels=labels, images=images, classes=classes)


def embed_split(bundle: Bundle, split: Split, *, purpose: Purpose, cache_dir: Path,
                device: str = "auto") -> Features:
    """Embeddings and probabilities of every image of `split` with the bundle's views for `purpose` (the
    indexed train split: "index"; the queries: "query"), cached per bundle version, views and split."""
    flip_tta = bundle.preprocessing.flip_for(purpose)
    key = f"{bundle.version}|{flip_tta}|{split.name}|{'|'.join(split.paths)}".encode()
    cache = cache_dir / f"features-{split.name}-{hashlib.sha1(key).hexdigest()[:12]}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            logger.info("%s features of %d images from %s", split.name, len(split), cache)
            return Features(embeddings=data["embeddings"], probabilities=data["probabilities"])
    logger.info("embedding %d %s images (flip TTA %s)", len(split), split.name, "on" if flip_tta else "off")
    if bundle.family == "bovw":  # descriptors and classifier, in the embedder's chunks
        parts = [bundle.model.predict(split.images[start:start + EMBED_BATCH])
                 for start in range(0, len(split), EMBED_BATCH)]
        embeddings, probabilities = (np.concatenate([part[i] for part in parts]) for i in (0, 1))
    else:
        target = pick_device(device)
        model = bundle.model.to(target, memory_format=torch.channels_last)  # as the Embedder holds it
        embeddings, probabilities = predict(model, split.images, preprocessing=bundle.preprocessing, device=target,
                                            flip_tta=flip_tta, bf16=True, batch_size=EMBED_BATCH)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, embeddings=embeddings, probabilities=probabilities)
    return Features(embeddings=embeddings, probabilities=probabilities)


def identity_projection(dims: int) -> PcaProjection:
    """A 'PCA' that keeps the raw embedding, so raw vectors go through the one vector builder too."""
    return PcaProjection(mean=np.zeros(dims, dtype=np.float32), components=np.eye(dims, dtype=np.float32))


def fuse(bundle: Bundle, features: Features, *, pca_dims: int | None, onehot_weight: float,
         projection: PcaProjection | None = None) -> np.ndarray:
    """Search vectors exactly as the embedder builds them (`pca_dims=None`: the raw embedding)."""
    if pca_dims is None:
        projection, pca_dims = identity_projection(features.embeddings.shape[1]), features.embeddings.shape[1]
    return build_vectors(features.embeddings, features.predicted, projection=projection or bundle.projection,
                         pca_dims=pca_dims, onehot_weight=onehot_weight, num_classes=len(bundle.classes))
