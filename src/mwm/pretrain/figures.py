"""Pretraining figures: input, region, masked cells and reconstruction, one row per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..files import write_png
from ..masking import upsample_cells

MAX_ROWS = 6
REGION_RGB = np.array([255, 64, 64], np.float32)


def _to_uint8(images_b3hw: torch.Tensor, mean, std) -> np.ndarray:
    """Standardized images → uint8 (B, H, W, 3)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = images_b3hw.detach().float().cpu() * std_t + mean_t
    return (pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def epoch_grid(images_b3hw, regions_bhw, masks, output, mean, std, patch: int) -> np.ndarray:
    """Rows of [input | region overlay | masked input | reconstruction] as RGB uint8.

    ``patch``: the mask cell in pixels (``model.mask_patch``: SparK's cell, a ViT's patch);
    ``output`` is a SparK or MAE output (``reconstruction_b3hw``)."""
    n = min(MAX_ROWS, images_b3hw.shape[0])
    inputs = _to_uint8(images_b3hw[:n], mean, std)
    recon = _to_uint8(output.reconstruction_b3hw[:n], mean, std)
    masked_pixels = upsample_cells(masks.masked_bhw[:n].cpu(), patch).numpy()
    regions = (regions_bhw[:n].float() >= 0.5).cpu().numpy()  # soft maps: their upper half
    rows = []
    for i in range(n):
        overlay = inputs[i].astype(np.float32)
        overlay[regions[i]] = 0.5 * overlay[regions[i]] + 0.5 * REGION_RGB
        masked = inputs[i].copy()
        masked[masked_pixels[i]] = (masked[masked_pixels[i]] * 0.15).astype(np.uint8)
        rows.append(np.concatenate([inputs[i], overlay.astype(np.uint8), masked, recon[i]], axis=1))
    return np.concatenate(rows, axis=0)


def write_epoch_figure(path: Path, batch, mean, std, patch: int) -> None:
    images, regions, masks, output = batch
    write_png(path, epoch_grid(images, regions, masks, output, mean, std, patch))
