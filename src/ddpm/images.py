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


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 in [0, 255] -> (B, C, H, W) float32 in [-1, 1]; the inverse of `to_uint8` on its outputs."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def read_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images (N, C, H, W) float32 in [-1, 1], labels (N,) or None) from a samples file: this project's
    (`samples` float (N, C, H, W) in [-1, 1], `labels`) or guided-diffusion's (`arr_0` uint8 (N, H, W, C),
    class labels in `arr_1`). Raises ValueError naming what the file holds when it is neither."""
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.keys())
        if "samples" in f:
            images, labels = f["samples"], f["labels"] if "labels" in f else None
            if images.ndim != 4 or images.dtype.kind != "f":
                raise ValueError(f"its `samples` is {images.dtype} {images.shape}; expected float (N, C, H, W) in [-1, 1]")
            if images.size and (images.min() < -1.001 or images.max() > 1.001):
                raise ValueError(f"its `samples` lie in [{images.min():.3g}, {images.max():.3g}]; expected [-1, 1]")
            images = torch.from_numpy(images.astype(np.float32))
        elif "arr_0" in f:
            images, labels = f["arr_0"], f["arr_1"] if "arr_1" in f else None
            if images.ndim != 4 or images.dtype != np.uint8:
                raise ValueError(f"its `arr_0` is {images.dtype} {images.shape}; expected uint8 (N, H, W, C)")
            images = from_uint8(images)
        else:
            raise ValueError(f"it holds {keys or 'no arrays'}; expected `samples` (float NCHW) or `arr_0` (uint8 NHWC)")
    return images, None if labels is None else torch.from_numpy(labels.astype(np.int64))
