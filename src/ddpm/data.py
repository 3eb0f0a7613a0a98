"""Data for diffusion training: image datasets and the LightningDataModule that serves x_0 batches.

Images are float32 tensors of shape (C, H, W) scaled to [-1, 1] (Ho et al. 2020, sec. 3.3). Datasets
live in a registry: adding one is a `@register_dataset("name")` builder plus conf/data/<name>.yaml. Datasets
serve images as they are: random horizontal flips (`hflip`) are drawn by the training loader (ResumableLoader), in
the main process, so a resumed run repeats them.
"""
from __future__ import annotations

import pickle
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from PIL import Image, ImageOps
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from ddpm.images import open_image
from ddpm.registry import registrar
from ddpm.errors import ConfigError
from ddpm.schema import check_data

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


# ---- datasets -------------------------------------------------------------------------------------


class DataError(ConfigError):
    """A dataset that cannot be read as configured (missing files, nothing usable); the message says what to fix."""


class TensorImages(Dataset):
    """In-memory images (N, C, H, W) (float in [-1, 1] or uint8) with labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x
        return x, self.labels[i]


def _resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize square images (N, C, S, S) to resolution x resolution (bilinear, antialiased when shrinking)."""
    if images.shape[-1] == resolution:
        return images
    dtype = images.dtype
    x = images.float()
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else x.clamp(-1, 1)


def _set_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grayscale <-> RGB: repeat one channel, or take the ITU-R 601 luma of three (as Pillow's "L")."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.repeat(1, 3, 1, 1)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    y = (images.float() * luma).sum(1, keepdim=True)
    return y.round().to(images.dtype) if images.dtype == torch.uint8 else y


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation split of range(n) into (train, val) indices, each sorted; val keeps >= 1 if n >= 2."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(int(round(n * val_fraction)), 1 if val_fraction > 0 else 0), n - 1) if n >= 2 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass
class DataSpec:
    """What a dataset builder receives: the DataModule's options that shape the images (flips are the loader's)."""

    root: str | None
    resolution: int
    channels: int
    val_fraction: float
    split_seed: int


Builder = Callable[[DataSpec], tuple[Dataset, Dataset, int | None]]
DATASETS: dict[str, Builder] = {}


# `@register_dataset(name)` adds `build(spec) -> (train, val, num_classes)`; both splits unflipped (the loader flips)
register_dataset = registrar(DATASETS)


@register_dataset("digits")
def build_digits(spec: DataSpec) -> tuple[Dataset, Dataset, int | None]:
    """scikit-learn's 1797 8x8 digits (the fixed `digits_split`), upsampled to `resolution` if it is not 8."""
    splits = []
    for split in ("train", "val"):
        images, labels = digits_split(split, val_fraction=spec.val_fraction, seed=spec.split_seed)
        images = _set_channels(_resize(images, spec.resolution), spec.channels)
        splits.append(TensorImages(images, labels))
    return splits[0], splits[1], 10


CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _cifar10_dir(root: str | None) -> Path:
    """The folder holding the CIFAR-10 python batches: `root/cifar-10-batches-py` or `root` itself."""
    if not root:
        raise DataError(f"data.root is not set: point it at the folder that holds cifar-10-batches-py/ (from {CIFAR10_URL})")
    for folder in (Path(root) / "cifar-10-batches-py", Path(root)):
        if all((folder / name).is_file() for name in CIFAR10_FILES):
            return folder
    archive = Path(root) / "cifar-10-python.tar.gz"
    if archive.is_file():
        raise DataError(f"data.root={root}: found {archive.name} but not its batches; extract it there (tar xzf {archive})")
    missing = [name for name in CIFAR10_FILES if not (Path(root) / "cifar-10-batches-py" / name).is_file()]
    raise DataError(
        f"data.root={root}: CIFAR-10 batches not found; expected cifar-10-batches-py/{{{','.join(CIFAR10_FILES)}}} "
        f"(missing: {', '.join(missing)}); download {CIFAR10_URL} and extract it into data.root"
    )


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array, dtype or scalar names, under both spellings of numpy's core module (numpy 1
    writes numpy.core, numpy 2 numpy._core); taken from numpy's own reductions, so no private module is imported."""
    array = np.zeros(1, np.uint8)
    rebuilders = (array.__reduce_ex__(2)[0], array.__reduce_ex__(5)[0], np.int64(0).__reduce__()[0])  # protocols <5, 5; scalars
    found: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for rebuild in rebuilders:
        submodule = rebuild.__module__.rsplit(".", 1)[-1]  # multiarray, numeric
        found |= {(f"numpy.{core}.{submodule}", rebuild.__name__): rebuild for core in ("core", "_core")}
    return found


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10 batches: dicts, lists, bytes, numbers and numpy arrays, nothing else.

    A pickle runs whatever callable its globals name; a dataset handed in is read as data, never executed
    (docs/reliability.md), so every global but numpy's array rebuilders is refused before it is imported.
    """

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"it names the global {module}.{name}; a CIFAR-10 batch holds only numpy arrays, lists and bytes, nothing else is unpickled"
            )
        return found


def _read_cifar10_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) of one python batch file, read by `_CifarUnpickler`."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
    except Exception as e:  # a truncated download or a wrong file
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); re-download {CIFAR10_URL}") from e
    images = torch.from_numpy(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    return images, torch.as_tensor(labels, dtype=torch.long)


@register_dataset("cifar10")
def build_cifar10(spec: DataSpec) -> tuple[Dataset, Dataset, int | None]:
    """CIFAR-10 from the python pickle batches: train = data_batch_1..5 (50k), val = test_batch (10k); kept as uint8."""
    folder = _cifar10_dir(spec.root)
    splits = []
    for names in (CIFAR10_FILES[:5], CIFAR10_FILES[5:]):
        parts = [_read_cifar10_batch(folder / name) for name in names]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        images = _set_channels(_resize(images, spec.resolution), spec.channels)
        splits.append(TensorImages(images, labels))
    return splits[0], splits[1], 10


class ImageFolder(Dataset):
    """Image files read with Pillow, converted to `channels` (alpha composited on white), resized and center-cropped."""

    def __init__(self, files: list[Path], labels: list[int], resolution: int, channels: int) -> None:
        self.files, self.labels = files, labels
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.files[i]) as im:
            array = load_image(im, self.resolution, self.channels)
        x = torch.from_numpy(array).float() / 127.5 - 1.0
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
        return x, torch.tensor(self.labels[i])


SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale (PNG), scaled to 8 bits


def load_image(im: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """A Pillow image of any mode -> uint8 array (H, W) or (H, W, 3): 16-bit grayscale scaled to 8 bits, alpha over
    white, shorter side to `resolution` (bicubic, up or down), center crop."""
    if im.mode in SIXTEEN_BIT:
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    im = im.convert("L" if channels == 1 else "RGB")
    im = ImageOps.fit(im, (resolution, resolution), method=Image.Resampling.BICUBIC)
    return np.array(im, dtype=np.uint8)  # a writable copy


def _examples(paths: list[Path], folder: Path) -> str:
    shown = ", ".join(str(p.relative_to(folder)) for p in paths[:3])
    return shown + (", ..." if len(paths) > 3 else "")


def _image_folder(root: str | None) -> Path:
    """`root` as a folder, or DataError naming data.root (not set, missing, a file)."""
    if not root:
        raise DataError("data.root is not set: point it at a folder of images (data=folder data.root=PATH)")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise DataError(f"data.root={root}: {what}; expected a folder of images (png, jpg, ...), searched recursively")
    return folder


def check_data_source(dataset: str, root: str | None) -> None:
    """DataError unless the files of `dataset` are where `root` says (their presence only; content is read at setup).

    Cheap, so the Validate callback (ddpm.config) runs it before Hydra writes into a run dir.
    """
    if dataset == "folder":
        _image_folder(root)
    elif dataset == "cifar10":
        _cifar10_dir(root)


def scan_image_folder(root: str | None, resolution: int | None = None) -> tuple[list[Path], list[int], list[str]]:
    """The usable images under `root` (recursive, sorted) with labels from their top-level subfolder.

    Every file is decoded once (JPEGs at reduced scale), so what training reads later cannot fail: files that are
    not images, images that are corrupt or truncated and images over Pillow's pixel limit (decompression bombs) are
    skipped and counted in one warning; images whose shorter side is below `resolution` are kept, upscaled, and
    counted in another. Labels: the index of the first-level subfolder when every image sits in one (ImageFolder
    layout), else 0. Raises DataError when the folder is missing or holds no usable image.
    """
    folder = _image_folder(root)
    files, not_images, broken, huge, small = [], [], [], [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            im = open_image(path)
        except ValueError:  # more pixels than Pillow's limit: refused before decoding
            huge.append(path)
            continue
        except Exception:  # UnidentifiedImageError, or unreadable
            not_images.append(path)
            continue
        try:
            with im:
                if resolution is not None and min(im.size) < resolution:
                    small.append(path)
                im.draft(im.mode, (resolution or 1, resolution or 1))  # JPEG: decode at a fraction of the size
                im.load()
            files.append(path)
        except Exception:  # truncated or corrupt data
            broken.append(path)
    skipped = len(not_images) + len(broken) + len(huge)
    if skipped:
        parts = [f"{len(not_images)} not an image ({_examples(not_images, folder)})"] if not_images else []
        parts += [f"{len(broken)} corrupt or truncated ({_examples(broken, folder)})"] if broken else []
        parts += [f"{len(huge)} over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels ({_examples(huge, folder)})"] if huge else []
        warnings.warn(f"data.root={root}: skipped {skipped} file(s): {'; '.join(parts)}", stacklevel=2)
    if not files:
        found = f" ({skipped} file(s) skipped, see the warning)" if skipped else ""
        raise DataError(f"data.root={root}: no usable images found{found}; expected png, jpg, bmp, gif, webp, ... files")
    if small:
        warnings.warn(
            f"data.root={root}: {len(small)} image(s) smaller than data.resolution={resolution} are upscaled (bicubic, so "
            f"blurred): {_examples(small, folder)}; a data.resolution at most their size avoids it",
            stacklevel=2,
        )
    parents = [p.relative_to(folder).parts for p in files]
    if all(len(parts) > 1 for parts in parents):
        classes = sorted({parts[0] for parts in parents})
        labels = [classes.index(parts[0]) for parts in parents]
    else:
        classes, labels = [], [0] * len(files)
    return files, labels, classes


@register_dataset("folder")
def build_folder(spec: DataSpec) -> tuple[Dataset, Dataset, int | None]:
    """Any folder of images (recursive); a seeded `val_fraction` of them is held out."""
    files, labels, classes = scan_image_folder(spec.root, spec.resolution)
    train, val = _split(len(files), spec.val_fraction, spec.split_seed)

    def subset(index: np.ndarray) -> ImageFolder:
        return ImageFolder([files[i] for i in index], [labels[i] for i in index], spec.resolution, spec.channels)

    return subset(train), subset(val), (len(classes) or None)


# ---- a training order that a checkpoint can resume ------------------------------------------------


class EpochShuffle(Sampler[int]):
    """Indices 0..n-1 in an order drawn from (seed, epoch) alone, as DistributedSampler's, so a resumed run can redraw
    the order of the pass it stopped in (ResumableLoader sets the epoch of each pass)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class SkippingBatchSampler(BatchSampler):
    """A BatchSampler whose passes leave out their first `skip` batches (indices only: no image is read) and take
    their order from the sampler when they start, not at their first batch. It keeps BatchSampler's arguments, so
    Lightning can rebuild it around the DistributedSampler it injects under DDP (each rank skips its own batches)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self):
        indices = list(self.sampler)
        end = len(indices) - len(indices) % self.batch_size if self.drop_last else len(indices)
        return iter([indices[i : i + self.batch_size] for i in range(self.skip * self.batch_size, end, self.batch_size)])


def rng_states() -> dict[str, object]:
    """The global random states (torch CPU, CUDA where initialised, numpy, python `random`) as tensors, ints and
    lists, so a checkpoint holding them loads with `torch.load(weights_only=True)`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next],
    }


def set_rng_states(states: dict[str, object]) -> None:
    """Restore what `rng_states` returned; the CUDA states only onto as many devices as were saved."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal.tolist()), gauss_next))


class ResumableLoader(DataLoader):
    """A training DataLoader that serves one stream of batches, pass after pass over the data, and that Lightning
    saves in and restores from checkpoints (its stateful-dataloader protocol: `state_dict` / `load_state_dict`), so a
    run resumed anywhere sees the batches an uninterrupted one would.

    Pass e takes its order from (seed, e) (EpochShuffle; under DDP the DistributedSampler Lightning injects, seeded
    alike), and the loader, not Lightning's epoch count, numbers the passes: a new iterator continues a pass left
    unfinished and starts the next one after a finished one. (Lightning resumed from a checkpoint written at an
    epoch's end runs a one-batch epoch and then counts one epoch too many; by the stream the batches are still the
    uninterrupted run's. With limit_train_batches < 1 an epoch ends inside a pass, and the next goes on with it.)

    The state is the pass, the batches served of it, and the global random states at the save (rng_states), which
    the first batch after a resume restores: draws in this process then repeat an uninterrupted run's, as nothing
    between a save and the next batch draws from those states (validation's loader has its own generator, the sample
    grids their own seeds). So every random draw that a resume must repeat is made in this process, never in a
    worker: with `hflip`, the loader flips each collated batch here, one coin per image from the global torch random
    state as the batch is handed out, whatever `num_workers` (the datasets serve images unflipped). Worker processes
    take their seeds from `generator`, re-seeded by (seed, pass) when a pass (or its resumed rest) starts, never from
    the global random state; their random states are not saved, so a dataset that drew in __getitem__ would not
    repeat its draws after a resume mid-pass with num_workers > 0.

    `hflip` is an __init__ argument and an attribute of the same name, so Lightning, which re-creates the loader from
    its arguments (around the DistributedSampler it injects under DDP), keeps it.
    """

    _epoch = 0  # the pass being served
    _served = 0  # batches of it handed out (skipped ones included)
    _rng: dict | None = None  # random states to restore at the next batch (after load_state_dict)

    def __init__(self, dataset: Dataset, *, hflip: bool = False, **kwargs: object) -> None:
        """`hflip`: flip each image of a batch horizontally with probability 1/2; the rest is DataLoader's."""
        self.hflip = hflip
        super().__init__(dataset, **kwargs)

    def __iter__(self):
        if self._served >= len(self):
            self._epoch, self._served = self._epoch + 1, 0
        sampler = self.batch_sampler.sampler
        sampler.set_epoch(self._epoch)
        if self.generator is not None:
            self.generator.manual_seed(sampler.seed + self._epoch)
        # DataLoader's iterator takes iter(batch_sampler) once or twice as it starts (workers), then never again
        self.batch_sampler.skip = self._served
        try:
            batches = super().__iter__()
        finally:
            self.batch_sampler.skip = 0
        rng, self._rng = self._rng, None
        return self._counted(batches, rng)

    def _counted(self, batches, rng: dict | None):
        if rng is not None:  # here, not at load: whatever runs between the load and the first batch draws nothing from it
            set_rng_states(rng)
        for batch in batches:
            self._served += 1
            yield self._flipped(batch) if self.hflip else batch

    @staticmethod
    def _flipped(batch):
        """The (images (B, C, H, W), labels) batch with each image flipped along its width on a coin of its own, in
        place: the collated batch is the loader's own (and stays pinned where pin_memory pinned it)."""
        images = batch[0]
        coins = torch.rand(len(images)) < 0.5
        images[coins] = images[coins].flip(-1)
        return batch

    def state_dict(self) -> dict[str, object]:
        return {"epoch": self._epoch, "batches": self._served, "rng": rng_states()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._epoch, self._served, self._rng = int(state["epoch"]), int(state["batches"]), state["rng"]


# ---- the LightningDataModule ----------------------------------------------------------------------


class ImageDataModule(LightningDataModule):
    """Serves (x_0, y) batches: images (B, C, H, W) in [-1, 1] and int64 labels, from a dataset in DATASETS.

    Args:
        dataset: a name in DATASETS ("digits", "folder", "cifar10").
        root: where the files are (folder, cifar10).
        resolution: height = width of the served images; digits are native 8, CIFAR-10 32.
        channels: 1 (grayscale) or 3 (RGB).
        hflip: random horizontal flips on the training split (never on validation).
        batch_size: per device (DDP multiplies it by the number of processes).
        num_workers: DataLoader worker processes.
        val_fraction: held-out fraction (digits, folder; CIFAR-10 uses its test batch).
        split_seed: seed of the train/val split, apart from the run's seed so every run sees the same split.
        pin_memory: None pins on GPU accelerators only.
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        resolution: int = 8,
        channels: Literal[1, 3] = 1,
        hflip: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise DataError(f"data.dataset={dataset!r} is not known; known datasets: {', '.join(sorted(DATASETS))}")
        check_data(dict(resolution=resolution, channels=channels, batch_size=batch_size, num_workers=num_workers,
                        val_fraction=val_fraction, split_seed=split_seed))  # fmt: skip
        self.save_hyperparameters()
        self.spec = DataSpec(root, resolution, channels, val_fraction, split_seed)
        self.hflip = hflip  # the training loader's (ResumableLoader), never validation's
        self.dataset, self.batch_size, self.num_workers, self.pin_memory = dataset, batch_size, num_workers, pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.num_classes: int | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.num_classes = DATASETS[self.dataset](self.spec)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        pin = self.pin_memory
        if pin is None:
            pin = self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        common = dict(num_workers=self.num_workers, pin_memory=pin, persistent_workers=self.num_workers > 0)
        if not train:  # its own generator: creating its iterator draws nothing from the global random state
            return DataLoader(dataset, batch_size=self.batch_size, generator=torch.Generator(), **common)
        # the order is a function of the run's seed (seed_everything) and the epoch; a checkpoint holds the position
        order = EpochShuffle(len(dataset), seed=torch.initial_seed())
        batches = SkippingBatchSampler(order, self.batch_size, drop_last=len(dataset) >= self.batch_size)
        return ResumableLoader(dataset, hflip=self.hflip, batch_sampler=batches, generator=torch.Generator(), **common)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, train=False)
