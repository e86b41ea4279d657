"""Moondream2's multi-crop preprocessing: one global crop plus overlapping local tiles.

The local tiles overlap by `overlap_margin` patches on each side so that, once their
features are stitched back together, every interior patch comes from a tile where it
was not at the edge. This reproduces the official pipeline pixel for pixel (Pillow
LANCZOS resizing), which the reference fixture checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.model.config import VisionConfig


@dataclass(frozen=True)
class Crops:
    pixels: np.ndarray  # uint8 [n_crops, crop, crop, 3]; global crop first
    tiling: tuple[int, int]  # (rows, columns) of local tiles


def select_tiling(height: int, width: int, window: int, max_crops: int) -> tuple[int, int]:
    """How many tile rows and columns cover an image of this size, at most `max_crops` tiles.

    Small images get one tile; otherwise the grid follows the aspect ratio, at least
    enough tiles to keep the native resolution, scaled down when that would exceed
    the crop budget.
    """
    if height <= window or width <= window:
        return (1, 1)
    min_rows, min_cols = math.ceil(height / window), math.ceil(width / window)
    if min_rows * min_cols > max_crops:
        shrink = math.sqrt(max_crops / (min_rows * min_cols))
        return (max(1, math.floor(min_rows * shrink)), max(1, math.floor(min_cols * shrink)))
    rows = max(math.floor(math.sqrt(max_crops * height / width)), min_rows)
    cols = max(math.floor(math.sqrt(max_crops * width / height)), min_cols)
    if rows * cols > max_crops:
        if cols > rows:
            cols = max_crops // rows
        else:
            rows = max_crops // cols
    return (max(1, rows), max(1, cols))


def make_crops(image: Image.Image, config: VisionConfig) -> Crops:
    """Cut an image into the global crop and its overlapping local tiles."""
    rgb = image.convert("RGB")
    size, patch = config.crop_size, config.enc_patch_size
    margin = config.overlap_margin * patch
    window = (config.grid - 2 * config.overlap_margin) * patch
    if window <= 0:
        raise ValueError(f"overlap_margin {config.overlap_margin} leaves no tile interior in a {config.grid}-patch crop")
    rows, cols = select_tiling(rgb.height - 2 * margin, rgb.width - 2 * margin, window, config.max_crops)

    crops = np.zeros((rows * cols + 1, size, size, 3), dtype=np.uint8)
    crops[0] = np.asarray(rgb.resize((size, size), resample=Image.Resampling.LANCZOS))
    target_h, target_w = rows * window + 2 * margin, cols * window + 2 * margin
    resized = np.asarray(rgb.resize((target_w, target_h), resample=Image.Resampling.LANCZOS))
    for r in range(rows):
        for c in range(cols):
            tile = resized[r * window: r * window + size, c * window: c * window + size]
            crops[1 + r * cols + c, : tile.shape[0], : tile.shape[1]] = tile
    return Crops(pixels=crops, tiling=(rows, cols))


def normalize(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC crops to the float NCHW range [-1, 1] the vision tower expects."""
    x = torch.as_tensor(pixels)
    # one float copy, then in place: the same arithmetic without three more batch-sized temporaries
    return x.permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5).div_(0.5)


def stitch_local_features(local: torch.Tensor, tiling: tuple[int, int], margin: int) -> torch.Tensor:
    """Reassemble per-tile feature grids [n, g, g, d] into one map, dropping overlaps.

    Each tile contributes its interior; edge tiles also keep their outer margin, so
    the stitched map covers the whole resized image exactly once.
    """
    rows, cols = tiling
    g = local.shape[1]
    step = g - 2 * margin
    out = local.new_zeros((step * rows + 2 * margin, step * cols + 2 * margin, local.shape[-1]))
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        y0 = 0 if r == 0 else margin
        y1 = g if r == rows - 1 else g - margin
        x0 = 0 if c == 0 else margin
        x1 = g if c == cols - 1 else g - margin
        out[r * step + y0: r * step + y1, c * step + x0: c * step + x1] = local[i, y0:y1, x0:x1]
    return out


def pool_to_grid(stitched: torch.Tensor, grid: int) -> torch.Tensor:
    """Average-pool a stitched [H, W, d] feature map to [grid*grid, d]."""
    pooled = F.adaptive_avg_pool2d(stitched.permute(2, 0, 1), output_size=(grid, grid))
    return pooled.permute(1, 2, 0).reshape(grid * grid, -1)
