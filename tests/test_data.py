"""ImageDataModule and datasets: digits, folders of mixed images, CIFAR-10 pickles; the grid helper."""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import CIFAR10_FILES, DataError, ImageDataModule, digits_split, make_grid


def batch(dm: ImageDataModule, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return next(iter(loader))


def test_digits_native_and_upsampled() -> None:
    dm = ImageDataModule("digits", batch_size=16)
    x, y = batch(dm)
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # background is exactly -1
    assert len(dm.train_set) + len(dm.val_set) == 1797
    # the split is digits_split's, shared with the metrics
    assert torch.equal(dm.val_set.images, digits_split("val")[0])
    x16, _ = batch(ImageDataModule("digits", resolution=16, channels=3, batch_size=4))
    assert x16.shape == (4, 3, 16, 16) and x16.min() >= -1 and x16.max() <= 1
    assert torch.equal(x16[:, 0], x16[:, 1])  # grayscale repeated into RGB


def make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, mode in enumerate(["RGB", "L", "RGBA", "P", "LA", "RGB"]):
        sub = root / ("cats" if i % 2 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (20 + 3 * i, 14 + i, 4), dtype=np.uint8)
        Image.fromarray(pixels, "RGBA").convert(mode).save(sub / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(root / "cats" / "tiny.jpg")  # smaller than resolution
    (root / "cats" / "readme.txt").write_text("hello")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_modes_resize_and_skips(tmp_path: Path, channels: int) -> None:
    root = make_folder(tmp_path / "imgs")
    dm = ImageDataModule("folder", root=str(root), resolution=8, channels=channels, batch_size=8, val_fraction=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == 1 and "skipped 2 file" in skipped[0]
    assert len(dm.train_set) + len(dm.val_set) == 7
    assert dm.num_classes == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (channels, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) <= {0, 1}


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        ImageDataModule("folder", root=str(tmp_path / "missing")).setup()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no readable images"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ImageDataModule("folder", root=str(tmp_path / "empty")).setup()
    with pytest.raises(DataError, match="data.dataset='imagenet'"):
        ImageDataModule("imagenet")
    with pytest.raises(DataError, match="data.channels=2"):
        ImageDataModule("digits", channels=2)


def fake_cifar10(root: Path, n: int = 6) -> Path:
    """The CIFAR-10 python layout with n random images per batch file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in CIFAR10_FILES:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def test_cifar10_pickles(tmp_path: Path) -> None:
    root = fake_cifar10(tmp_path / "data")
    dm = ImageDataModule("cifar10", root=str(root), resolution=32, channels=3, hflip=True, batch_size=5)
    x, y = batch(dm)
    assert len(dm.train_set) == 30 and len(dm.val_set) == 6
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    raw = pickle.load(open(root / "cifar-10-batches-py" / "test_batch", "rb"))
    xv, yv = batch(dm, "val")  # no flips, no shuffle on val: pixel-exact
    expected = torch.from_numpy(raw[b"data"][:5].reshape(5, 3, 32, 32)).float() / 127.5 - 1
    assert torch.allclose(xv, expected) and yv.tolist() == [int(v) for v in raw[b"labels"][:5]]


def test_cifar10_missing_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        ImageDataModule("cifar10", root=str(tmp_path), resolution=32, channels=3).setup()
    message = str(e.value)
    assert "cifar-10-batches-py" in message and "data_batch_1" in message and "test_batch" in message
    assert "data.root" in message


def test_grid_upscales_small_images() -> None:
    images = torch.linspace(-1, 1, 10 * 64).reshape(10, 1, 8, 8)
    grid = make_grid(images, padding=1)
    assert grid.mode == "L" and grid.size == (4 * 33 + 1, 3 * 33 + 1)  # 8 px cells upscaled 4x to 32
    cell = np.asarray(grid)[1:33, 1:33]
    assert (cell[::4, ::4] == cell[3::4, 3::4]).all()  # nearest: 4x4 blocks
