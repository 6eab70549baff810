"""The model's pre and core steps: uint8 images → normalised tensor → (embedding, logits)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` is CUDA when present, else CPU; an explicit choice must be available."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device {requested!r} is not one of: auto, cpu, cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available")
    return torch.device(requested)


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
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((batch - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


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
