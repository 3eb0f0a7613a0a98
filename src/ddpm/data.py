"""Data for diffusion training: image datasets and the LightningDataModule that serves x_0 batches.

Images are float32 tensors of shape (C, H, W) scaled to [-1, 1] (Ho et al. 2020, sec. 3.3).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

DIGITS_LEVELS = 16  # scikit-learn's digits hold integers 0..16 per pixel


def digits_split(
    split: Literal["train", "val"], val_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 handwritten digits that scikit-learn ships, split once with a fixed seed.

    Returns (images (N, 1, 8, 8) float32 in [-1, 1], labels (N,) int64). The split depends only on
    `val_fraction` and `seed`, so every consumer (training, the digits classifier, FID reference
    statistics) sees the same held-out images.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "val"):
        raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")
    digits = load_digits()
    images = digits.images.astype(np.float32) / DIGITS_LEVELS * 2.0 - 1.0
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * val_fraction))
    keep = order[:n_val] if split == "val" else order[n_val:]
    keep = np.sort(keep)
    return torch.from_numpy(images[keep]).unsqueeze(1), torch.from_numpy(digits.target[keep]).long()
