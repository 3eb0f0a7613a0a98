"""CPU threads for a training process: the one hardware choice made at start rather than in the config groups.

On a CPU, torch splits every operation over one thread per core. For small images each convolution is too
little work to share: the split and the wait cost more than they save (a step of the digits demo, 8x8
images, is faster on one thread than on two; docs/benchmarks.md). Larger images gain from every core.
"""
from __future__ import annotations

import os

import torch

# images of at most this many pixels a side train on one thread (`threads: auto`)
ONE_THREAD_MAX_SIZE = 16


def cpu_threads(setting: int | str, image_size: int) -> tuple[int, str]:
    """The intra-op threads to train with and why: `setting` if a number; for "auto", OMP_NUM_THREADS when the user
    set it, else 1 for images of at most ONE_THREAD_MAX_SIZE pixels, else torch's default (one per core)."""
    if setting != "auto":
        return int(setting), f"threads={setting}"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"threads=auto, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    if image_size <= ONE_THREAD_MAX_SIZE:
        return 1, f"threads=auto: {image_size}x{image_size} images are too small to split over cores"
    return torch.get_num_threads(), "threads=auto: one per core"
