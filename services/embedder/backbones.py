"""The original study's other deep models, adapted to 32×32 images like our VGG-16 (issue 16): its plain
neural network (an MLP) and small custom CNN, AlexNet, GoogLeNet (Inception v1) and ResNet-50.

Each ends as `CifarVGG16` does — global pooling, one hidden fully-connected layer whose output is the
embedding (`EmbeddingHead`), a classifier — and `forward` returns `(embedding, logits)`, so the bundle,
the vector builder, the embedder and `cbir train` treat them alike. The adaptations to 32×32 are the
usual CIFAR ones: AlexNet's and ResNet-50's 11×11/7×7 stride-4/2 stems become 3×3 stride-1 convolutions
without the first max-pool, and GoogLeNet's stem keeps its convolutions at stride 1 without its first two
max-pools, so the feature maps are not pooled away before the last stage. `width_mult` scales the
channels of the networks built here (tests use narrow ones); torchvision's GoogLeNet and ResNet-50 come
at full width only.

`load_imagenet_features` (`cbir train --pretrained imagenet`, the study's transfer mode) copies
torchvision's ImageNet weights into every layer they fit — all but the layers adapted to 32×32 (the
stems, AlexNet's second convolution), which keep their initialisation — and returns the names of the
parameters it copied (`--freeze-pretrained` freezes those). The plain network and the small CNN have no
ImageNet weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # torchvision is imported where it is used: it takes a second (it loads torch's compiler)
    from torchvision.models import WeightsEnum

logger = logging.getLogger(__name__)


class EmbeddingHead(nn.Module):
    """Pooled features → hidden FC + BN + ReLU (the embedding) → dropout → classifier."""

    def __init__(self, in_features: int, *, embedding_dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Sequential(nn.Flatten(), nn.Linear(in_features, embedding_dim),
                                       nn.BatchNorm1d(embedding_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embedding(features)
        return embedding, self.classifier(self.dropout(embedding))


def _width(channels: int, width_mult: float) -> int:
    return max(8, int(channels * width_mult))


def _full_width_only(name: str, width_mult: float) -> None:
    if width_mult != 1.0:
        raise ValueError(f"{name} comes at full width only (width_mult 1.0), not {width_mult:g}")


def imagenet_state_dict(weights: WeightsEnum) -> Mapping[str, torch.Tensor]:
    """torchvision's ImageNet weights (downloaded on first use into torch's hub cache)."""
    try:
        return weights.get_state_dict(progress=True)
    except OSError as exc:  # no internet (URLError), a timeout, a full disk
        raise ValueError(f"torchvision's {weights} could not be fetched ({exc}): --pretrained imagenet needs "
                         f"internet, or the file already in {torch.hub.get_dir()}/checkpoints") from exc


def copy_imagenet(target: nn.Module, state: Mapping[str, torch.Tensor], *, within: str = "",
                  adapted: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """Copy into `target` the tensors of `state` under `within` (that prefix dropped) it has a place for,
    except those under the `adapted` prefixes (layers changed for 32×32 inputs, left at their
    initialisation); return the copied parameters' names with `prefix`. A tensor of another shape (a
    narrowed network) is a ValueError."""
    own = target.state_dict()
    state = {name.removeprefix(within): tensor for name, tensor in state.items() if name.startswith(within)}
    wanted = {name: tensor for name, tensor in state.items() if name in own and not name.startswith(adapted)}
    misfits = [name for name, tensor in wanted.items() if tensor.shape != own[name].shape]
    if misfits or not wanted:
        raise ValueError(f"torchvision's ImageNet weights do not fit {type(target).__name__} "
                         f"({', '.join(misfits[:3]) or 'no layer in common'}): they fit the full-width network only")
    target.load_state_dict(wanted, strict=False)
    copied = [name for name, _ in target.named_parameters() if name in wanted]
    left = [name for name, _ in target.named_parameters() if name not in wanted]
    logger.info("ImageNet weights: %d parameters copied, %d left at their initialisation (%s)", len(copied),
                len(left), ", ".join(left[:6]) + (" ..." if len(left) > 6 else ""))
    return [prefix + name for name in copied]


class _Backbone(nn.Module):
    """features → global average pool → `EmbeddingHead`."""

    head: EmbeddingHead

    @property
    def classifier(self) -> nn.Linear:
        """The last layer, as on `CifarVGG16` (the bundle checks its PCA against its input width)."""
        return self.head.classifier

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(embedding, logits)` for a normalised `(N, 3, 32, 32)` batch."""
        return self.head(nn.functional.adaptive_avg_pool2d(self.features(images), 1))

    def load_imagenet_features(self) -> list[str]:
        raise ValueError(f"--pretrained imagenet is not available for {type(self).__name__}: torchvision has no "
                         "ImageNet weights of the study's own networks (VGG-16, AlexNet, GoogLeNet and ResNet-50 "
                         "have them)")


class CifarMLP(_Backbone):
    """The study's plain neural network: the flattened image through fully-connected layers."""

    def __init__(self, *, num_classes: int = 10, embedding_dim: int = 512, width_mult: float = 1.0,
                 dropout: float = 0.3) -> None:
        super().__init__()
        hidden = _width(1024, width_mult)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.BatchNorm1d(hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden),
                                  nn.ReLU(inplace=True))
        self.head = EmbeddingHead(hidden, embedding_dim=embedding_dim, num_classes=num_classes, dropout=dropout)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(images))


class CifarCNN(_Backbone):
    """The study's small custom CNN: three blocks of two 3×3 convolutions and a max-pool."""

    def __init__(self, *, num_classes: int = 10, embedding_dim: int = 256, width_mult: float = 1.0,
                 dropout: float = 0.3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in (32, 64, 128):
            out = _width(width, width_mult)
            for _ in range(2):
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                           nn.ReLU(inplace=True)]
                channels = out
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = EmbeddingHead(channels, embedding_dim=embedding_dim, num_classes=num_classes, dropout=dropout)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


class CifarAlexNet(_Backbone):
    """AlexNet's five convolutions (64, 192, 384, 256, 256 channels) with a 3×3 stride-1 stem and 2×2 pools."""

    def __init__(self, *, num_classes: int = 10, embedding_dim: int = 512, width_mult: float = 1.0,
                 dropout: float = 0.3) -> None:
        super().__init__()
        c = [_width(n, width_mult) for n in (64, 192, 384, 256, 256)]
        self.body = nn.Sequential(
            nn.Conv2d(3, c[0], 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c[0], c[1], 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.head = EmbeddingHead(c[4], embedding_dim=embedding_dim, num_classes=num_classes, dropout=dropout)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def load_imagenet_features(self) -> list[str]:
        """The third to fifth convolutions' ImageNet weights (the first two are 3×3 here, 11×11 and 5×5 there)."""
        from torchvision.models import AlexNet_Weights

        return copy_imagenet(self.body, imagenet_state_dict(AlexNet_Weights.IMAGENET1K_V1), within="features.",
                             adapted=("0.", "3."), prefix="body.")  # torchvision's layer indices are ours


class CifarGoogLeNet(_Backbone):
    """torchvision's GoogLeNet (Inception v1, no auxiliary heads) with a stride-1 3×3 stem and without the
    stem's two max-pools."""

    def __init__(self, *, num_classes: int = 10, embedding_dim: int = 512, width_mult: float = 1.0,
                 dropout: float = 0.3) -> None:
        super().__init__()
        _full_width_only("GoogLeNet", width_mult)
        from torchvision.models import googlenet
        from torchvision.models.googlenet import BasicConv2d

        net = googlenet(weights=None, aux_logits=False, init_weights=True)
        net.conv1 = BasicConv2d(3, 64, kernel_size=3, stride=1, padding=1)
        net.maxpool1 = net.maxpool2 = nn.Identity()
        self.net = net
        self.head = EmbeddingHead(1024, embedding_dim=embedding_dim, num_classes=num_classes, dropout=dropout)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.conv3(net.conv2(net.conv1(images)))
        x = net.maxpool3(net.inception3b(net.inception3a(x)))
        for block in (net.inception4a, net.inception4b, net.inception4c, net.inception4d, net.inception4e):
            x = block(x)
        return net.inception5b(net.inception5a(net.maxpool4(x)))

    def load_imagenet_features(self) -> list[str]:
        """Every ImageNet weight but the 7×7 stem's (3×3 here) and the unused 1000-class layer's."""
        from torchvision.models import GoogLeNet_Weights

        return copy_imagenet(self.net, imagenet_state_dict(GoogLeNet_Weights.IMAGENET1K_V1),
                             adapted=("conv1.", "fc."), prefix="net.")


class CifarResNet50(_Backbone):
    """torchvision's ResNet-50 with a 3×3 stride-1 stem and no stem max-pool."""

    def __init__(self, *, num_classes: int = 10, embedding_dim: int = 512, width_mult: float = 1.0,
                 dropout: float = 0.3) -> None:
        super().__init__()
        _full_width_only("ResNet-50", width_mult)
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.head = EmbeddingHead(2048, embedding_dim=embedding_dim, num_classes=num_classes, dropout=dropout)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.relu(net.bn1(net.conv1(images)))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def load_imagenet_features(self) -> list[str]:
        """Every ImageNet weight but the 7×7 stem's and its batch norm's (3×3 here)."""
        from torchvision.models import ResNet50_Weights

        return copy_imagenet(self.net, imagenet_state_dict(ResNet50_Weights.IMAGENET1K_V1),
                             adapted=("conv1.", "bn1."), prefix="net.")
