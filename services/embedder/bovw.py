"""The original study's Bag-of-Visual-Words model: hand-made descriptors, a visual vocabulary, a classifier.

    gch   gray colour histogram: `GCH_BINS` bins of the gray levels, summing to 1
    hog   scikit-image's HOG on the gray image: 8x8-pixel cells, 2x2-cell blocks, 9 orientations
          (324 values at 32x32)
    sift  OpenCV SIFT descriptors, quantised against the vocabulary (k-means centres) into a
          histogram of visual words summing to 1

SIFT's detector finds almost no keypoints on a 32x32 image (`detected_keypoints` measures it), so
the descriptors are computed densely instead: on a `SIFT_STEP`-pixel grid of `SIFT_SIZE`-pixel
keypoints (49 a 32x32 image), the usual answer for tiny images.

A model fuses the descriptors of its feature set early (concatenated, then standardised by the
training set's mean and deviation) and classifies the fused vector; the search vector is the fused
vector (through the bundle's PCA) with the predicted one-hot, as for the deep models, so the
embedder, the stores and the API serve it unchanged. `cbir train-bovw` (services/training/bovw.py)
learns one.

>>> model = bundle.model  # a BovwModel when bundle.family == "bovw"
>>> embeddings, probabilities = model.predict(images)  # (N, S, S, 3) uint8
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

FEATURES = ("gch", "hog", "sift")  # the order a fused vector concatenates them in
GCH_BINS = 32
HOG_OPTIONS = {"orientations": 9, "pixels_per_cell": (8, 8), "cells_per_block": (2, 2), "block_norm": "L2-Hys"}
SIFT_STEP, SIFT_SIZE = 4, 8.0
_QUANTISE_CHUNK = 65536  # descriptors per distance computation


def check_features(features: Sequence[str]) -> tuple[str, ...]:
    """`features` in fusion order; `ValueError` names an unknown or repeated one and the allowed set."""
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features or len(set(features)) != len(features):
        raise ValueError(f"feature set {list(features)}: name each of {', '.join(FEATURES)} at most once")
    return tuple(f for f in FEATURES if f in features)


def gray(images: np.ndarray) -> np.ndarray:
    """`(N, S, S, 3)` uint8 RGB → `(N, S, S)` uint8 gray (ITU-R 601 weights, as OpenCV and PIL)."""
    return np.stack([cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in images]) if len(images) else \
        np.zeros((0, *images.shape[1:3]), np.uint8)


def gch_descriptors(grays: np.ndarray) -> np.ndarray:
    """Gray colour histograms, `(N, GCH_BINS)`, each summing to 1."""
    bins = (grays.reshape(len(grays), -1).astype(np.int64) * GCH_BINS) // 256
    counts = np.stack([np.bincount(row, minlength=GCH_BINS) for row in bins]) if len(grays) else \
        np.zeros((0, GCH_BINS))
    return (counts / max(bins.shape[1], 1)).astype(np.float32)


def hog_descriptors(grays: np.ndarray) -> np.ndarray:
    """scikit-image HOG of each gray image, `(N, 324)` at 32x32."""
    from skimage.feature import hog  # seconds to import: a deep bundle never needs it

    return np.stack([hog(image, feature_vector=True, **HOG_OPTIONS) for image in grays]).astype(np.float32)


def dense_keypoints(size: int) -> list[cv2.KeyPoint]:
    """A `SIFT_STEP` grid of `SIFT_SIZE` keypoints inside a `size`-pixel square (7x7 at 32)."""
    positions = np.arange(SIFT_STEP, size - SIFT_STEP + 1, SIFT_STEP, dtype=np.float32)
    return [cv2.KeyPoint(float(x), float(y), SIFT_SIZE) for y in positions for x in positions]


def sift_descriptors(grays: np.ndarray) -> np.ndarray:
    """Dense SIFT: `(N, P, 128)` float32, P the grid's keypoints, in the same order for every image."""
    sift = cv2.SIFT_create()
    keypoints = dense_keypoints(grays.shape[1])
    out = np.zeros((len(grays), len(keypoints), 128), np.float32)
    for i, image in enumerate(grays):
        kept, descriptors = sift.compute(image, keypoints)
        if len(kept) != len(keypoints):  # OpenCV drops keypoints too near the border; the grid stays inside
            raise ValueError(f"SIFT kept {len(kept)} of {len(keypoints)} grid keypoints on a {grays.shape[1:]} image")
        out[i] = descriptors
    return out


def detected_keypoints(grays: np.ndarray) -> np.ndarray:
    """How many keypoints SIFT's own detector finds in each image (why the descriptors are dense)."""
    sift = cv2.SIFT_create()
    return np.array([len(sift.detect(image, None)) for image in grays])


def nearest_words(descriptors: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """The index of the nearest vocabulary centre (Euclidean, as k-means) of each `(M, 128)` descriptor."""
    centres = vocabulary.astype(np.float32)
    squared = (centres**2).sum(axis=1)
    words = np.empty(len(descriptors), np.int64)
    for start in range(0, len(descriptors), _QUANTISE_CHUNK):
        chunk = descriptors[start:start + _QUANTISE_CHUNK]
        words[start:start + len(chunk)] = (squared[None, :] - 2 * chunk @ centres.T).argmin(axis=1)
    return words


def word_histograms(sift: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """`(N, P, 128)` dense SIFT → `(N, V)` histograms of visual words, each summing to 1."""
    n, per_image, _ = sift.shape
    words = nearest_words(sift.reshape(-1, 128), vocabulary).reshape(n, per_image)
    counts = np.zeros((n, len(vocabulary)), np.float32)
    np.add.at(counts, (np.repeat(np.arange(n), per_image), words.ravel()), 1.0)
    return counts / max(per_image, 1)


@dataclass
class Descriptors:
    """The raw descriptors of a batch, computed once and fused into any feature set."""

    gch: np.ndarray  # (N, GCH_BINS)
    hog: np.ndarray  # (N, 324)
    sift: np.ndarray  # (N, P, 128) dense SIFT, before quantisation
    _histograms: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # (vocabulary, words)

    @classmethod
    def of(cls, images: np.ndarray, features: Sequence[str] = FEATURES) -> Descriptors:
        """The descriptors `features` need of `(N, S, S, 3)` uint8 images (the others left empty)."""
        grays = gray(images)
        empty = np.zeros((len(images), 0), np.float32)
        return cls(gch=gch_descriptors(grays) if "gch" in features else empty,
                   hog=hog_descriptors(grays) if "hog" in features else empty,
                   sift=sift_descriptors(grays) if "sift" in features else empty[:, :, None])

    def fused(self, features: Sequence[str], vocabulary: np.ndarray | None) -> np.ndarray:
        """Early fusion: the blocks of `features` concatenated in `FEATURES` order (SIFT as word histograms)."""
        blocks = {"gch": lambda: self.gch, "hog": lambda: self.hog, "sift": lambda: self.words(vocabulary)}
        return np.concatenate([blocks[name]() for name in check_features(features)], axis=1).astype(np.float32)


    def words(self, vocabulary: np.ndarray) -> np.ndarray:
        """The SIFT word histograms against `vocabulary`, computed once per vocabulary."""
        if self._histograms is None or self._histograms[0] is not vocabulary:
            self._histograms = (vocabulary, word_histograms(self.sift, vocabulary))
        return self._histograms[1]


@dataclass
class BovwModel:
    """A trained BOVW model: its feature set, vocabulary, standardisation and classifier.

    `predict` has the deep models' contract: `(embeddings, probabilities)` of uint8 images, the
    embedding being the standardised fused descriptor.
    """

    features: tuple[str, ...]
    vocabulary: np.ndarray | None  # (V, 128) k-means centres; None without SIFT
    mean: np.ndarray  # (D,) of the fused training descriptors
    scale: np.ndarray  # (D,) their deviations (1 where a dimension is constant)
    classifier: Any  # a fitted scikit-learn classifier: predict_proba, or decision_function (linear SVM)

    @property
    def dims(self) -> int:
        return len(self.mean)

    def standardised(self, descriptors: Descriptors) -> np.ndarray:
        return ((descriptors.fused(self.features, self.vocabulary) - self.mean) / self.scale).astype(np.float32)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embeddings = self.standardised(Descriptors.of(images, self.features))
        return embeddings, class_probabilities(self.classifier, embeddings)


def class_probabilities(classifier: Any, vectors: np.ndarray) -> np.ndarray:
    """`predict_proba` where the classifier has one; a linear SVM's decision values through a softmax
    otherwise (its confidence is then a relative one, not a calibrated probability)."""
    if hasattr(classifier, "predict_proba"):
        return classifier.predict_proba(vectors).astype(np.float32)
    scores = classifier.decision_function(vectors)
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    return (scores / scores.sum(axis=1, keepdims=True)).astype(np.float32)
