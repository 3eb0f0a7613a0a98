"""sample.py's inputs for editing images: the images of `init=` (an npz, one image file or a folder of images,
preprocessed as the run's data) and the region of `mask=` (a preset or a mask image). Bad input raises ConfigError
naming the key, what it found and what is accepted."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ddpm.data import load_image
from ddpm.errors import ConfigError, first_line
from ddpm.images import from_uint8, open_image, read_npz

MASK_PRESETS = ("left", "right", "top", "bottom", "center")  # the region generated; the rest is kept
INIT_ACCEPTED = "an npz (`samples` float NCHW in [-1, 1], or `arr_0` uint8 NHWC), an image file, or a folder of images"


def _open_image(path: Path, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """One image file as (C, H, W) in [-1, 1], preprocessed as the folder data is (ddpm.data.load_image); ValueError
    for an image over Pillow's pixel limit (ddpm.images.open_image)."""
    channels, size, _ = image_shape
    with open_image(path) as im:
        pixels = load_image(im, size, channels)
    return from_uint8(pixels.reshape(size, size, channels)[None])[0]


def read_init(path: str, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """The images (N, C, H, W) in [-1, 1] of `init=path`, in order (a folder's files sorted by name), refused in
    one line unless they can be the model's input."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"init={path}: no such file or folder; expected {INIT_ACCEPTED}")
    try:
        if p.suffix == ".npz":
            images, _ = read_npz(p)
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            images = []
            for f in files:
                try:
                    images.append(_open_image(f, image_shape))
                except (UnidentifiedImageError, OSError):
                    continue  # not an image: a folder may hold notes beside its images
                except ValueError as e:  # an image it must not take (over Pillow's pixel limit): refused, naming it, not skipped
                    raise ConfigError(f"init={path}: {f.name}: {first_line(e)}") from e
            if not images:
                raise ConfigError(f"init={path}: the folder holds no readable image ({len(files)} file(s)); expected {INIT_ACCEPTED}")
            images = torch.stack(images)
        else:
            images = _open_image(p, image_shape)[None]
    except ConfigError:
        raise
    except (ValueError, OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"init={path} cannot be read: {first_line(e)}; expected {INIT_ACCEPTED}") from e
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise ConfigError(f"init={path} holds {tuple(images.shape[1:])} images; the checkpoint's model makes {tuple(image_shape)} (C, H, W)")
    return images


def build_mask(spec: str, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """The mask (1, 1, H, W) of `mask=spec`: 1 where pixels are generated, 0 where the input is kept. A preset
    generates that half (left, right, top, bottom) or the central box of half the size (center); a file is an
    image (white = generate, as diffusers' inpainting masks are; resized to H x W by nearest neighbour) or an
    .npy array (H, W) of 0 and 1."""
    _, H, W = image_shape
    mask = torch.zeros(1, 1, H, W)
    if spec in MASK_PRESETS:
        region = {"left": (slice(None), slice(0, W // 2)), "right": (slice(None), slice(W // 2, None)),
                  "top": (slice(0, H // 2), slice(None)), "bottom": (slice(H // 2, None), slice(None)),
                  "center": (slice(H // 4, H - H // 4), slice(W // 4, W - W // 4))}[spec]  # fmt: skip
        mask[0, 0][region] = 1.0
        return mask
    accepted = f"{' | '.join(MASK_PRESETS)}, a mask image (white = generate) or an .npy array (H, W) of 0 and 1"
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(f"mask={spec}: not a preset and no such file; expected {accepted}")
    try:
        if p.suffix == ".npy":
            array = np.load(p, allow_pickle=False).astype(np.float32)
            if array.shape != (H, W) or not np.isin(array, (0.0, 1.0)).all():
                raise ValueError(f"it holds {array.dtype} {array.shape}; expected (H, W) = ({H}, {W}) of 0 and 1")
        else:
            with open_image(p) as im:
                array = (np.asarray(im.convert("L").resize((W, H), Image.Resampling.NEAREST)) > 127).astype(np.float32)
    except (ValueError, OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"mask={spec} cannot be read: {first_line(e)}; expected {accepted}") from e
    mask[0, 0] = torch.from_numpy(array)
    return mask
