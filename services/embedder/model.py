"""The backbones a bundle can hold, by the name its `architecture` records, and the VGG-16 one.

VGG-16 (torchvision's batch-normalised feature stack) adapted to 32×32 CIFAR-10 images: at 32×32
the five max-pools leave a 1×1×512 map, so the ImageNet head (7×7 pooling and two 4096-wide
layers) is replaced by global pooling, one hidden fully-connected layer whose output is the
embedding, and a classifier. `forward` returns both, so nothing needs forward hooks.

`BACKBONES` is what the bundle loader and `cbir train` build from; another architecture is one
more entry (a constructor taking `num_classes` and its own options, returning `(embedding,
logits)`), with no change to the loop or the bundle format.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from services.embedder import backbones

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# torchvision's VGG-16 ("D"): output channels of each 3×3 convolution, "M" a 2×2 max-pool.
VGG16_LAYERS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                       512, 512, 512, "M")


def vgg_features(config: list[int | str]) -> nn.Sequential:
    """torchvision's `make_layers(config, batch_norm=True)`, layer for layer (the same state-dict keys): built
    here because importing torchvision takes a second (it loads torch's compiler), which every start of
    `cbir serve` and `cbir index` paid for this one function."""
    layers: list[nn.Module] = []
    channels = 3
    for value in config:
        if value == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(value), kernel_size=3, padding=1), nn.BatchNorm2d(int(value)),
                       nn.ReLU(inplace=True)]
            channels = int(value)
    return nn.Sequential(*layers)


class CifarVGG16(nn.Module):
    """VGG-16-BN for small images: features → global pool → hidden FC (embedding) → classifier.

    `width_mult` scales every convolution (1.0 is torchvision's VGG-16; tests use a narrow one).
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        embedding_dim: int = 512,
        width_mult: float = 1.0,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        config = [v if v == "M" else max(8, int(v * width_mult)) for v in VGG16_LAYERS]
        self.features = vgg_features(config)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config[-2], embedding_dim),
            nn.BatchNorm1d(embedding_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self._init_weights()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(embedding, logits)` for a normalised `(N, 3, H, W)` batch."""
        embedding = self.embedding(self.pool(self.features(images)))
        return embedding, self.classifier(self.dropout(embedding))

    def load_imagenet_features(self) -> list[str]:
        """Copy torchvision's ImageNet VGG-16-BN convolutions (downloads them; full width only); returns the
        copied parameters' names."""
        from torchvision.models import VGG16_BN_Weights

        return backbones.copy_imagenet(self.features, backbones.imagenet_state_dict(VGG16_BN_Weights.IMAGENET1K_V1),
                                       within="features.", prefix="features.")

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class Backbone:
    """How to build one architecture: `constructor(num_classes=..., **options)`, the side of the
    square images it takes, and the short name that starts its bundles' versions."""

    constructor: Callable[..., nn.Module]
    input_size: int
    version_prefix: str


BACKBONES: dict[str, Backbone] = {
    "CifarVGG16": Backbone(constructor=CifarVGG16, input_size=32, version_prefix="vgg16"),
    # The original study's other deep models (services/embedder/backbones.py).
    "CifarMLP": Backbone(constructor=backbones.CifarMLP, input_size=32, version_prefix="mlp"),
    "CifarCNN": Backbone(constructor=backbones.CifarCNN, input_size=32, version_prefix="cnn"),
    "CifarAlexNet": Backbone(constructor=backbones.CifarAlexNet, input_size=32, version_prefix="alexnet"),
    "CifarGoogLeNet": Backbone(constructor=backbones.CifarGoogLeNet, input_size=32, version_prefix="googlenet"),
    "CifarResNet50": Backbone(constructor=backbones.CifarResNet50, input_size=32, version_prefix="resnet50"),
}


DEFAULT_BACKBONE = "CifarVGG16"  # the shipped bundle's, and `cbir train`'s unless --arch says otherwise


def backbone(name: str) -> Backbone:
    """The registered backbone called `name`; `ValueError` names the registered ones otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"architecture {name!r} is not one of: {', '.join(BACKBONES)}") from None


def build_model(architecture: Mapping[str, Any], num_classes: int) -> nn.Module:
    """A freshly initialised network for a bundle's `architecture` (`name` plus the constructor's options)."""
    options = {key: value for key, value in architecture.items() if key != "name"}
    return backbone(architecture["name"]).constructor(num_classes=num_classes, **options)
