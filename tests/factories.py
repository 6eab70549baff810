"""Builders of test data, once for every test: unit vectors and image documents, the brute-force answer to a
store query, CIFAR-10 subsets, copies of a model bundle edited or damaged on purpose.

Imported by name (`from factories import make_documents`) from any test folder, and light on purpose
(numpy and services.common only) so that a subprocess a test starts can import it as well.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.common.documents import ImageDocument
from services.common.stores.base import StoreQuery

DIMS = 16
MODEL_VERSION = "v1"
SOURCE = "/collections/test"
LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def unit_vectors(count: int, dims: int = DIMS, *, seed: int = 0) -> np.ndarray:
    """`count` random float32 vectors of norm 1, the same for the same `seed`."""
    vectors = np.random.default_rng(seed).normal(size=(count, dims)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def make_document(id: str, vector: np.ndarray, *, model_version: str = MODEL_VERSION, **fields: Any) -> ImageDocument:
    """One document with plain defaults for every field not given (a cat from `SOURCE`)."""
    values: dict[str, Any] = {"filename": f"{id}.jpg", "path": f"train/cat/{id}.jpg", "source": SOURCE,
                              "label": "cat", "predicted_label": "cat", "confidence": 0.9, "size": 1, "mtime": 0.0}
    return ImageDocument(id=id, vector=vector, model_version=model_version, **(values | fields))


def make_documents(count: int, *, dims: int = DIMS, seed: int = 0, model_version: str = MODEL_VERSION,
                   prefix: str = "doc", labels: tuple[str | None, ...] = LABELS, source: str = SOURCE,
                   predicted: tuple[str, ...] | None = None) -> list[ImageDocument]:
    """`count` documents with `unit_vectors(count, dims, seed=seed)`: document i is `{prefix}-000i`, from
    `source`, labelled `labels[i % len(labels)]` (None: unlabelled), predicted `predicted[i % ...]` (default:
    its label, else "cat"), stored at `train/{label}/000i.jpg`, i bytes big and modified at time i."""
    documents = []
    for i, vector in enumerate(unit_vectors(count, dims, seed=seed)):
        label = labels[i % len(labels)]
        predicted_label = predicted[i % len(predicted)] if predicted else (label or "cat")
        documents.append(ImageDocument(id=f"{prefix}-{i:04d}", filename=f"{i:04d}.jpg",
                                       path=f"train/{label}/{i:04d}.jpg", source=source, label=label,
                                       predicted_label=predicted_label, confidence=0.5 + (i % 5) / 10, size=i,
                                       mtime=float(i), model_version=model_version, vector=vector))
    return documents


def brute_force(documents: list[ImageDocument], query: StoreQuery) -> list[str]:
    """The ids a store's `search_many` should answer `query` with: the documents passing its filters (labels,
    predicted labels, excluded ids), ranked by exact inner product, the page from `offset` to `offset + k`."""
    allowed = [d for d in documents if (query.labels is None or d.label in query.labels)
               and (query.predicted_labels is None or d.predicted_label in query.predicted_labels)
               and d.id not in query.exclude_ids]  # fmt: skip
    ranked = sorted(allowed, key=lambda d: -float(np.dot(d.vector, query.vector)))
    return [d.id for d in ranked[query.offset:query.offset + query.k]]


def copy_collection(source: Path, target: Path, **per_class: int) -> Path:
    """The first `per_class[split]` images of every class of each named split of `source` (a CIFAR-10
    style `split/class/image` tree), copied to `target`: `copy_collection(cifar, root, train=50, test=5)`."""
    for split, count in per_class.items():
        for class_dir in sorted((source / split).iterdir()):
            destination = target / split / class_dir.name
            destination.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copyfile(image, destination / image.name)
    return target


def copy_bundle(source: Path, target: Path, edit: Callable[[dict[str, Any]], object] | None = None) -> Path:
    """A copy of the bundle at `source`, its bundle.json changed in place by `edit(metadata)` if given."""
    shutil.copytree(source, target)
    if edit is not None:
        metadata = json.loads((target / "bundle.json").read_text())
        edit(metadata)
        (target / "bundle.json").write_text(json.dumps(metadata))
    return target


BUNDLE_DAMAGES = ("missing-dir", "missing-metadata", "bad-json", "truncated-header", "truncated-weights",
                  "missing-pca", "architecture-dims", "architecture-garbage")


def damage_bundle(bundle: Path, damage: str) -> None:
    """Break the bundle at `bundle` in one of the `BUNDLE_DAMAGES` ways."""
    if damage == "missing-dir":
        shutil.rmtree(bundle)
    elif damage == "missing-metadata":
        (bundle / "bundle.json").unlink()
    elif damage == "bad-json":
        (bundle / "bundle.json").write_text("{not json")
    elif damage in ("truncated-header", "truncated-weights"):  # cut inside the safetensors header, or the tensors
        weights = bundle / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[:1000] if damage == "truncated-header" else data[: len(data) // 2])
    elif damage == "missing-pca":
        (bundle / "pca.safetensors").unlink()
    elif damage in ("architecture-dims", "architecture-garbage"):
        metadata = json.loads((bundle / "bundle.json").read_text())
        metadata["architecture"]["embedding_dim"] = 128 if damage == "architecture-dims" else "wide"
        (bundle / "bundle.json").write_text(json.dumps(metadata))
    else:
        raise ValueError(f"damage {damage!r} is not one of: {', '.join(BUNDLE_DAMAGES)}")
