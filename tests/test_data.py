"""ImageDataModule and datasets: digits, folders of mixed images, CIFAR-10 pickles; the grid helper."""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import huge_png
from ddpm.errors import ConfigError
from ddpm.data import CIFAR10_FILES, DataError, ImageDataModule, digits_split, load_image
from ddpm.images import make_grid


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


def truncated(path: Path, image: Image.Image) -> Path:
    """`image` saved to `path` (format from the suffix) and cut to half its bytes, as an interrupted copy leaves it."""
    image.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_folder(root: Path) -> Path:
    """Two class folders of mixed modes and sizes, one tiny image, and four files that cannot be used."""
    rng = np.random.default_rng(0)
    for i, mode in enumerate(["RGB", "L", "RGBA", "P", "LA", "RGB"]):
        sub = root / ("cats" if i % 2 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (20 + 3 * i, 14 + i, 4), dtype=np.uint8)
        Image.fromarray(pixels, "RGBA").convert(mode).save(sub / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(root / "cats" / "tiny.jpg")  # smaller than resolution
    (root / "cats" / "readme.txt").write_text("hello")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    truncated(root / "dogs" / "cut.jpg", Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    huge_png(root / "cats" / "bomb.png", 12000)  # over Pillow's pixel limit: never decoded
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_modes_resize_and_skips(tmp_path: Path, channels: int) -> None:
    root = make_folder(tmp_path / "imgs")
    dm = ImageDataModule("folder", root=str(root), resolution=8, channels=channels, batch_size=8, val_fraction=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    messages = [str(w.message) for w in caught]
    skipped = [m for m in messages if "skipped" in m]
    assert len(skipped) == 1 and "skipped 4 file(s)" in skipped[0], messages
    assert "2 not an image" in skipped[0] and "1 corrupt or truncated (dogs/cut.jpg)" in skipped[0]
    assert "1 over Pillow's limit of 89,478,485 pixels (cats/bomb.png)" in skipped[0]
    upscaled = [m for m in messages if "upscaled" in m]
    assert len(upscaled) == 1 and "1 image(s) smaller than data.resolution=8" in upscaled[0] and "tiny.jpg" in upscaled[0]
    assert len(dm.train_set) + len(dm.val_set) == 7
    assert dm.num_classes == 2
    for loader in (dm.train_dataloader(), dm.val_dataloader()):  # every kept file decodes
        for x, y in loader:
            assert x.shape[1:] == (channels, 8, 8) and x.min() >= -1 and x.max() <= 1
            assert set(y.tolist()) <= {0, 1}


def test_mode_conversions() -> None:
    """Each mode lands on the configured channels with the colours a viewer shows: alpha over white, a palette
    looked up, 16-bit grayscale scaled (not clipped) to 8 bits, CMYK to RGB."""
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    assert (load_image(red, 4, 3) == [255, 0, 0]).all()
    assert (load_image(red, 4, 1) == 76).all()  # ITU-R 601 luma of pure red
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (load_image(clear, 4, 3) == 255).all()  # transparent -> white background
    palette = red.convert("P")
    assert (load_image(palette, 4, 3) == [255, 0, 0]).all()
    sixteen = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert sixteen.mode.startswith("I") and (load_image(sixteen, 4, 1) == 128).all()
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert (load_image(cmyk, 4, 3) == [255, 0, 0]).all()


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        ImageDataModule("folder", root=str(tmp_path / "missing")).setup()
    (tmp_path / "a_file.png").write_bytes(b"")
    with pytest.raises(DataError, match="a file, not a folder"):
        ImageDataModule("folder", root=str(tmp_path / "a_file.png")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images found; expected png"):
        ImageDataModule("folder", root=str(tmp_path / "empty")).setup()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    truncated(junk / "b.png", Image.new("RGB", (64, 64), (1, 2, 3)))
    with pytest.raises(DataError, match=r"no usable images found \(2 file\(s\) skipped"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ImageDataModule("folder", root=str(junk)).setup()
    with pytest.raises(DataError, match="data.dataset='imagenet'"):
        ImageDataModule("imagenet")
    with pytest.raises(ConfigError, match="data.channels=2 is invalid: expected 1 or 3"):
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
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="found cifar-10-python.tar.gz but not its batches; extract it"):
        ImageDataModule("cifar10", root=str(tmp_path), resolution=32, channels=3).setup()


def test_cifar10_truncated_batch(tmp_path: Path) -> None:
    root = fake_cifar10(tmp_path / "data")
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR-10 python batch"):
        ImageDataModule("cifar10", root=str(root), resolution=32, channels=3).setup()


def test_grid_upscales_small_images() -> None:
    images = torch.linspace(-1, 1, 10 * 64).reshape(10, 1, 8, 8)
    grid = make_grid(images, padding=1)
    assert grid.mode == "L" and grid.size == (4 * 33 + 1, 3 * 33 + 1)  # 8 px cells upscaled 4x to 32
    cell = np.asarray(grid)[1:33, 1:33]
    assert (cell[::4, ::4] == cell[3::4, 3::4]).all()  # nearest: 4x4 blocks
