"""The VGG-16 model and the backbone registry: shapes, torchvision's layout, one model per input size."""

from __future__ import annotations

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
