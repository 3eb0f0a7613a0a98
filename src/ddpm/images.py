"""Sample images to files: (B, C, H, W) tensors in [-1, 1] to uint8 arrays and tiled PNG grids."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] -> (B, H, W, C) uint8 in [0, 255]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, min_cell: int = 32) -> Image.Image:
    """Tile (B, C, H, W) images in [-1, 1] into one Pillow image, nrow per row (default: ~sqrt(B)).

    Cells smaller than `min_cell` pixels are upscaled with nearest-neighbour (an integer factor), so
    8x8 digits stay visible and stay exact; `padding` pixels of white separate the cells.
    """
    B, C, H, W = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(B)))
    ncol = math.ceil(B / nrow)
    scale = max(1, math.ceil(min_cell / max(H, W)))
    cells = to_uint8(images).repeat(scale, axis=1).repeat(scale, axis=2)  # (B, H*s, W*s, C)
    h, w = H * scale, W * scale
    grid = np.full((ncol * (h + padding) + padding, nrow * (w + padding) + padding, C), 255, dtype=np.uint8)
    for i, cell in enumerate(cells):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = cell
    return Image.fromarray(grid[..., 0] if C == 1 else grid, mode="L" if C == 1 else "RGB")


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write `images` (B, C, H, W) in [-1, 1] as one PNG grid at `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow=nrow).save(path)
    return path
