"""The model bundle: one directory holding everything needed to turn images into vectors.

    bundle.json        metadata: format, family, version id, classes, architecture, preprocessing
                       (`Preprocessing`), vector defaults, training recipe, test metrics
    pca.safetensors    PCA mean and components (plain arrays, no pickles)

and by `family` (format 1 bundles, which lack it, are "deep"):

    deep   model.safetensors   network weights (fp16) of `architecture` (a name of `model.BACKBONES`
                               and its options)
    bovw   bovw.safetensors    the Bag-of-Visual-Words model's vocabulary and standardisation
           classifier.skops    its scikit-learn classifier (skops.io: no pickle; only the types in
                               `TRUSTED_TYPES` beyond skops's own defaults are loaded)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from services.common.errors import BundleError
from services.embedder.bovw import BovwModel, check_features
from services.embedder.inference import Preprocessing
from services.embedder.model import backbone, build_model
from services.embedder.vectors import PcaProjection, check_vector_config

FORMAT = 2  # 2 added `family`; format 1 bundles (the shipped one among them) still load, as "deep"
READ_FORMATS = (1, 2)
FAMILIES = ("deep", "bovw")
METADATA_FILE, WEIGHTS_FILE, PCA_FILE = "bundle.json", "model.safetensors", "pca.safetensors"
BOVW_FILE, CLASSIFIER_FILE = "bovw.safetensors", "classifier.skops"
# What a BOVW classifier may hold beyond the types skops trusts by default (a random forest's trees).
TRUSTED_TYPES = ("sklearn.tree._tree.Tree",)
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parents[2] / "models" / "vgg16-cifar10"
_HOW_TO_GET_ONE = "train one with `cbir train --output DIR` and point CBIR_MODEL_DIR at it"


@dataclass
class Bundle:
    """A loaded bundle: the model (a network in eval mode, or a `BovwModel`), its PCA, how it wants its
    images, and its metadata."""

    path: Path
    metadata: dict[str, Any]
    model: torch.nn.Module | BovwModel
    projection: PcaProjection
    preprocessing: Preprocessing

    @property
    def family(self) -> str:
        """"deep" (`model` is a torch network) or "bovw" (`model` is a `BovwModel`)."""
        return self.metadata.get("family", "deep")

    @property
    def version(self) -> str:
        return self.metadata["version"]

    @property
    def classes(self) -> list[str]:
        return self.metadata["classes"]

    @property
    def vector_defaults(self) -> dict[str, Any]:
        return self.metadata["vector"]


@dataclass
class BundleSpec:
    """What `cbir train` hands to `save_bundle`."""

    classes: list[str]
    architecture: dict[str, Any]
    preprocessing: Preprocessing
    vector: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def save_bundle(directory: Path, model: torch.nn.Module, projection: PcaProjection, spec: BundleSpec) -> str:
    """Write a deep bundle atomically (a temporary sibling directory renamed into place); returns its version."""
    def write(staging: Path) -> list[str]:
        weights = {name: t.detach().to("cpu", torch.float16 if t.is_floating_point() else t.dtype).contiguous()
                   for name, t in model.state_dict().items()}
        save_torch(weights, str(staging / WEIGHTS_FILE))
        return [WEIGHTS_FILE]

    return _write_bundle(directory, "deep", backbone(spec.architecture["name"]).version_prefix, write, projection,
                         spec)


def save_bovw_bundle(directory: Path, model: BovwModel, projection: PcaProjection, spec: BundleSpec) -> str:
    """Write a BOVW bundle atomically; returns its version (`bovw-<features>-<classes>c-<digest>`)."""
    def write(staging: Path) -> list[str]:
        arrays = {"mean": model.mean, "scale": model.scale}
        if model.vocabulary is not None:
            arrays["vocabulary"] = model.vocabulary
        save_numpy({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, str(staging / BOVW_FILE))
        import skops.io  # scikit-learn behind it takes seconds to import: only BOVW bundles need it

        skops.io.dump(model.classifier, staging / CLASSIFIER_FILE)
        return [BOVW_FILE, CLASSIFIER_FILE]

    return _write_bundle(directory, "bovw", "bovw-" + "-".join(model.features), write, projection, spec)


def _write_bundle(directory: Path, family: str, prefix: str, write_model: Any, projection: PcaProjection,
                  spec: BundleSpec) -> str:
    """Stage the family's files (`write_model(staging)` names them), the PCA and bundle.json, then rename
    the staging directory into place; the version hashes the model and PCA files."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    staging.chmod(0o755)  # readable by the services' non-root users
    try:
        files = write_model(staging)
        save_numpy({"mean": np.ascontiguousarray(projection.mean, dtype=np.float32),
                    "components": np.ascontiguousarray(projection.components, dtype=np.float32)},
                   str(staging / PCA_FILE))
        digest = hashlib.sha256()
        for name in (*files, PCA_FILE):
            digest.update((staging / name).read_bytes())
        version = f"{prefix}-{len(spec.classes)}c-{digest.hexdigest()[:12]}"
        metadata = {
            "format": FORMAT,
            "family": family,
            "version": version,
            "classes": spec.classes,
            "architecture": spec.architecture,
            "preprocessing": spec.preprocessing.to_metadata(),
            "vector": spec.vector,
            "training": spec.training,
            "metrics": spec.metrics,
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        for path in staging.iterdir():
            path.chmod(0o644)
        if directory.exists():
            backup = directory.with_name(directory.name + ".old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(directory, backup)
            os.replace(staging, directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, directory)
        return version
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_bundle(directory: Path) -> Bundle:
    """Load and validate a bundle; `BundleError` says what is wrong and how to get a good one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"no model bundle at {directory}; {_HOW_TO_GET_ONE}")
    metadata = _read_metadata(directory)
    num_classes = len(metadata["classes"])
    try:
        arrays = load_numpy(str(directory / PCA_FILE))
    except (OSError, SafetensorError) as exc:
        raise BundleError(f"the model bundle at {directory} is corrupt ({exc}); {_HOW_TO_GET_ONE}") from exc
    if metadata.get("family", "deep") == "deep":
        model = _load_network(directory, metadata)
        model.eval()
        input_dims = model.classifier.in_features
    else:
        model = _load_bovw(directory, metadata)
        input_dims = model.dims
    try:
        projection = PcaProjection(mean=arrays["mean"], components=arrays["components"])
        if projection.components.shape[1] != input_dims or projection.mean.shape != (
            projection.components.shape[1],
        ):
            raise ValueError(f"PCA shapes {projection.mean.shape}, {projection.components.shape}")
        check_vector_config(
            pca_dims=int(metadata["vector"]["pca_dims"]),
            num_classes=num_classes,
            max_pca_dims=projection.max_dims,
        )
    except (KeyError, ValueError) as exc:
        raise BundleError(f"the PCA in {directory} does not fit the model: {exc}; {_HOW_TO_GET_ONE}") from exc
    try:
        preprocessing = Preprocessing.from_metadata(metadata["preprocessing"])
    except (AttributeError, TypeError, ValueError) as exc:
        raise BundleError(f"the preprocessing in {directory / METADATA_FILE} is invalid: {exc}; "
                          f"{_HOW_TO_GET_ONE}") from exc
    return Bundle(path=directory, metadata=metadata, model=model, projection=projection, preprocessing=preprocessing)


def _load_network(directory: Path, metadata: dict[str, Any]) -> torch.nn.Module:
    try:
        weights = load_torch(str(directory / WEIGHTS_FILE))
    except (OSError, SafetensorError) as exc:
        raise BundleError(f"the model bundle at {directory} is corrupt ({exc}); {_HOW_TO_GET_ONE}") from exc
    try:
        model = build_model(metadata["architecture"], len(metadata["classes"]))
        model.load_state_dict({name: t.float() if t.is_floating_point() else t for name, t in weights.items()})
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(
            f"the weights in {directory} do not match the architecture in its {METADATA_FILE} "
            f"({first_line}); {_HOW_TO_GET_ONE}"
        ) from exc
    return model


def _load_bovw(directory: Path, metadata: dict[str, Any]) -> BovwModel:
    import skops.io  # scikit-learn behind it takes seconds to import: a deep bundle's loader (cbir index) never does

    path = directory / CLASSIFIER_FILE
    try:
        arrays = load_numpy(str(directory / BOVW_FILE))
        untrusted = [name for name in skops.io.get_untrusted_types(file=path) if name not in TRUSTED_TYPES]
        if untrusted:
            raise BundleError(f"{path} holds types this cbir does not load: {', '.join(untrusted)}; "
                              f"{_HOW_TO_GET_ONE}")
        classifier = skops.io.load(path, trusted=list(TRUSTED_TYPES))
    except BundleError:
        raise
    except Exception as exc:  # skops and safetensors raise many kinds for a damaged file
        raise BundleError(f"the model bundle at {directory} is corrupt ({type(exc).__name__}: {exc}); "
                          f"{_HOW_TO_GET_ONE}") from exc
    try:
        features = check_features(metadata["architecture"]["features"])
        model = BovwModel(features=features, vocabulary=arrays.get("vocabulary"), mean=arrays["mean"],
                          scale=arrays["scale"], classifier=classifier)
        if ("sift" in features) != (model.vocabulary is not None) or model.mean.shape != model.scale.shape:
            raise ValueError("its vocabulary or standardisation does not fit its feature set")
        if len(getattr(classifier, "classes_", ())) != len(metadata["classes"]):
            raise ValueError(f"its classifier knows {len(getattr(classifier, 'classes_', ()))} classes")
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"the BOVW model in {directory} is invalid: {exc}; {_HOW_TO_GET_ONE}") from exc
    return model


def _read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{path} is missing; {_HOW_TO_GET_ONE}") from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); {_HOW_TO_GET_ONE}") from exc
    required = ("format", "version", "classes", "architecture", "preprocessing", "vector")
    missing = [key for key in required if key not in metadata]
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing)}; {_HOW_TO_GET_ONE}")
    if metadata["format"] not in READ_FORMATS:
        raise BundleError(f"{path} has format {metadata['format']}; this cbir reads formats "
                          f"{', '.join(map(str, READ_FORMATS))}")
    if metadata.get("family", "deep") not in FAMILIES:
        raise BundleError(f"{path} has family {metadata['family']!r}; this cbir runs {', '.join(FAMILIES)}")
    return metadata
