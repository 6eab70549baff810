"""Training augmentation on normalised batches already on the device: random crop, flip, Cutout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CROP_PADDINGS = {"zeros": "constant", "reflect": "reflect"}  # `--crop-padding` → F.pad's mode


def augment(batch: torch.Tensor, generator: torch.Generator, pad: int = 4, cutout: int = 0,
            padding: str = "zeros") -> torch.Tensor:
    """Random crop of a padded copy and random horizontal flip on a normalised NCHW batch.

    `padding` fills the border the crop may shift into: "zeros" (the dataset mean after normalisation) or
    "reflect" (the image mirrored at its edge). With `cutout > 0`, each image also loses a
    `cutout`×`cutout` square (zero, the dataset mean) centred anywhere in the image and clipped at its
    border (DeVries & Taylor, 2017).

    The random draws are made by `generator` on its own device: `cbir train` keeps it on the batch's, so
    a CUDA step draws on the GPU and the host waits for nothing. A generator elsewhere (a CPU one for a
    CUDA batch) gives the same numbers on every device, copied over.
    """
    if padding not in CROP_PADDINGS:
        raise ValueError(f"padding {padding!r} is not one of: {', '.join(CROP_PADDINGS)}")
    n, _, h, w = batch.shape
    device, draws = batch.device, generator.device
    padded = F.pad(batch, (pad, pad, pad, pad), mode=CROP_PADDINGS[padding]) if pad else batch
    # The crop is one gather: image i reads rows y_i..y_i+h and columns x_i..x_i+w of its padded copy.
    offsets = to_device(torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=draws), device)
    flip = to_device(torch.rand(n, generator=generator, device=draws) < 0.5, device)
    rows = (offsets[:, 0, None] + torch.arange(h, device=device)).view(n, 1, h, 1)
    cols = offsets[:, 1, None] + torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols).view(n, 1, 1, w)
    crops = padded[torch.arange(n, device=device).view(n, 1, 1, 1), torch.arange(padded.shape[1], device=device)
                   .view(1, -1, 1, 1), rows, cols]
    if cutout > 0:
        crops = crops * ~to_device(_cutout_mask(n, h, w, cutout, generator), device).unsqueeze(1)
    return crops.contiguous(memory_format=torch.channels_last)


def _cutout_mask(n: int, h: int, w: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """`(n, h, w)` True inside each image's square, drawn and made on the generator's device."""
    device = generator.device
    centre_y = torch.randint(0, h, (n, 1, 1), generator=generator, device=device)
    centre_x = torch.randint(0, w, (n, 1, 1), generator=generator, device=device)
    top, left = centre_y - side // 2, centre_x - side // 2
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    return (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`(N, H, W, 3)` uint8 on the device → normalised float `(N, 3, H, W)` channels_last: the arithmetic of
    `services.embedder.inference.to_model_input`, with `mean` and `std` already on the device as `(1, 3, 1, 1)`
    tensors. `to_model_input` makes them from tuples at every call, and on CUDA each such host → device copy
    makes the host wait for the GPU's queue: once a step, where the step's work should be only queued."""
    batch = images.permute(0, 3, 1, 2).float().div_(255.0)
    return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device without making the host wait: from pageable memory a CUDA copy waits for the GPU's
    queue to drain, so every step would stall; from pinned memory it is queued like a kernel. A tensor
    already there is returned as it is."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
