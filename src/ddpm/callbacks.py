"""Lightning callbacks for diffusion training: the EMA of the weights, and checkpoints that end where training ends.

EMA is Lightning's `WeightAveraging` with torch's `get_ema_multi_avg_fn` (no hand-written average).
Only parameters are averaged (`use_buffers=False`): the schedule constants of GaussianDiffusion are
buffers, and the averaged copy keeps them in sync with the live model instead of averaging them.

What `WeightAveraging` does with checkpoints (lightning/pytorch/callbacks/weight_averaging.py): it
writes the EMA weights to `state_dict` and the live weights to `current_model_state` (plus
`averaging_state`), and on resume restores both. So `DiffusionModule.load_from_checkpoint` gives the
EMA model, and `load_module(path, use_ema=False)` (ddpm.module) the live one.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ddpm.config import ConfigError


class EMA(WeightAveraging):
    """Exponential moving average of the parameters, updated after every optimizer step.

    Args:
        decay: the EMA decay (Ho et al. 2020 use 0.9999).
        warmup: ramp the decay as min(decay, (1 + n) / (10 + n)) over the n-th update (as in
            TensorFlow's ExponentialMovingAverage with num_updates), so short runs are not dominated
            by the random init; the paper's setup has no ramp.
        start_step: first optimizer step (0-based) that updates the average; before it the average
            copies the weights.
        device: where the averaged copy lives (None: with the model; "cpu" saves GPU memory).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = False, start_step: int = 0, device: str | None = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"callbacks.ema.decay={decay!r} is invalid: expected a number in [0, 1]")
        super().__init__(device=device, use_buffers=False, multi_avg_fn=self._update)
        self.decay, self.warmup, self.start_step = decay, warmup, start_step
        self._step = 0

    def decay_at(self, step: int) -> float:
        """The decay used for the update after optimizer step `step` (0-based)."""
        if step < self.start_step:
            return 0.0
        if self.warmup:
            n = step - self.start_step
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    def _update(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        get_ema_multi_avg_fn(self.decay_at(self._step))(ema_params, params, n_averaged)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._step = trainer.global_step - 1  # the step just taken, 0-based (as WeightAveraging's step_idx)
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the live weights in the module after fit (WeightAveraging would copy the EMA over them).

        The EMA weights stay in `averaged_module` and in every checkpoint's `state_dict`; copying them
        over the live ones here would make a checkpoint saved at the end store EMA as the live state.
        """

    @property
    def averaged_module(self) -> pl.LightningModule | None:
        """The module holding the EMA weights (a copy of the LightningModule), or None outside fit."""
        return None if self._average_model is None else self._average_model.module


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves when fit ends between two `every_n_train_steps` (max_steps, max_time,
    Ctrl-C), so `last.ckpt` always holds the final state and a resumed run counts on from there."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
