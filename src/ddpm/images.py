"""Sample images to files: (B, C, H, W) tensors in [-1, 1] to uint8 arrays and tiled PNG grids."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm.atomic import write_atomic


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
    """Write `images` (B, C, H, W) in [-1, 1] as one PNG grid at `path` (parents created), whole or not at all
    (ddpm.atomic.write_atomic: a kill mid-write leaves the previous grid); returns the path."""
    grid = make_grid(images, nrow=nrow)
    return write_atomic(path, lambda f: grid.save(f, format="PNG"))


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 in [0, 255] -> (B, C, H, W) float32 in [-1, 1]; the inverse of `to_uint8` on its outputs."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def read_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images (N, C, H, W) float32 in [-1, 1], labels (N,) or None) from a samples file: this project's
    (`samples` float (N, C, H, W) in [-1, 1], `labels`) or guided-diffusion's (`arr_0` uint8 (N, H, W, C),
    class labels in `arr_1`). Every file that is not such a samples file raises ValueError saying what is wrong
    (unreadable: cut short, damaged or another format; one .npy array; other arrays; another shape or dtype; NaN or
    inf; values outside [-1, 1]), so that a caller refuses it in one line (docs/reliability.md)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as f:  # the members are read, and their CRCs checked, here
                keys = list(f.keys())
                name, labels_name = ("samples", "labels") if "samples" in f else ("arr_0", "arr_1")
                images = f[name] if name in f else None
                labels = f[labels_name] if labels_name in f else None
    except Exception as e:  # whatever the first bad byte trips: zipfile's BadZipFile, zlib.error, EOFError, numpy's header parser
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"not a readable npz: cut short, damaged or another format ({type(e).__name__}: {reason})") from e
    if isinstance(loaded, np.ndarray):
        raise ValueError(f"it is one .npy array {loaded.dtype} {loaded.shape}, not an npz of named arrays")
    if images is None:
        raise ValueError(f"it holds {keys or 'no arrays'}; expected `samples` (float NCHW) or `arr_0` (uint8 NHWC)")
    if name == "samples":
        if images.ndim != 4 or images.dtype.kind != "f":
            raise ValueError(f"its `samples` is {images.dtype} {images.shape}; expected float (N, C, H, W) in [-1, 1]")
        finite = np.isfinite(images)
        if not finite.all():  # checked first: every comparison with NaN is false, so the range check below misses it
            raise ValueError(f"its `samples` hold {images.size - int(finite.sum())} NaN or infinite value(s); expected finite floats in [-1, 1]")
        if images.size and (images.min() < -1.001 or images.max() > 1.001):
            raise ValueError(f"its `samples` lie in [{images.min():.3g}, {images.max():.3g}]; expected [-1, 1]")
        images = torch.from_numpy(images.astype(np.float32))
    else:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"its `arr_0` is {images.dtype} {images.shape}; expected uint8 (N, H, W, C)")
        images = from_uint8(images)
    return images, None if labels is None else torch.from_numpy(labels.astype(np.int64))


def open_image(path: str | Path) -> Image.Image:
    """Image.open(path), refused with ValueError when the image has more pixels than Pillow's limit
    (PIL.Image.MAX_IMAGE_PIXELS), before any pixel is decoded: Pillow itself only warns up to twice the limit, and
    then decodes the whole image. Use it as a context manager, as Image.open."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"it has more pixels than Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS, "
                             "a guard against decompression bombs): downscale it first") from e
