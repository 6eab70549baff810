"""The end of `cbir train`: measure the trained network, fit the PCA, write the bundle."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services.embedder.bundle import BundleSpec, save_bundle
from services.embedder.inference import Preprocessing, predict
from services.embedder.vectors import PcaProjection

logger = logging.getLogger("cbir.train")


def write_bundle(
    output: Path,
    *,
    model: nn.Module,
    device: torch.device,
    classes: list[str],
    architecture: dict[str, Any],
    preprocessing: Preprocessing,
    train_images: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    pca_components: int,
    pca_dims: int,
    onehot_weight: float,
    training: dict[str, Any],
    bf16: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Write `model` as a bundle to `output`; returns its version and test metrics.

    The test accuracy is measured with and without flip TTA; the PCA is fitted (seeded) on the train
    embeddings as the embedder makes them (with the bundle's flip TTA). `training` is the recipe
    record (`training_record`); the vector defaults are `pca_dims` (capped by the PCA) and `onehot_weight`.
    """
    def measure(images: np.ndarray, flip_tta: bool) -> tuple[np.ndarray, np.ndarray]:
        return predict(model, images, preprocessing=preprocessing, device=device, flip_tta=flip_tta, bf16=bf16)

    _, plain = measure(test_images, False)
    _, flipped = measure(test_images, True)
    train_embeddings, _ = measure(train_images, preprocessing.flip_tta)
    projection = PcaProjection.fit(train_embeddings, dims=pca_components, seed=seed)
    metrics = {
        "test_accuracy": round(float((plain.argmax(1) == test_labels).mean()), 4),
        "test_accuracy_flip_tta": round(float((flipped.argmax(1) == test_labels).mean()), 4),
        "train_images": int(len(train_images)),
        "test_images": int(len(test_images)),
    }
    spec = BundleSpec(classes=classes, architecture=architecture, preprocessing=preprocessing,
                      vector={"pca_dims": min(pca_dims, projection.max_dims), "onehot_weight": onehot_weight},
                      training=training, metrics=metrics)
    version = save_bundle(output, model.cpu(), projection, spec)
    logger.info("wrote bundle %s to %s: %s", version, output, json.dumps(metrics))
    return {"version": version, **metrics}


def training_record(*, command: str, recipe: dict[str, Any], history: list[dict[str, Any]],
                    replans: Sequence[dict[str, int]] = (), init_bundle: Path | None = None,
                    teachers: Sequence[Path] = ()) -> dict[str, Any]:
    """The `training` object of `bundle.json`: the command and recipe, every epoch's record, the
    resumes that re-planned the schedule, and the bundles it started from or distilled."""
    record: dict[str, Any] = {"command": command, "recipe": recipe, "history": history}
    if replans:
        record["replans"] = list(replans)
    if init_bundle is not None:
        record["parent"] = parent_record(init_bundle)
    if teachers:
        record["teachers"] = [parent_record(teacher) for teacher in teachers]
    return record


def parent_record(directory: Path) -> dict[str, Any]:
    """What a bundle continued with `--init-bundle` started from: the parent's version, command, epochs and
    metrics, and its own parent in turn, so the metadata tells the whole recipe."""
    metadata = json.loads((Path(directory) / "bundle.json").read_text())
    training = metadata.get("training", {})
    record = {"version": metadata["version"], "command": training.get("command"),
              "epochs": len(training.get("history", [])), "metrics": metadata.get("metrics")}
    return {**record, "parent": training["parent"]} if "parent" in training else record
