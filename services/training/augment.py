"""Training augmentation on normalised batches already on the device: random crop, flip, Cutout."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(batch: torch.Tensor, generator: torch.Generator, pad: int = 4, cutout: int = 0) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip on a normalised NCHW batch.

    With `cutout > 0`, each image also loses a `cutout`×`cutout` square (zero, the dataset mean after
    normalisation) centred anywhere in the image and clipped at its border (DeVries & Taylor, 2017).
    """
    n, _, h, w = batch.shape
    device = batch.device
    padded = F.pad(batch, (pad, pad, pad, pad))
    # The random draws come from the CPU generator (the same stream on every device); the crop is one
    # gather: image i reads rows y_i..y_i+h and columns x_i..x_i+w of its padded copy.
    offsets = to_device(torch.randint(0, 2 * pad + 1, (n, 2), generator=generator), device)
    flip = to_device(torch.rand(n, generator=generator) < 0.5, device)
    rows = (offsets[:, 0, None] + torch.arange(h, device=device)).view(n, 1, h, 1)
    cols = offsets[:, 1, None] + torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols).view(n, 1, 1, w)
    crops = padded[torch.arange(n, device=device).view(n, 1, 1, 1), torch.arange(padded.shape[1], device=device)
                   .view(1, -1, 1, 1), rows, cols]
    if cutout > 0:
        crops = crops * ~to_device(_cutout_mask(n, h, w, cutout, generator), device).unsqueeze(1)
    return crops.contiguous(memory_format=torch.channels_last)


def _cutout_mask(n: int, h: int, w: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """`(n, h, w)` True inside each image's square, drawn from the CPU generator."""
    centre_y = torch.randint(0, h, (n, 1, 1), generator=generator)
    centre_x = torch.randint(0, w, (n, 1, 1), generator=generator)
    top, left = centre_y - side // 2, centre_x - side // 2
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    return (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device without making the host wait: from pageable memory a CUDA copy waits for the GPU's
    queue to drain, so every step would stall; from pinned memory it is queued like a kernel."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
