"""Test-only Lightning callbacks that tests/test_faults.py adds to a train.py subprocess with Hydra overrides
(`+callbacks.<key>._target_=fault_hooks.<Class>`, with tests/ on PYTHONPATH): they inject faults and record
what a test cannot see from outside the process. Nothing in src/ knows about them."""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ddpm import sample_callbacks
from ddpm.callbacks import EMA, ema_module
from ddpm.errors import ConfigError


class InjectNaN(Callback):
    """Fill the images of training step `at_step` (counted from 1) with nan, so that step's loss is nan."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step + 1 == self.at_step:
            batch[0].fill_(float("nan"))


class RecordStep(Callback):
    """Write `trainer.global_step` to `path` after every training step: the step a killed process had reached.

    Atomically (a temporary file in the same folder, then os.replace): a reader, or a kill -9 at any moment,
    sees the previous step or the new one, never an empty or half-written file.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self.tmp.write_text(str(trainer.global_step))
        os.replace(self.tmp, self.path)


class SaveEMAAtStart(Callback):
    """torch.save the EMA weights (the averaged module's state_dict) and global_step when training starts,
    i.e. right after a resumed run restored them."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        torch.save({"global_step": trainer.global_step, "state_dict": ema.averaged_module.state_dict()}, self.path)


class FailOnRank(Callback):
    """Make one step of the grid or the evaluation fail on global rank `rank` only, from training start, while the
    other ranks go on to the next collective:
    - where=score: the evaluator (built on rank 0 at fit start) raises RuntimeError(`message`);
    - where=sample: the module's sampling raises ConfigError(`message`), a user error;
    - where=grid: writing the grid PNG raises OSError(ENOSPC, `message`), a full disk.
    Each rank writes to `dirpath` its pid at fit start (`pid_<global rank>`) and, when the trainer hands it the
    exception that ends fit, `error_<global rank>`: the time.time() it got it, then `<type>: <first line>`."""

    def __init__(self, dirpath: str, rank: int, where: str, message: str = "injected failure") -> None:
        assert where in ("score", "sample", "grid"), where
        self.dirpath, self.rank, self.where, self.message = Path(dirpath), rank, where, message

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"pid_{trainer.global_rank}").write_text(str(os.getpid()))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != self.rank:
            return

        def fail(*args: Any, **kwargs: Any) -> Any:
            if self.where == "sample":
                raise ConfigError(self.message)
            if self.where == "grid":
                raise OSError(errno.ENOSPC, self.message)
            raise RuntimeError(self.message)

        if self.where == "score":
            next(c for c in trainer.callbacks if isinstance(c, sample_callbacks.Evaluation))._evaluator = fail
        elif self.where == "sample":
            for module in (pl_module, ema_module(trainer, pl_module)):
                module.sample = fail
        else:
            sample_callbacks.save_grid = fail  # this process's only: the rank writes no grid

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        line = str(exception).strip().split("\n")[0]
        (self.dirpath / f"error_{trainer.global_rank}").write_text(f"{time.time()}\n{type(exception).__name__}: {line}")
