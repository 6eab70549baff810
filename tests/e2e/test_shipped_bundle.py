"""The shipped bundle (models/vgg16-cifar10) still classifies CIFAR-10 through the real upload path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tiny_models import classify_test_images

from services.embedder.bundle import DEFAULT_BUNDLE_DIR, load_bundle


def test_the_shipped_bundle_classifies_200_cifar10_test_images(cifar10_dir: Path) -> None:
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    predicted, truth = classify_test_images(bundle, cifar10_dir, per_class=20)
    assert len(truth) == 200
    assert np.mean(predicted == truth) >= 0.88  # 0.94 when this test was written; the bundle reports 0.93
