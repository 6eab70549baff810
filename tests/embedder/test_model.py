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


def test_the_registry_builds_each_backbone_for_its_input_size() -> None:
    for name, entry in BACKBONES.items():
        model = build_model({"name": name, "embedding_dim": 16, "width_mult": 0.125}, 3).eval()
        embedding, logits = model(torch.randn(2, 3, entry.input_size, entry.input_size))
        assert embedding.shape == (2, 16) and logits.shape == (2, 3), name
    with pytest.raises(ValueError, match="architecture 'ResNet9' is not one of: CifarVGG16"):
        build_model({"name": "ResNet9"}, 10)
