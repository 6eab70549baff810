"""`cbir train-bovw`: the original study's Bag-of-Visual-Words system, trained and written as a bundle.

    1. decode the collection (the service's decoder) and compute GCH, HOG and dense SIFT once
    2. vocabulary sweep: MiniBatchKMeans with each of --vocabulary-sizes words on SIFT descriptors of
       the grid subset, scored by the Davies-Bouldin index (lower is better); the lowest is kept
    3. every feature set (GCH, HOG, SIFT and the early fusions HOG+GCH, HOG+SIFT, HOG+GCH+SIFT) x
       every classifier (Gaussian NB, logistic regression, kNN, linear SVM, random forest): a grid
       search with stratified 5-fold CV on --grid-images train images (the grids in `GRIDS`), then
       the best parameters refitted on the whole train split and measured on train and test
    4. the bundle serves the pair with the best CV accuracy (or --serve): its standardised fused
       descriptors (through a PCA that keeps every component) and predicted one-hot are the search
       vector, as for the deep models

Every measurement goes into the bundle's `training` record and `--results` (a JSON `cbir compare`
reads).

>>> from services.training.bovw import get_args_parser, train_bovw
>>> train_bovw(get_args_parser().parse_args(["--output", "models/comparison/bovw"]))["version"]
'bovw-hog-sift-10c-…'
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin, clone
from sklearn.cluster import MiniBatchKMeans
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import accuracy_score, davies_bouldin_score, precision_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier

from services.common.collection import find_data_dir, list_classes
from services.common.errors import TrainingError
from services.embedder.bovw import (
    FEATURES,
    GCH_BINS,
    HOG_OPTIONS,
    SIFT_SIZE,
    SIFT_STEP,
    BovwModel,
    Descriptors,
    check_features,
    class_probabilities,
    detected_keypoints,
    gray,
)
from services.embedder.bundle import BundleSpec, save_bovw_bundle
from services.embedder.inference import Preprocessing
from services.embedder.vectors import PcaProjection
from services.training.cli import jsonable, recorded_command
from services.training.data import load_split
from services.training.settings import TrainingSettings

logger = logging.getLogger("cbir.train")

FEATURE_SETS = ("gch", "hog", "sift", "hog+gch", "hog+sift", "hog+gch+sift")
VOCABULARY_SIZES = tuple(range(100, 1001, 100))
# The study's five classifiers and the bounded grids searched for each (bounded for a 2-core CPU).
CLASSIFIERS: dict[str, tuple[str, ClassifierMixin, dict[str, list[Any]]]] = {
    "gnb": ("Gaussian NB", GaussianNB(), {"var_smoothing": [1e-9, 1e-6, 1e-3]}),
    "logreg": ("logistic regression", LogisticRegression(max_iter=300), {"C": [0.01, 0.1, 1.0]}),
    "knn": ("kNN", KNeighborsClassifier(algorithm="brute"), {"n_neighbors": [5, 10, 20]}),
    # A linear SVM by stochastic gradient descent on the hinge loss: liblinear's LinearSVC took over ten
    # minutes for one grid search on 1,000 visual words here (2026-12-01), SGD seconds.
    "linsvm": ("linear SVM", SGDClassifier(loss="hinge", max_iter=50, tol=1e-3), {"alpha": [1e-4, 1e-3, 1e-2]}),
    "rf": ("random forest", RandomForestClassifier(n_estimators=100, n_jobs=-1),
           {"max_depth": [16, None]}),
}
GRIDS = {name: grid for name, (_, _, grid) in CLASSIFIERS.items()}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir train-bovw", add_help=add_help,
                                     description="Train the study's Bag-of-Visual-Words model and write its bundle")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="collection root with train/ and test/ (default: CBIR_DATA_DIR, else data/cifar10, "
                        "else ../shared/cifar10)")
    parser.add_argument("--output", type=Path, default=Path("models/comparison/bovw"), help="bundle directory")
    parser.add_argument("--results", type=Path, default=None,
                        help="also write every measurement to this JSON (cbir compare reads it)")
    parser.add_argument("--cache-dir", type=Path, default=Path("state/bovw"),
                        help="decoded images and descriptors are cached here")
    parser.add_argument("--feature-sets", default=",".join(FEATURE_SETS),
                        help="comma-separated feature sets, each of gch, hog, sift joined by '+'")
    parser.add_argument("--classifiers", default=",".join(CLASSIFIERS),
                        help=f"comma-separated classifiers of: {', '.join(CLASSIFIERS)}")
    parser.add_argument("--vocabulary-sizes", default=",".join(map(str, VOCABULARY_SIZES)),
                        help="visual vocabulary sizes the sweep tries (the study: 100 to 1,000)")
    parser.add_argument("--vocabulary-size", type=int, default=None,
                        help="use this vocabulary size instead of the sweep's choice (still sweeps the others)")
    parser.add_argument("--kmeans-descriptors", type=int, default=100_000,
                        help="SIFT descriptors (sampled from the grid subset) each k-means is fitted on")
    parser.add_argument("--db-descriptors", type=int, default=20_000,
                        help="descriptors the Davies-Bouldin index is computed on")
    parser.add_argument("--grid-images", type=int, default=10_000,
                        help="train images (stratified sample) of the grid searches; the best is refitted on all")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds of the grid searches")
    parser.add_argument("--jobs", type=int, default=2, help="grid-search fits run in parallel (processes)")
    parser.add_argument("--serve", default=None, metavar="FEATURES:CLASSIFIER",
                        help="the pair the bundle serves, e.g. hog+sift:logreg (default: best CV accuracy)")
    parser.add_argument("--onehot-weight", type=float, default=2.0,
                        help="weight of the predicted-class one-hot in the search vector (as the deep bundles)")
    parser.add_argument("--limit-per-class", type=int, default=None, help="at most this many train images per class")
    parser.add_argument("--test-limit-per-class", type=int, default=None,
                        help="at most this many test images per class")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


@dataclass
class SplitDescriptors:
    images: np.ndarray  # (N, S, S, 3) uint8, decoded once
    labels: np.ndarray
    descriptors: Descriptors


# What a cell fitted, to serve it: its features, the standardisation's mean and scale, the classifier.
Fitted = tuple[tuple[str, ...], np.ndarray, np.ndarray, ClassifierMixin]


def parse_feature_set(text: str) -> tuple[str, ...]:
    try:
        return check_features(text.split("+"))
    except ValueError as exc:
        raise TrainingError(f"--feature-sets: {exc}") from None


def feature_set_name(features: tuple[str, ...]) -> str:
    """The study's way of naming a fusion: HOG first ("hog+gch+sift")."""
    return "+".join(sorted(features, key=lambda f: (f != "hog", FEATURES.index(f))))


def check_options(args: argparse.Namespace) -> tuple[list[tuple[str, ...]], list[str], list[int]]:
    """The feature sets, classifiers and vocabulary sizes asked for; `TrainingError` names a bad one."""
    feature_sets = [parse_feature_set(text) for text in args.feature_sets.split(",") if text]
    classifiers = [name for name in args.classifiers.split(",") if name]
    unknown = [name for name in classifiers if name not in CLASSIFIERS]
    if unknown or not classifiers or not feature_sets:
        raise TrainingError(f"--classifiers {args.classifiers!r}: name some of {', '.join(CLASSIFIERS)}"
                            if unknown or not classifiers else "--feature-sets: name at least one")
    try:
        sizes = sorted({int(size) for size in args.vocabulary_sizes.split(",") if size})
    except ValueError:
        raise TrainingError(f"--vocabulary-sizes {args.vocabulary_sizes!r}: comma-separated integers") from None
    if not sizes or min(sizes) < 2 or (args.vocabulary_size is not None and args.vocabulary_size < 2):
        raise TrainingError("--vocabulary-sizes and --vocabulary-size need at least 2 words")
    if args.folds < 2 or args.grid_images < args.folds * 2:
        raise TrainingError("--folds must be at least 2 and --grid-images at least twice --folds")
    if args.serve is not None:
        features, _, classifier = args.serve.partition(":")
        if classifier not in classifiers or feature_set_name(parse_feature_set(features)) not in {
                feature_set_name(f) for f in feature_sets}:
            raise TrainingError(f"--serve {args.serve!r}: a FEATURES:CLASSIFIER pair of the ones trained")
    return feature_sets, classifiers, sizes


def train_bovw(args: argparse.Namespace, *, settings: TrainingSettings | None = None) -> dict[str, Any]:
    """Run the steps of the module's docstring; returns the bundle's version and its metrics."""
    feature_sets, classifiers, sizes = check_options(args)
    settings = settings or TrainingSettings.load()
    started = time.perf_counter()
    root = find_data_dir(args.data_dir or settings.data_dir)
    classes = list_classes(root, "train")
    preprocessing = Preprocessing(flip_tta=False)  # 32x32 as the deep bundles decode; BOVW has no mirror views
    needed = sorted({f for features in feature_sets for f in features}, key=FEATURES.index)
    train = describe_split(root, "train", classes, args.limit_per_class, preprocessing, args, needed)
    test = describe_split(root, "test", classes, args.test_limit_per_class, preprocessing, args, needed)
    grid_index, _ = train_test_split(np.arange(len(train.labels)), train_size=min(args.grid_images,
                                     len(train.labels) - len(classes)), stratify=train.labels, random_state=args.seed)
    timings = {"descriptors": round(time.perf_counter() - started, 1)}

    vocabulary, sweep, keypoints = None, [], {}
    if "sift" in needed:
        step = time.perf_counter()
        keypoints = keypoint_record(train, grid_index)
        vocabulary, sweep = vocabulary_sweep(train.descriptors.sift[grid_index], sizes, args)
        timings["vocabulary_sweep"] = round(time.perf_counter() - step, 1)

    step = time.perf_counter()
    cells, fitted = search_cells(feature_sets, classifiers, train, test, vocabulary, grid_index, args)
    timings["classifiers"] = round(time.perf_counter() - step, 1)

    served = pick_served(cells, args.serve)
    features, mean, scale, classifier = fitted[(served["feature_set"], served["classifier"])]
    model = BovwModel(features=features, vocabulary=vocabulary if "sift" in features else None, mean=mean,
                      scale=scale, classifier=classifier)
    x_train = model.standardised(train.descriptors)
    projection = PcaProjection.fit(x_train, dims=x_train.shape[1], seed=args.seed)  # keeps every component
    timings["total"] = round(time.perf_counter() - started, 1)
    record = training_record(args, cells=cells, served=served, sweep=sweep, keypoints=keypoints,
                             vocabulary=vocabulary, grid_images=len(grid_index), timings=timings)
    spec = BundleSpec(classes=classes, architecture={"name": "bovw", "features": list(features)},
                      preprocessing=preprocessing,
                      vector={"pca_dims": projection.max_dims, "onehot_weight": args.onehot_weight},
                      training=record, metrics=served_metrics(served, train_images=len(train.labels),
                                                              test_images=len(test.labels)))
    return write_bundle(args, model, projection, spec)


def keypoint_record(train: SplitDescriptors, grid_index: np.ndarray) -> dict[str, Any]:
    """How many keypoints SIFT's own detector finds on the grid subset (few, and a different number each
    image: why the descriptors are dense), and the dense grid used instead."""
    detected = detected_keypoints(gray(train.images[grid_index]))
    return {"images": int(len(detected)), "without_any": round(float((detected == 0).mean()), 4),
            "median": float(np.median(detected)), "mean": round(float(detected.mean()), 2),
            "dense_grid": {"step": SIFT_STEP, "size": SIFT_SIZE, "per_image": int(train.descriptors.sift.shape[1])}}


def search_cells(feature_sets: list[tuple[str, ...]], classifiers: list[str], train: SplitDescriptors,
                 test: SplitDescriptors, vocabulary: np.ndarray | None, grid_index: np.ndarray,
                 args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[tuple[str, str], Fitted]]:
    """`grid_search_cell` for every feature set x classifier, on descriptors standardised by the train
    split's mean and scale; every cell's record, and what each fitted to serve it."""
    cells, fitted = [], {}
    for features in feature_sets:
        name = feature_set_name(features)
        x_train = train.descriptors.fused(features, vocabulary)
        x_test = test.descriptors.fused(features, vocabulary)
        mean, scale = x_train.mean(axis=0), x_train.std(axis=0)
        scale = np.where(scale > 1e-8, scale, 1.0).astype(np.float32)
        x_train, x_test = (x_train - mean) / scale, (x_test - mean) / scale
        for classifier in classifiers:
            cell, model = grid_search_cell(name, classifier, x_train, train.labels, x_test, test.labels, grid_index,
                                           args)
            cells.append(cell)
            fitted[(name, classifier)] = (features, mean, scale, model)
    return cells, fitted


def training_record(args: argparse.Namespace, *, cells: list[dict[str, Any]], served: dict[str, Any],
                    sweep: list[dict[str, Any]], keypoints: dict[str, Any], vocabulary: np.ndarray | None,
                    grid_images: int, timings: dict[str, float]) -> dict[str, Any]:
    """The bundle's `training` object (and `--results`'): the command and recipe, the grids, every
    measurement, and the pair served."""
    command = recorded_command(args, parser=get_args_parser(), not_recorded=("quiet", "jobs", "results"))
    return {"command": command, "recipe": jsonable(vars(args)), "grids": GRIDS,
            "descriptors": {"gch_bins": GCH_BINS, "hog": dict(HOG_OPTIONS)},
            "sift_keypoints": keypoints, "vocabulary_sweep": sweep,
            "vocabulary_size": None if vocabulary is None else int(len(vocabulary)),
            "grid_images": int(grid_images), "folds": args.folds, "cells": cells,
            "served": {"feature_set": served["feature_set"], "classifier": served["classifier"]},
            "timings_s": timings}


def served_metrics(served: dict[str, Any], *, train_images: int, test_images: int) -> dict[str, Any]:
    """The bundle's `metrics`: the served cell's accuracy and macro precision on both splits."""
    return {"test_accuracy": served["test_accuracy"], "test_precision": served["test_precision"],
            "train_accuracy": served["train_accuracy"], "train_precision": served["train_precision"],
            "train_images": int(train_images), "test_images": int(test_images)}


def write_bundle(args: argparse.Namespace, model: BovwModel, projection: PcaProjection,
                 spec: BundleSpec) -> dict[str, Any]:
    """Write the bundle to `--output`, and its measurements to `--results` when asked; returns its version
    and metrics."""
    version = save_bovw_bundle(args.output, model, projection, spec)
    served = spec.training["served"]
    logger.info("wrote bundle %s to %s: serves %s with %s, %s", version, args.output, served["feature_set"],
                served["classifier"], json.dumps(spec.metrics))
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"version": version, "bundle": str(args.output), "metrics": spec.metrics,
                                            "training": spec.training}, indent=2) + "\n")
    return {"version": version, **spec.metrics}


def describe_split(root: Path, split: str, classes: list[str], limit: int | None, preprocessing: Preprocessing,
                   args: argparse.Namespace, features: list[str]) -> SplitDescriptors:
    """The split's descriptors, cached beside its decoded images (SIFT as uint8: OpenCV's values are
    integers 0-255)."""
    images, labels = load_split(root, split, classes, limit_per_class=limit, preprocessing=preprocessing,
                                cache_dir=args.cache_dir, quiet=args.quiet)
    cache = args.cache_dir / f"descriptors-{split}-{len(images)}-{'-'.join(features)}-s{SIFT_STEP}.npz"
    if cache.exists():
        with np.load(cache) as data:
            arrays = {name: data[name] for name in data.files}
        logger.info("%s descriptors of %d images from %s", split, len(images), cache)
    else:
        logger.info("describing %d %s images (%s)", len(images), split, ", ".join(features))
        parts = [Descriptors.of(images[start:start + 2048], features) for start in range(0, len(images), 2048)]
        arrays = {"gch": np.concatenate([p.gch for p in parts]), "hog": np.concatenate([p.hog for p in parts]),
                  "sift": np.concatenate([p.sift for p in parts]).round().clip(0, 255).astype(np.uint8)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **arrays)
    arrays["sift"] = arrays["sift"].astype(np.float32)
    return SplitDescriptors(images=images, labels=labels, descriptors=Descriptors(**arrays))


def vocabulary_sweep(sift: np.ndarray, sizes: list[int], args: argparse.Namespace) -> tuple[np.ndarray, list[dict]]:
    """Fit a vocabulary of each size on a sample of `sift` `(N, P, 128)`; the one with the lowest
    Davies-Bouldin index (or `--vocabulary-size`), and every size's record."""
    rng = np.random.default_rng(args.seed)
    flat = sift.reshape(-1, sift.shape[-1])
    sample = flat[rng.choice(len(flat), size=min(args.kmeans_descriptors, len(flat)), replace=False)]
    scored = sample[rng.choice(len(sample), size=min(args.db_descriptors, len(sample)), replace=False)]
    if args.vocabulary_size is not None:
        sizes = sorted({*sizes, args.vocabulary_size})
    sizes = [size for size in sizes if size < len(scored)]
    if not sizes:
        raise TrainingError("--vocabulary-sizes: every size is at least the descriptors sampled; lower them")
    records, vocabularies = [], {}
    for size in sizes:
        started = time.perf_counter()
        kmeans = MiniBatchKMeans(n_clusters=size, batch_size=max(2048, 3 * size), n_init=3, random_state=args.seed)
        kmeans.fit(sample)
        labels = kmeans.predict(scored)
        score = davies_bouldin_score(scored, labels) if len(set(labels)) > 1 else float("inf")
        records.append({"words": size, "davies_bouldin": round(float(score), 4),
                        "inertia_per_descriptor": round(float(kmeans.inertia_) / len(sample), 2),
                        "seconds": round(time.perf_counter() - started, 1)})
        vocabularies[size] = kmeans.cluster_centers_.astype(np.float32)
        logger.info("vocabulary of %d words: Davies-Bouldin %.4f (%.1f s)", size, score, records[-1]["seconds"])
    chosen = args.vocabulary_size or min(records, key=lambda r: r["davies_bouldin"])["words"]
    for record in records:
        record["chosen"] = record["words"] == chosen
    return vocabularies[chosen], records


def grid_search_cell(feature_set: str, classifier: str, x_train: np.ndarray, y_train: np.ndarray,
                     x_test: np.ndarray, y_test: np.ndarray, grid_index: np.ndarray,
                     args: argparse.Namespace) -> tuple[dict[str, Any], ClassifierMixin]:
    """Grid search with stratified k-fold CV on the grid subset, the best refitted on all of `x_train`,
    measured on train and test (accuracy and macro precision)."""
    title, estimator, grid = CLASSIFIERS[classifier]
    estimator = clone(estimator)
    if "random_state" in estimator.get_params():  # the forest and SGD: the same fits every run
        estimator.set_params(random_state=args.seed)
    started = time.perf_counter()
    search = GridSearchCV(estimator, grid, scoring="accuracy", n_jobs=args.jobs, refit=False,
                          cv=StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=args.seed))
    search.fit(x_train[grid_index], y_train[grid_index])
    searched = time.perf_counter() - started
    model = clone(estimator).set_params(**search.best_params_).fit(x_train, y_train)
    train_predicted = class_probabilities(model, x_train).argmax(axis=1)
    test_predicted = class_probabilities(model, x_test).argmax(axis=1)
    cell = {"feature_set": feature_set, "classifier": classifier, "classifier_name": title,
            "dims": int(x_train.shape[1]), "best_params": search.best_params_,
            "cv_accuracy": round(float(search.best_score_), 4),
            "train_accuracy": round(float(accuracy_score(y_train, train_predicted)), 4),
            "train_precision": round(float(precision_score(y_train, train_predicted, average="macro",
                                                           zero_division=0)), 4),
            "test_accuracy": round(float(accuracy_score(y_test, test_predicted)), 4),
            "test_precision": round(float(precision_score(y_test, test_predicted, average="macro",
                                                          zero_division=0)), 4),
            "grid_seconds": round(searched, 1), "refit_seconds": round(time.perf_counter() - started - searched, 1)}
    logger.info("%s / %s: CV %.4f, test %.4f (%s; %.0f s)", feature_set, title, cell["cv_accuracy"],
                cell["test_accuracy"], search.best_params_, time.perf_counter() - started)
    return cell, model


def pick_served(cells: list[dict[str, Any]], serve: str | None) -> dict[str, Any]:
    """The cell `--serve` names, else the best by CV accuracy (never by the test split)."""
    if serve is None:
        return max(cells, key=lambda cell: cell["cv_accuracy"])
    features, _, classifier = serve.partition(":")
    name = feature_set_name(parse_feature_set(features))
    return next(cell for cell in cells if (cell["feature_set"], cell["classifier"]) == (name, classifier))

