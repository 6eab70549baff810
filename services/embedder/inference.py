"""The model's pre and core steps: uint8 images → normalised tensor → (embedding, logits).

`Preprocessing` is what a bundle says about its inputs (as torchvision's weights carry their
transforms): the decoder's side and resample filter, the normalisation, and flip test-time
augmentation. `predict` is the one forward pass over decoded images, used by the embedder,
`cbir train`, `cbir evaluate` and the bench scripts alike.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from services.common.embedding import Purpose
from services.common.errors import ConfigError
from services.common.images import IMAGE_SIZE, RESAMPLE, resample_filter_named
from services.embedder.model import CIFAR10_MEAN, CIFAR10_STD

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Preprocessing:
    """How images reach the network; the defaults are those of every bundle written so far.

    >>> pre = bundle.preprocessing
    >>> images = np.stack([decode_image(data, size=pre.image_size, resample=pre.resize)])
    >>> embeddings, probabilities = predict(bundle.model, images, preprocessing=pre, device=device)
    """

    image_size: int = IMAGE_SIZE
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    resize: str = RESAMPLE
    flip_tta: bool = False  # queries are averaged with their mirror image
    index_flip_tta: bool | None = None  # indexed images likewise; None: as `flip_tta`

    def flip_for(self, purpose: Purpose) -> bool:
        """Whether images embedded for `purpose` ("query" or "index") are averaged with their mirror."""
        if purpose == "index" and self.index_flip_tta is not None:
            return self.index_flip_tta
        return self.flip_tta

    def __post_init__(self) -> None:
        resample_filter_named(self.resize)  # ValueError for a filter the decoder does not know
        if self.image_size < 1 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"image_size {self.image_size}, mean {self.mean}, std {self.std}: need a size of at "
                             "least 1 and three means and three positive deviations")

    @classmethod
    def from_metadata(cls, values: Mapping[str, Any]) -> Preprocessing:
        """From a bundle's `preprocessing` object; keys it lacks take the defaults."""
        defaults = cls()
        return cls(image_size=int(values.get("image_size", defaults.image_size)),
                   mean=tuple(float(v) for v in values.get("mean", defaults.mean)),
                   std=tuple(float(v) for v in values.get("std", defaults.std)),
                   resize=str(values.get("resize", defaults.resize)),
                   flip_tta=bool(values.get("flip_tta", defaults.flip_tta)),
                   index_flip_tta=None if values.get("index_flip_tta") is None else bool(values["index_flip_tta"]))

    def to_metadata(self) -> dict[str, Any]:
        """The `preprocessing` object of `bundle.json`."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` is CUDA when present, else CPU; an explicit choice must be available (`ConfigError`)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested not in DEVICES:
        raise ConfigError(f"device {requested!r} is not one of: {', '.join(DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but CUDA is not available; use one of: auto, cpu")
    return torch.device(requested)


def compile_wanted(choice: str, device: torch.device) -> bool:
    """Whether to run the model compiled for `CBIR_COMPILE` = auto, on, cached or off. Building a package takes
    inductor, which writes C++ for the CPU (it needs a compiler on the PATH) and Triton kernels for CUDA (shipped
    with torch); `cached` builds none, it loads those already in the compile cache (`Embedder`'s `build`)."""
    available = device.type == "cuda" or any(shutil.which(name) for name in ("g++", "c++", "clang++"))
    if choice == "on" and not available:
        raise ConfigError("CBIR_COMPILE=on, but torch.compile needs a C++ compiler (g++) on the PATH for the CPU; "
                          "install one or set CBIR_COMPILE=off")
    return choice in ("on", "cached") or (choice == "auto" and available)


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on CPU and CUDA alike."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def to_model_input(
    images: np.ndarray | torch.Tensor,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
) -> torch.Tensor:
    """`(N, H, W, 3)` uint8 → normalised float `(N, 3, H, W)` in channels_last on `device`."""
    batch = torch.as_tensor(images).to(device, non_blocking=True)
    batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t, std_t = normalisation(tuple(mean), tuple(std), torch.device(device))
    return ((batch - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=32)
def normalisation(mean: tuple[float, ...], std: tuple[float, ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean` and `std` as `(1, 3, 1, 1)` tensors on `device`, made once per bundle and device: each new one
    is a host → device copy, a synchronisation on CUDA. Made outside inference mode, so that training (which
    records gradients) may use what inference made first."""
    with torch.inference_mode(False):
        return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
                torch.tensor(std, device=device).view(1, 3, 1, 1))


@torch.inference_mode()
def forward_batch(
    model: nn.Module, inputs: torch.Tensor, *, flip_tta: bool, use_bf16: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and class probabilities (float32 numpy), averaged with the mirror when `flip_tta`."""
    with autocast(inputs.device, use_bf16):
        embedding, logits = model(inputs)
        if flip_tta:
            flipped_embedding, flipped_logits = model(torch.flip(inputs, dims=[3]))
            embedding = (embedding + flipped_embedding) / 2
            logits = (logits + flipped_logits) / 2
    probabilities = torch.softmax(logits.float(), dim=1)
    return embedding.float().cpu().numpy(), probabilities.cpu().numpy()


@torch.inference_mode()  # the model's inputs and their mirrors alike: one compiled graph serves both
def predict(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    preprocessing: Preprocessing,
    device: torch.device,
    flip_tta: bool | None = None,
    bf16: bool = True,
    batch_size: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings `(N, E)` and probabilities `(N, C)` of decoded `(N, S, S, 3)` uint8 images, in eval mode.

    Normalised with the bundle's mean and std; `flip_tta` (default: the bundle's) averages each
    image with its mirror. Chunks of `batch_size`: the same chunking gives the same numerics. The
    inputs are made in inference mode, as the mirrors are in `forward_batch`: torch.compile guards on
    that, and an input made outside it recompiled a compiled model for the mirror (7 s on the first
    query of each size).
    """
    if tuple(images.shape[1:]) != (preprocessing.image_size, preprocessing.image_size, 3):
        side = preprocessing.image_size
        raise ValueError(f"images of shape {tuple(images.shape[1:])}; this model takes ({side}, {side}, 3), "
                         "as the bundle's decoder makes them")
    flip_tta = preprocessing.flip_tta if flip_tta is None else flip_tta
    model.eval()
    embeddings, probabilities = [], []
    for start in range(0, len(images), batch_size):
        inputs = to_model_input(images[start:start + batch_size], mean=preprocessing.mean, std=preprocessing.std,
                                device=device)
        embedding, probability = forward_batch(model, inputs, flip_tta=flip_tta, use_bf16=bf16)
        embeddings.append(embedding)
        probabilities.append(probability)
    if not embeddings:
        raise ValueError("no images to predict")
    return np.concatenate(embeddings), np.concatenate(probabilities)
