"""The study's other backbones' parts (services/embedder/backbones.py): copying torchvision's ImageNet
tensors into the layers they fit, the error when they cannot be fetched, the embedding head, and the
narrowest width. (Each backbone end to end, ImageNet copy included: tests/embedder/test_model.py.)"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from services.embedder.backbones import CifarCNN, EmbeddingHead, copy_imagenet, imagenet_state_dict


def body() -> nn.Sequential:
    """A stem adapted to 32x32 (layer 0), a batch norm and a convolution that keep ImageNet's shapes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def imagenet_like() -> OrderedDict[str, torch.Tensor]:
    """torchvision's layout: the same layers under `features.`, an 11x11 stem, and a classifier beside."""
    torch.manual_seed(1)
    source = nn.Sequential(nn.Conv2d(3, 4, 11), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    source[1].running_mean.uniform_()
    state = OrderedDict((f"features.{name}", tensor) for name, tensor in source.state_dict().items())
    state["classifier.weight"] = torch.ones(1000, 2)
    return state


def test_it_copies_every_tensor_that_fits_except_the_adapted_layers_and_names_the_parameters_copied() -> None:
    target, state = body(), imagenet_like()
    before = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    copied = copy_imagenet(target, state, within="features.", adapted=("0.",), prefix="body.")
    assert copied == ["body.1.weight", "body.1.bias", "body.2.weight", "body.2.bias"]  # parameters, not buffers
    for name, tensor in target.state_dict().items():
        if name.startswith("0."):  # the stem adapted to 32x32 keeps its initialisation
            assert torch.equal(tensor, before[name]), name
        else:  # weights, biases and batch-norm statistics
            assert torch.equal(tensor, state[f"features.{name}"]), name


def test_a_narrowed_network_or_one_with_nothing_in_common_is_refused_untouched() -> None:
    narrow = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1))
    before = {name: tensor.clone() for name, tensor in narrow.state_dict().items()}
    with pytest.raises(ValueError, match=r"do not fit Sequential \(1\.weight, 1\.bias, 1\.running_mean\): they "
                                         "fit the full-width network only"):
        copy_imagenet(narrow, imagenet_like(), within="features.", adapted=("0.",))
    assert all(torch.equal(tensor, before[name]) for name, tensor in narrow.state_dict().items())
    with pytest.raises(ValueError, match=r"do not fit Sequential \(no layer in common\)"):
        copy_imagenet(body(), imagenet_like(), within="backbone.")


class Unreachable:
    """Weights whose download fails as torchvision's does without internet."""

    def get_state_dict(self, progress: bool) -> dict[str, torch.Tensor]:
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    def __str__(self) -> str:
        return "AlexNet_Weights.IMAGENET1K_V1"


class Cached:
    def get_state_dict(self, progress: bool) -> dict[str, torch.Tensor]:
        return {"features.0.weight": torch.zeros(1)}


def test_weights_that_cannot_be_fetched_name_themselves_and_where_a_copy_would_be_found() -> None:
    with pytest.raises(ValueError, match=r"AlexNet_Weights.IMAGENET1K_V1 could not be fetched \(<urlopen error .*"
                                         rf"needs internet, or the file already in {torch.hub.get_dir()}/checkpoints"):
        imagenet_state_dict(Unreachable())
    assert list(imagenet_state_dict(Cached())) == ["features.0.weight"]


def test_the_head_embeds_after_its_relu_and_classifies_the_embedding() -> None:
    torch.manual_seed(0)
    head = EmbeddingHead(12, embedding_dim=5, num_classes=3, dropout=0.5).eval()
    features = torch.randn(4, 12, 1, 1)  # globally pooled maps
    embedding, logits = head(features)
    assert embedding.shape == (4, 5) and logits.shape == (4, 3)
    assert (embedding >= 0).all() and (embedding == 0).any()  # after the ReLU
    assert torch.allclose(logits, head.classifier(embedding))  # no dropout in eval mode
    head.train()
    torch.manual_seed(1)
    _, dropped = head(features)
    assert not torch.allclose(dropped, logits)


def test_no_convolution_is_narrower_than_eight_channels() -> None:
    model = CifarCNN(width_mult=0.01, embedding_dim=4)
    widths = [layer.out_channels for layer in model.body if isinstance(layer, nn.Conv2d)]
    assert widths == [8] * 6 and model.classifier is model.head.classifier
    embedding, logits = model.eval()(torch.randn(2, 3, 32, 32))
    assert embedding.shape == (2, 4) and logits.shape == (2, 10)
