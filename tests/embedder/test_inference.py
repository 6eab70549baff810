"""Inference: `predict` normalises with the bundle's mean and std and checks the size; devices are picked by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.errors import ConfigError
from services.embedder.inference import Preprocessing, pick_device, predict


def test_predict_normalises_with_the_bundles_mean_and_std_and_checks_the_size() -> None:
    class MeanPixel(torch.nn.Module):
        """`(embedding, logits)` = the per-channel mean of the normalised input, twice."""

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            means = x.float().mean(dim=(2, 3))
            return means, means

    images = np.full((3, 8, 8, 3), 51, dtype=np.uint8)  # 0.2 after scaling
    pre = Preprocessing(image_size=8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1))
    embeddings, _ = predict(MeanPixel(), images, preprocessing=pre, device=torch.device("cpu"), bf16=False)
    np.testing.assert_allclose(embeddings, [[0.2, 0.0, -1.0]] * 3, atol=1e-6)
    with pytest.raises(ValueError, match=r"takes \(8, 8, 3\)"):
        predict(MeanPixel(), np.zeros((1, 32, 32, 3), dtype=np.uint8), preprocessing=pre,
                device=torch.device("cpu"))


def test_an_unknown_device_is_a_config_error_naming_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="device 'gpu' is not one of: auto, cpu, cuda"):
        pick_device("gpu")
    assert pick_device("cpu").type == "cpu"


def test_index_side_views_default_to_the_query_views() -> None:
    from services.embedder.inference import Preprocessing

    old = Preprocessing.from_metadata({"flip_tta": True})  # bundles written before index_flip_tta
    assert (old.flip_for("query"), old.flip_for("index")) == (True, True)
    split = Preprocessing.from_metadata({"flip_tta": True, "index_flip_tta": False})
    assert (split.flip_for("query"), split.flip_for("index")) == (True, False)
    assert Preprocessing.from_metadata(split.to_metadata()) == split


def test_the_shipped_bundle_indexes_single_views_and_queries_with_the_mirror() -> None:
    # Measured on all of CIFAR-10 (docs/performance.md): MAP@100 0.018478 -> 0.018473, mAP@ALL 0.94103 -> 0.94091.
    from services.embedder.bundle import DEFAULT_BUNDLE_DIR, load_bundle

    preprocessing = load_bundle(DEFAULT_BUNDLE_DIR).preprocessing
    assert (preprocessing.flip_for("query"), preprocessing.flip_for("index")) == (True, False)


def test_the_normalisation_tensors_are_made_once_and_serve_training_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """`to_model_input` made its mean and std tensors at every call: on CUDA a host → device copy (a sync) each."""
    from services.embedder.inference import to_model_input

    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.11, 0.22, 0.33), (0.5, 0.25, 0.125)
    with torch.inference_mode():  # as `predict` makes them first
        first = to_model_input(images, mean=mean, std=std, device=torch.device("cpu"))

    def no_new_tensors(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a new tensor was made from the mean or std")

    monkeypatch.setattr(torch, "tensor", no_new_tensors)
    weight = torch.ones(1, requires_grad=True)
    again = to_model_input(images, mean=mean, std=std, device="cpu") * weight  # outside inference mode: training
    again.sum().backward()  # inference tensors could not be used here
    expected = (images.transpose(0, 3, 1, 2) / 255.0 - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))
    np.testing.assert_allclose(first.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(again.detach().numpy(), expected, atol=1e-6)
    assert first.is_contiguous(memory_format=torch.channels_last)


def test_what_each_compile_choice_asks_for_with_and_without_a_cpp_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.embedder import inference

    cpu = torch.device("cpu")
    monkeypatch.setattr(inference.shutil, "which", lambda name: None)  # no C++ compiler on the PATH
    assert [inference.compile_wanted(choice, cpu) for choice in ("auto", "cached", "off")] == [False, True, False]
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        inference.compile_wanted("on", cpu)
    monkeypatch.setattr(inference.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert [inference.compile_wanted(choice, cpu) for choice in ("auto", "on", "cached", "off")] == \
        [True, True, True, False]
