"""Exact resume: a run stopped anywhere and resumed ends where an uninterrupted run of the same steps ends.

The end-to-end test runs train.py (debug=fast: digits, batch 128 of 1437 images, so 11 batches an epoch, checkpoints
every 4 steps); the rest are in-process: the data order and its position (ddpm.data.ResumableLoader), the random
states, the checkpoint a resume chooses, and the learning-rate curve a resume keeps.
"""
from __future__ import annotations

import io
import itertools
import logging
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from conftest import train
from ddpm.checkpoints import newest_valid_checkpoint
from ddpm.data import ImageDataModule, ResumableLoader
from ddpm.errors import ConfigError
from ddpm.evaluation import dataset_images
from ddpm.module import LR_HORIZON, DiffusionModule, lr_factor
from ddpm.schema import LrDecay

TINY_UNET = dict(image_size=8, in_channels=1, base_channels=8, channel_mult=[1], num_res_blocks=1, attention_resolutions=[], norm_groups=4)


def training_state(path: Path) -> dict[str, Any]:
    """What a checkpoint holds of the training itself: EMA and live weights, optimizer and scheduler states, the step."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = ("state_dict", "current_model_state", "optimizer_states", "lr_schedulers", "global_step")
    return {key: ckpt[key] for key in keys}


def assert_equal(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, every tensor bitwise equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs (max |diff| {(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_resumed_legs_equal_an_uninterrupted_run(tmp_path: Path) -> None:
    """Stopped at step 4 (mid-epoch), resumed to 11 (the epoch's last batch), then copied without timestamps, the oldest
    step_000004.ckpt made the newest file, and resumed from the copy to 15 (mid second epoch), with random flips: the
    weights, the EMA, the optimizer and the scheduler equal those of one 15-step run bitwise; no leg warns that the
    dataloader is not resumable; the copy's last.ckpt holds the end (no last-v1.ckpt beside it). Batches are read
    by 2 worker processes, as conf/data/cifar10.yaml and folder.yaml read them."""
    reference, run, copy = tmp_path / "reference", tmp_path / "run", tmp_path / "copy"
    # flips are drawn by the loader in this process from the global torch RNG: exact only with its state restored
    flips = ("data.hflip=true", "data.num_workers=2")
    train(reference, "trainer.max_steps=15", *flips)
    keep = "callbacks.checkpoint.save_top_k=-1"  # step_000004, step_000008, step_000011 and last (11)
    legs = [train(run, "trainer.max_steps=4", *flips, keep), train(run, "trainer.max_steps=11", "resume=true", *flips, keep)]
    shutil.copytree(run, copy, copy_function=shutil.copyfile)  # contents only: every file gets the copy's time
    older = copy / "checkpoints" / "step_000004.ckpt"
    later = (copy / "checkpoints" / "last.ckpt").stat().st_mtime_ns + 10**9
    os.utime(older, ns=(later, later))
    legs.append(train(copy, "trainer.max_steps=15", "resume=true", *flips))
    assert f"Restoring states from the checkpoint path at {copy / 'checkpoints' / 'last.ckpt'}" in legs[-1].stdout + legs[-1].stderr
    for leg in legs:
        assert "not resumable" not in leg.stdout + leg.stderr
    assert not list((copy / "checkpoints").glob("last-v*.ckpt"))  # the copy's last.ckpt was continued, not versioned
    assert_equal(training_state(reference / "checkpoints" / "last.ckpt"), training_state(copy / "checkpoints" / "last.ckpt"))


def test_ddp_resumed_legs_equal_an_uninterrupted_run(tmp_path: Path) -> None:
    """Plain DDP on 2 CPU processes (rank 1 is train.py started again by Lightning, and takes rank 0's resume choice):
    4 steps, then a resume to 8, equal 8 uninterrupted steps bitwise, each rank having read its own half of each pass."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    ddp = ("hardware=ddp", "hardware.accelerator=cpu", "hardware.devices=2", "data.batch_size=32")
    train(reference, *ddp)
    train(run, "trainer.max_steps=4", *ddp)
    resumed = train(run, "resume=true", *ddp)
    assert "not resumable" not in resumed.stdout + resumed.stderr
    assert_equal(training_state(reference / "checkpoints" / "last.ckpt"), training_state(run / "checkpoints" / "last.ckpt"))


def test_newest_valid_checkpoint_goes_by_global_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The highest global step wins whatever the modification times (equal, or reversed as after a copy); a tie goes
    to last.ckpt; each unreadable file is skipped with a warning naming it."""
    def save(name: str, step: int) -> None:
        torch.save({"state_dict": {}, "global_step": step, "loops": {}}, tmp_path / name)

    save("step_000004.ckpt", 4)
    save("step_000008.ckpt", 8)
    save("last.ckpt", 8)
    torch.save({"weights": torch.ones(1)}, tmp_path / "not_lightning.ckpt")
    (tmp_path / "broken.ckpt").write_bytes(b"not a zip file")
    names = ["last.ckpt", "step_000008.ckpt", "step_000004.ckpt", "broken.ckpt", "not_lightning.ckpt"]
    for mtimes in ([10**9] * len(names), [(i + 1) * 10**9 for i in range(len(names))]):  # all equal; oldest step newest
        for name, mtime in zip(names, mtimes):
            os.utime(tmp_path / name, ns=(mtime, mtime))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ddpm.checkpoints"):
            assert newest_valid_checkpoint(tmp_path) == tmp_path / "last.ckpt"
        skipped = sorted(r.getMessage() for r in caplog.records)
        assert len(skipped) == 2
        assert f"skipping unreadable checkpoint {tmp_path / 'broken.ckpt'}" in skipped[0]
        assert f"skipping unreadable checkpoint {tmp_path / 'not_lightning.ckpt'}" in skipped[1]
        assert "not a training checkpoint" in skipped[1]
    (tmp_path / "last.ckpt").unlink()
    assert newest_valid_checkpoint(tmp_path) == tmp_path / "step_000008.ckpt"


def train_loader(num_workers: int = 0, seed: int = 0, hflip: bool = False) -> ResumableLoader:
    """The digits training loader as Lightning gets it (arguments captured, so it can re-create it), seeded by `seed`
    (the run's seed, which also resets the global random state, as a fresh process's seed_everything does)."""
    torch.manual_seed(seed)
    datamodule = ImageDataModule(batch_size=128, num_workers=num_workers, hflip=hflip)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        return datamodule.train_dataloader()


def labels(batches: Any) -> list[torch.Tensor]:
    return [y for _, y in batches]


def served(batches: Any, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The next `n` (all if None) batches (images, labels) of a loader or iterator, copied, each followed by a draw
    from the global torch random state, as a training step draws its noise after each batch."""
    out = []
    for x, y in itertools.islice(batches, n):
        out.append((x.clone(), y.clone()))
        torch.randn(4)
    return out


def weights_only(state: dict[str, Any]) -> dict[str, Any]:
    """`state` through torch.save and torch.load(weights_only=True), as a checkpoint carries it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_where_it_stopped(num_workers: int) -> None:
    """A loader that loads the state of one stopped after 4 batches of its second pass serves that pass's other 7
    batches, as the uninterrupted one does, then the same third pass; with worker processes too. A new iterator over a
    pass left unfinished continues it. The state loads with weights_only=True. The order is a function of the seed."""
    loader = train_loader(num_workers)
    assert len(loader) == 11
    passes = [labels(loader) for _ in range(3)]
    assert not torch.equal(passes[0][0], passes[1][0])

    stopped = train_loader(num_workers)
    labels(stopped)
    batches = iter(stopped)
    first = [next(batches)[1] for _ in range(4)]
    state = weights_only(stopped.state_dict())
    assert (state["epoch"], state["batches"]) == (1, 4)
    assert_equal(first + labels(stopped), passes[1])  # a new iterator: the rest of the unfinished pass

    resumed = train_loader(num_workers)
    resumed.load_state_dict(state)
    assert_equal(first + labels(resumed), passes[1])
    assert_equal(labels(resumed), passes[2])
    assert not torch.equal(labels(train_loader(num_workers, seed=1))[0], passes[0][0])


def test_loader_resumes_the_flips_of_batches_read_by_workers() -> None:
    """With hflip and 2 worker processes (persistent, as in training), a loader stopped right after the 4th batch of
    its second pass (its state taken there, as Lightning takes it after a batch's step) and a fresh loader that loads
    that state serve, bitwise in images (flips included) and labels, the batches the uninterrupted loader serves: the
    rest of that pass, then the whole third. The flips are drawn in the main process from the global random state
    the state restores, so neither the workers' seeds nor which worker reads which batch matters."""
    loader = train_loader(num_workers=2, hflip=True)
    passes = [served(loader) for _ in range(3)]

    stopped = train_loader(num_workers=2, hflip=True)
    served(stopped)
    first = served(iter(stopped), 4)
    state = weights_only(stopped.state_dict())
    assert (state["epoch"], state["batches"]) == (1, 4)

    resumed = train_loader(num_workers=2, hflip=True)
    resumed.load_state_dict(state)
    torch.rand(5)  # what runs between the load and the first batch
    assert_equal(first + served(resumed), passes[1])
    assert_equal(served(resumed), passes[2])


def test_flips_happen_on_the_training_split_only() -> None:
    """With hflip, each training image is served either as it is or mirrored along its width, about half of them
    mirrored (the same order as without hflip: flips draw nothing the order depends on); the validation loader and
    the reference images (dataset_images) are the images as they are, and the datasets hold no flip setting."""
    flipping, plain = train_loader(hflip=True), train_loader(hflip=False)
    assert (flipping.hflip, plain.hflip) == (True, False)
    mirrored = total = 0
    for (x, y), (x0, y0) in zip(served(flipping), served(plain)):
        assert torch.equal(y, y0)
        same = (x == x0).flatten(1).all(1)
        flipped = (x == x0.flip(-1)).flatten(1).all(1)
        assert (same | flipped).all()
        mirrored, total = mirrored + int((flipped & ~same).sum()), total + len(x)
    assert 0.4 < mirrored / total < 0.6, (mirrored, total)

    datamodule = ImageDataModule(batch_size=128, hflip=True)
    val = datamodule.val_dataloader()
    assert not isinstance(val, ResumableLoader) and not hasattr(datamodule.val_set, "hflip")
    assert torch.equal(torch.cat([x for x, _ in val]), datamodule.val_set.images)
    assert not hasattr(datamodule.train_set, "hflip")
    assert torch.equal(dataset_images(datamodule.train_set), datamodule.train_set.images)


def test_loader_restores_the_random_states_at_the_first_batch() -> None:
    """The global random states (torch, numpy, python) saved with the position are back when the resumed loader
    serves its first batch, whatever was drawn between the load and that batch."""
    stopped = train_loader()
    batches = iter(stopped)
    next(batches)
    state = stopped.state_dict()
    expected = (torch.rand(3), torch.from_numpy(np.random.rand(3)), [random.random() for _ in range(3)])

    resumed = train_loader()
    resumed.load_state_dict(state)
    batches = iter(resumed)
    torch.rand(5), np.random.rand(5), random.random()  # what runs between the load and the first batch
    next(batches)
    assert_equal((torch.rand(3), torch.from_numpy(np.random.rand(3)), [random.random() for _ in range(3)]), expected)


def test_loader_under_ddp_gives_each_rank_its_part_and_resumes() -> None:
    """Re-created by Lightning around the DistributedSampler it injects (2 ranks), the loaders keep their class and
    their flips, serve disjoint halves of the data, and a rank resumed after 3 batches serves what it would have,
    flips included. A loader built without Lightning's argument capture is re-created with its flips too."""
    loader = train_loader(hflip=True)
    n = len(loader.dataset)

    def rank(r: int, of: ResumableLoader = loader) -> ResumableLoader:
        return _update_dataloader(of, DistributedSampler(of.dataset, num_replicas=2, rank=r, shuffle=True, seed=0))

    ranks = [rank(0), rank(1)]
    assert all(type(dl) is ResumableLoader and isinstance(dl.batch_sampler.sampler, DistributedSampler) for dl in ranks)
    assert all(dl.hflip is True for dl in ranks)
    indices = [[i for batch in dl.batch_sampler for i in batch] for dl in ranks]
    assert not set(indices[0]) & set(indices[1]) and len(indices[0]) == len(indices[1]) == (n // 2) // 128 * 128
    torch.manual_seed(0)
    uninterrupted = served(ranks[1])
    torch.manual_seed(0)
    stopped = rank(1)
    served(iter(stopped), 3)
    resumed = rank(1)
    resumed.load_state_dict(stopped.state_dict())
    assert_equal(served(resumed), uninterrupted[3:])

    unwrapped = ImageDataModule(batch_size=128, hflip=True).train_dataloader()
    assert rank(1, unwrapped).hflip is True


class FakeTrainer(SimpleNamespace):
    """What configure_optimizers and on_load_checkpoint read of a Trainer."""

    def __init__(self, max_steps: int) -> None:
        super().__init__(max_steps=max_steps, is_global_zero=True, precision_plugin=None, gradient_clip_val=None)


def lr_factors(module: DiffusionModule, steps: range) -> list[float]:
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    return [scheduler.lr_lambdas[0](step) for step in steps]


@pytest.mark.parametrize("decay", [d for d in get_args(LrDecay) if d != "none"])
def test_resume_keeps_the_first_learning_rate_curve(decay: str, capsys: pytest.CaptureFixture) -> None:
    """lr_decay ends at the run's first trainer.max_steps, which checkpoints keep: a resume that stops earlier follows
    the first curve and says so in one line; one that would train past the curve's end (lr 0) is refused."""

    def module(max_steps: int, lr_decay: str = decay) -> DiffusionModule:
        m = DiffusionModule(unet=TINY_UNET, timesteps=10, sample_steps=5, warmup_steps=1, lr_decay=lr_decay)
        m._trainer = FakeTrainer(max_steps=max_steps)
        return m

    first = module(4)
    curve = lr_factors(first, range(5))
    assert curve == [lr_factor(step, warmup=1, decay=decay, total=4) for step in range(5)] and curve[-1] == 0.0
    checkpoint: dict[str, Any] = {}
    first.on_save_checkpoint(checkpoint)
    assert checkpoint[LR_HORIZON] == 4

    resumed = module(3)
    resumed.on_load_checkpoint(checkpoint)
    assert lr_factors(resumed, range(5)) == curve  # not the curve of a 3-step run
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"note: trainer.max_steps=3 stops before the end of this run's lr_decay={decay} curve, which keeps its end at step 4"]

    for longer in (8, -1):
        with pytest.raises(ConfigError, match=rf"^trainer.max_steps={longer} goes past the end of this run's lr_decay={decay} curve, which reaches lr 0 at step 4"):
            module(longer).on_load_checkpoint(checkpoint)

    constant = module(8, lr_decay="none")
    constant.on_load_checkpoint(checkpoint)  # lr_decay=none: a longer leg is just more steps
    assert lr_factors(constant, range(6)) == [1.0] * 6 and capsys.readouterr().err == ""
