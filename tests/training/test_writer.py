"""The end of `cbir train` (services/training/writer.py): the bundle it writes reads back with the network,
the PCA fitted on the embedder's views, the test metrics and the recorded recipe; and the `training` record
names the bundles a run started from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.common.collection import list_classes
from services.embedder.bundle import Bundle, load_bundle
from services.embedder.inference import predict
from services.embedder.vectors import PcaProjection
from services.training.data import load_split
from services.training.writer import parent_record, training_record, write_bundle

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits(mini_collection: Path, tiny_bundle: Bundle) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """5 train and 2 test images a class, decoded as the tiny bundle says."""
    classes = list_classes(mini_collection, "train")
    return {split: load_split(mini_collection, split, classes, limit_per_class=limit,
                              preprocessing=tiny_bundle.preprocessing, quiet=True)
            for split, limit in (("train", 5), ("test", 2))}


@dataclass
class Written:
    source: Bundle  # the tiny bundle whose network was written
    training: dict[str, Any]
    result: dict[str, Any]
    directory: Path


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, tiny_bundle_dir: Path,
            splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Written:
    """The tiny bundle's network written again, with a PCA of 8 components and a recipe of its own."""
    source = load_bundle(tiny_bundle_dir)  # a copy of its own: writing moves the network to the CPU
    (train_images, _), (test_images, test_labels) = splits["train"], splits["test"]
    training = training_record(command="cbir train --epochs 1", recipe={"epochs": 1, "output": "x"},
                               history=[{"epoch": 1, "loss": 2.0}])
    directory = tmp_path_factory.mktemp("written") / "bundle"
    result = write_bundle(directory, model=source.model, device=CPU, classes=source.classes,
                          architecture=source.metadata["architecture"], preprocessing=source.preprocessing,
                          train_images=train_images, test_images=test_images, test_labels=test_labels,
                          pca_components=8, pca_dims=16, onehot_weight=1.5, training=training, seed=3)
    return Written(source=source, training=training, result=result, directory=directory)


def test_the_bundle_it_writes_reads_back_with_the_network_metrics_and_recipe(
        written: Written, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    source, model, pre = written.source, written.source.model, written.source.preprocessing
    bundle = load_bundle(written.directory)
    assert written.result["version"] == bundle.version and bundle.version.startswith("vgg16-10c-")
    assert bundle.classes == source.classes and bundle.preprocessing == pre
    assert bundle.metadata["architecture"] == source.metadata["architecture"]
    assert bundle.metadata["training"] == written.training
    assert bundle.vector_defaults == {"pca_dims": 8, "onehot_weight": 1.5}  # pca_dims capped by the PCA kept
    assert bundle.projection.components.shape == (8, source.metadata["architecture"]["embedding_dim"])

    # The metrics: test accuracy of the plain and the mirrored views, on the images given.
    test_images, test_labels = splits["test"]
    _, plain = predict(model, test_images, preprocessing=pre, device=CPU, flip_tta=False)
    _, flipped = predict(model, test_images, preprocessing=pre, device=CPU, flip_tta=True)
    assert bundle.metadata["metrics"] == {
        "test_accuracy": round(float(np.mean(plain.argmax(1) == test_labels)), 4),
        "test_accuracy_flip_tta": round(float(np.mean(flipped.argmax(1) == test_labels)), 4),
        "train_images": 50, "test_images": 20}
    assert {k: v for k, v in written.result.items() if k != "version"} == bundle.metadata["metrics"]

    # The network itself, stored in float16.
    for name, tensor in model.state_dict().items():
        stored = bundle.model.state_dict()[name]
        assert torch.equal(stored, tensor.half().to(stored.dtype) if tensor.is_floating_point() else tensor), name


def test_the_pca_read_back_is_the_one_fitted_on_the_train_images_as_the_embedder_embeds_them(
        written: Written, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    model, pre = written.source.model, written.source.preprocessing
    embeddings, _ = predict(model, splits["train"][0], preprocessing=pre, device=CPU, flip_tta=pre.flip_tta)
    expected = PcaProjection.fit(embeddings, dims=8, seed=3)
    projection = load_bundle(written.directory).projection
    np.testing.assert_allclose(projection.mean, expected.mean, atol=1e-5)
    np.testing.assert_allclose(projection.components, expected.components, atol=1e-5)


def test_the_training_record_names_only_what_the_run_had() -> None:
    record = training_record(command="cbir train", recipe={"epochs": 2}, history=[{"epoch": 1}, {"epoch": 2}])
    assert record == {"command": "cbir train", "recipe": {"epochs": 2}, "history": [{"epoch": 1}, {"epoch": 2}]}
    replanned = training_record(command="cbir train", recipe={}, history=[],
                                replans=({"after_epoch": 2, "planned_epochs": 2, "epochs": 3},))
    assert replanned["replans"] == [{"after_epoch": 2, "planned_epochs": 2, "epochs": 3}]


def test_a_run_from_another_bundle_records_its_parents_all_the_way_up(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    tiny = json.loads((tiny_bundle_dir / "bundle.json").read_text())
    parent = parent_record(tiny_bundle_dir)
    assert parent == {"version": tiny["version"], "command": tiny["training"]["command"],
                      "epochs": len(tiny["training"]["history"]), "metrics": tiny["metrics"]}
    assert parent["command"].startswith("cbir train ") and parent["epochs"] == 10

    record = training_record(command="cbir train --init-bundle tiny", recipe={}, history=[{"epoch": 1}],
                             init_bundle=tiny_bundle_dir, teachers=(tiny_bundle_dir, tiny_bundle_dir))
    assert record["parent"] == parent and record["teachers"] == [parent, parent]

    child = tmp_path / "child"
    child.mkdir()
    (child / "bundle.json").write_text(json.dumps({"version": "vgg16-10c-child", "metrics": {"test_accuracy": 0.5},
                                                   "training": record}))
    assert parent_record(child) == {"version": "vgg16-10c-child", "command": "cbir train --init-bundle tiny",
                                    "epochs": 1, "metrics": {"test_accuracy": 0.5}, "parent": parent}
