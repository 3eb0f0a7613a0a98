"""Test-only Lightning callbacks that tests/test_faults.py adds to a train.py subprocess with Hydra overrides
(`+callbacks.<key>._target_=fault_hooks.<Class>`, with tests/ on PYTHONPATH): they inject faults and record
what a test cannot see from outside the process. Nothing in src/ knows about them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ddpm.callbacks import EMA


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
