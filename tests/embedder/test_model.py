"""The VGG-16 model and the backbone registry: shapes, torchvision's layout, one model per input size."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from services.embedder.model import BACKBONES, CifarVGG16, build_model


def test_forward_returns_embedding_and_logits() -> None:
    model = CifarVGG16(width_mult=0.125, embedding_dim=32).eval()
    embedding, logits = model(torch.randn(3, 3, 32, 32))
    assert embedding.shape == (3, 32) and logits.shape == (3, 10)
    assert (embedding >= 0).all()  # taken after the ReLU


def test_full_width_is_torchvision_vgg16_bn_features() -> None:
    from torchvision.models import vgg16_bn

    ours = CifarVGG16().features.state_dict()
    theirs = vgg16_bn(weights=None).features.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[name].shape == theirs[name].shape for name in ours)
    assert [repr(layer) for layer in CifarVGG16().features] == [repr(layer) for layer in vgg16_bn().features]


def test_loading_and_running_a_bundle_imports_no_torchvision(tiny_bundle_dir: Path) -> None:
    # It takes a second at every start of cbir serve and cbir index (it loads torch's compiler).
    code = ("import sys, numpy as np; from services.embedder.bundle import load_bundle; "
            "from services.embedder.runtime import Embedder; "
            f"Embedder(load_bundle({str(tiny_bundle_dir)!r})).embed_batch(np.zeros((1, 32, 32, 3), np.uint8)); "
            "assert 'torchvision' not in sys.modules, 'torchvision was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


FULL_WIDTH_ONLY = {"CifarGoogLeNet", "CifarResNet50"}  # torchvision's, at their own width


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_the_registry_builds_each_backbone_for_its_input_size_and_it_learns(name: str) -> None:
    """Every backbone (ours and the study's others) maps a batch to (embedding, logits) at 32x32, and one
    optimiser step on a fixed batch lowers its loss: the layers are wired and trainable."""
    entry = BACKBONES[name]
    width = 1.0 if name in FULL_WIDTH_ONLY else 0.125
    torch.manual_seed(0)
    model = build_model({"name": name, "embedding_dim": 16, "width_mult": width}, 3)
    images, labels = torch.randn(8, 3, entry.input_size, entry.input_size), torch.arange(8) % 3
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        embedding, logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert embedding.shape == (8, 16) and logits.shape == (8, 3)
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.inference_mode():
        embedding, logits = model(images[:2])
    assert embedding.shape == (2, 16) and (embedding >= 0).all()  # taken after the ReLU


def test_an_unknown_backbone_or_width_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="architecture 'ResNet9' is not one of: CifarVGG16, CifarMLP"):
        build_model({"name": "ResNet9"}, 10)
    with pytest.raises(ValueError, match="ResNet-50 comes at full width only"):
        build_model({"name": "CifarResNet50", "width_mult": 0.5}, 10)


def _torchvision_layout(name: str) -> tuple[Callable[[], torch.nn.Module], type]:
    """torchvision's own network at random weights (the layout of its ImageNet file) and its weights enum."""
    from torchvision import models

    return {
        "CifarVGG16": (lambda: models.vgg16_bn(weights=None), models.VGG16_BN_Weights),
        "CifarAlexNet": (lambda: models.alexnet(weights=None), models.AlexNet_Weights),
        "CifarGoogLeNet": (lambda: models.googlenet(weights=None, aux_logits=True, init_weights=True),
                           models.GoogLeNet_Weights),
        "CifarResNet50": (lambda: models.resnet50(weights=None), models.ResNet50_Weights),
    }[name]


# ours → torchvision's name prefix, and the layers adapted to 32×32 that keep their initialisation
IMAGENET_LAYOUT = {
    "CifarVGG16": ("features.", "features.", ()),
    "CifarAlexNet": ("body.", "features.", ("body.0.", "body.3.")),
    "CifarGoogLeNet": ("net.", "", ("net.conv1.", "net.fc.")),
    "CifarResNet50": ("net.", "", ("net.conv1.", "net.bn1.")),
}


@pytest.mark.parametrize("name", sorted(IMAGENET_LAYOUT))
def test_imagenet_weights_fill_every_layer_they_fit_and_the_layers_adapted_to_32px_keep_their_initialisation(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.embedder import backbones

    build_source, weights_enum = _torchvision_layout(name)
    torch.manual_seed(1)
    source = build_source().state_dict()
    asked = []
    monkeypatch.setattr(backbones, "imagenet_state_dict", lambda weights: asked.append(weights) or source)
    torch.manual_seed(0)
    model = build_model({"name": name}, 10)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    copied = model.load_imagenet_features()

    ours, theirs, adapted = IMAGENET_LAYOUT[name]
    assert asked == [weights_enum.IMAGENET1K_V1]
    after = model.state_dict()
    parameters = {key for key, _ in model.named_parameters()}
    for key, value in after.items():
        if key.startswith(ours) and not key.startswith(adapted):  # weights, biases and batch-norm statistics
            assert torch.equal(value, source[theirs + key.removeprefix(ours)]), key
        else:  # the adapted stems and the embedding head and classifier
            assert torch.equal(value, before[key]), key
    expected = {key for key in parameters if key.startswith(ours) and not key.startswith(adapted)}
    assert set(copied) == expected and len(copied) == len(expected) > 0
    if adapted:
        assert any(key.startswith(adapted) for key in parameters)  # the stem is there, at its initialisation
    model.eval()
    with torch.inference_mode():
        embedding, logits = model(torch.randn(2, 3, 32, 32))
    assert embedding.shape == (2, 512) and logits.shape == (2, 10)


def test_imagenet_weights_are_refused_where_torchvision_has_none_or_they_do_not_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import vgg16_bn

    from services.embedder import backbones

    monkeypatch.setattr(backbones, "imagenet_state_dict", lambda weights: vgg16_bn(weights=None).state_dict())
    for name in ("CifarMLP", "CifarCNN"):
        with pytest.raises(ValueError, match=f"not available for {name}: torchvision has no ImageNet weights"):
            build_model({"name": name}, 10).load_imagenet_features()
    with pytest.raises(ValueError, match=r"do not fit Sequential \(0.weight, .*full-width network only"):
        build_model({"name": "CifarVGG16", "width_mult": 0.5}, 10).load_imagenet_features()


def test_imagenet_weights_that_cannot_be_fetched_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    from torchvision.models import _api

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(_api, "load_state_dict_from_url", offline)  # what torchvision's weights call to download
    with pytest.raises(ValueError, match=r"ResNet50_Weights.IMAGENET1K_V1 could not be fetched .*needs internet"):
        build_model({"name": "CifarResNet50"}, 10).load_imagenet_features()
