"""Lightning callbacks for diffusion training: the EMA of the weights, and checkpoints that end where training ends.

EMA is Lightning's `WeightAveraging` with torch's `get_ema_multi_avg_fn` (no hand-written average).
Only parameters are averaged (`use_buffers=False`): the schedule constants of GaussianDiffusion are
buffers, and the averaged copy keeps them in sync with the live model instead of averaging them.

What `WeightAveraging` does with checkpoints (lightning/pytorch/callbacks/weight_averaging.py): it
writes the EMA weights to `state_dict` and the live weights to `current_model_state` (plus
`averaging_state`), and on resume restores both. So `DiffusionModule.load_from_checkpoint` gives the
EMA model, and `load_module(path, use_ema=False)` (ddpm.checkpoints) the live one.

Faults (docs/reliability.md): `Checkpoint` also saves when Lightning stops on
SIGTERM (its signal connector raises `SIGTERMException` at the end of the current step) and turns the
first Ctrl-C into the same stop; `NonFiniteGuard` stops training at a non-finite loss and refuses to save
a checkpoint whose state is not finite, so the last good checkpoint stays.

`RunRecord` keeps `<run dir>/run.json`, what ddpm.report summarizes. `CompileTime` reports what torch.compile cost (train.py compile=true). Sample grids and evaluation during
training, which draw from `ema_module`, are callbacks too: ddpm.sample_callbacks.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, WeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ddpm.atomic import write_text_atomic
from ddpm.checkpoints import checkpoint_problem, checkpoint_step
from ddpm.errors import ConfigError
from ddpm.report import RECORD, read_record


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
        # WeightAveraging reads only pl_module.parameters() here; the average keeps the dtype it was copied in
        # (float32, before Lightning casts the module for bf16-true / 16-true), so it sees the weights cast to it
        super().on_train_batch_end(trainer, _CastParameters(pl_module, self.averaged_module), *args, **kwargs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the live weights in the module after fit (WeightAveraging would copy the EMA over them).

        The EMA weights stay in `averaged_module` and in every checkpoint's `state_dict`; copying them
        over the live ones here would make a checkpoint saved at the end store EMA as the live state.
        """

    @property
    def averaged_module(self) -> pl.LightningModule | None:
        """The module holding the EMA weights (a copy of the LightningModule), or None outside fit."""
        return None if self._average_model is None else self._average_model.module


def ema_module(trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> pl.LightningModule:
    """The module holding the EMA weights while an EMA callback of `trainer` is fitting, else `pl_module` (the live weights).

    What the sample grids and evaluation during training draw from (ddpm.sample_callbacks).
    """
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, EMA) and callback.averaged_module is not None:
            return callback.averaged_module
    return pl_module


class _CastParameters:
    """`module.parameters()` cast to the dtypes of `like`'s parameters, and its buffers: what AveragedModel.update_parameters reads.

    An average kept in float32 does not lose the (1 - decay) updates to bf16's 8-bit mantissa, and torch's
    foreach EMA update needs both lists in one dtype (fp16 weights with a float32 average fail otherwise)."""

    def __init__(self, module: torch.nn.Module, like: torch.nn.Module | None) -> None:
        self.module, self.like = module, like

    def parameters(self) -> Iterator[torch.Tensor]:
        dtypes = (p.dtype for p in self.like.parameters()) if self.like is not None else None
        for p in self.module.parameters():
            yield p if dtypes is None else p.to(next(dtypes))

    def buffers(self) -> Iterator[torch.Tensor]:
        return self.module.buffers()


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves `last.ckpt` when fit ends between two `every_n_train_steps` (max_steps,
    max_time) and when it is stopped by SIGTERM or Ctrl-C, so `last.ckpt` holds the state at the stop and a
    resumed run counts on from there.

    SIGTERM: Lightning's signal connector sets `trainer.received_sigterm`; the loop finishes the current step
    and raises `SIGTERMException`, and `on_exception` saves then (the step is complete, so the state is
    consistent). The first Ctrl-C (SIGINT) during training is handed to that same SIGTERM handler; a second
    one raises KeyboardInterrupt at once and saves nothing. Other exceptions save nothing either: a failing
    run never overwrites the last good checkpoint.

    After the stop, `stop_signal` is the signal (SIGTERM or SIGINT) and `stop_checkpoint` the file that
    holds the state at the stop (None when the run stopped before its first step).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_signal: signal.Signals | None = None
        self.stop_checkpoint: str | None = None
        self._sigint_before: Any = None
        self._sigint_installed = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # a resumed state is on disk already: nothing to save until a step is taken
        self._last_global_step_saved = trainer.global_step
        resumed_from = Path(trainer.ckpt_path).resolve().parent if trainer.ckpt_path is not None else None
        if not self.last_model_path and self.dirpath is not None and resumed_from == Path(self.dirpath).resolve():
            # Lightning restores last_model_path only from a checkpoint written in this very folder after its first
            # last.ckpt (not from an earlier step_*.ckpt, nor in a copied or moved run dir), and would otherwise write
            # last-v1.ckpt beside last.ckpt; replace last.ckpt instead when it holds nothing readable (missing,
            # truncated) or no later step than the resumed state, so no later training is lost
            last = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
            if checkpoint_problem(last) is not None or (checkpoint_step(last) or 0) <= trainer.global_step:
                self.last_model_path = last
        on_sigterm = signal.getsignal(signal.SIGTERM)
        # one handler per run: with several Checkpoints (callbacks=best_fid) the first installs it; a second one
        # chaining onto the first would put the first's handler back when it tears down after the first did
        installed = any(isinstance(c, Checkpoint) and c._sigint_installed for c in trainer.callbacks)
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread() and not installed:
            self._sigint_before = signal.signal(signal.SIGINT, lambda signum, frame: self._on_sigint(on_sigterm, frame))
            self._sigint_installed = True

    def _on_sigint(self, on_sigterm: Any, frame: FrameType | None) -> None:
        self._restore_sigint()  # a second Ctrl-C interrupts at once
        self.stop_signal = signal.SIGINT
        on_sigterm(signal.SIGTERM, frame)

    def _restore_sigint(self) -> None:
        if self._sigint_installed and self._sigint_before is not None:  # None: a handler installed outside Python
            signal.signal(signal.SIGINT, self._sigint_before)
        self._sigint_before = None
        self._sigint_installed = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return
        self.stop_signal = self.stop_signal or signal.SIGTERM
        if not self._should_skip_saving_checkpoint(trainer):
            # only last.ckpt, not a step_*.ckpt too: one write within the grace period
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self._last_global_step_saved == trainer.global_step:  # saved now, by this step's periodic save, or resumed here
            self.stop_checkpoint = self._last_checkpoint_saved or trainer.ckpt_path

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()
        super().teardown(trainer, pl_module, stage)


NONE = torch.iinfo(torch.int64).max  # NonFiniteGuard's "no non-finite step yet"


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or non-finite weights; the message names the step."""


class NonFiniteGuard(Callback):
    """Stop training at a non-finite (nan or inf) loss, and never let a non-finite state into a checkpoint.

    Each step records on the device whether the loss is finite (no host sync). Every `check_every_n_steps`
    steps, before the backward pass, the record is read (one sync, and a gather across DDP ranks) and the
    first non-finite step raises NonFiniteError: with 1, the step whose loss is not finite never reaches
    the weights. Before every checkpoint save the record and the weights are checked too, whatever
    `check_every_n_steps` is, so a larger value only delays the stop: a checkpoint is never written from a
    non-finite state, and `last.ckpt` keeps the last good one. Steps are counted from 1 (step k is the one
    after which `global_step` is k, as in `step_<k>.ckpt`).

    With 16-mixed precision, the GradScaler already skips optimizer steps whose gradients overflow while
    the loss stays finite (and lowers its scale); those do not stop the run.

    Args:
        check_every_n_steps: read the record every this many steps (1: every step; on a GPU a larger value
            saves a host sync per step).
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        if not (isinstance(check_every_n_steps, int) and check_every_n_steps >= 1):
            raise ConfigError(
                f"callbacks.nonfinite_guard.check_every_n_steps={check_every_n_steps!r} is invalid: expected an integer >= 1"
            )
        self.check_every_n_steps = check_every_n_steps
        # on the device: the first step whose loss was not finite (NONE if none yet), and that loss
        self._bad_step: torch.Tensor | None = None
        self._bad_loss: torch.Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bad_step = torch.tensor(NONE, device=pl_module.device)
        self._bad_loss = torch.tensor(0.0, device=pl_module.device)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        assert self._bad_step is not None and self._bad_loss is not None
        step = trainer.global_step + 1
        loss = loss.detach().float()
        first_bad = ~torch.isfinite(loss) & (self._bad_step == NONE)  # device ops only: no host sync
        self._bad_step = torch.where(first_bad, step, self._bad_step)
        self._bad_loss = torch.where(first_bad, loss, self._bad_loss)
        if step % self.check_every_n_steps == 0:
            self._raise_if_recorded(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._bad_step is not None:
            self._raise_if_recorded(trainer)
        if not torch.stack([torch.isfinite(p).all() for p in pl_module.parameters()]).all():
            raise NonFiniteError(f"non-finite weights at step {trainer.global_step}; not saving them")

    def _raise_if_recorded(self, trainer: pl.Trainer) -> None:
        steps = trainer.strategy.all_gather(self._bad_step).reshape(-1)  # (ranks,)
        losses = trainer.strategy.all_gather(self._bad_loss).reshape(-1)
        first = int(steps.argmin())
        if int(steps[first]) != NONE:
            raise NonFiniteError(f"non-finite loss ({float(losses[first])}) at step {int(steps[first])}")


class CompileTime(Callback):
    """What torch.compile cost (DiffusionModule.compile_unet compiles in the first training step): the first step's
    wall time minus the second's, printed once by rank 0 and logged as `perf/compile_s`; kept in `seconds`."""

    def __init__(self) -> None:
        self._steps: list[float] = []
        self._start = 0.0
        self.seconds: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if len(self._steps) >= 2:
            return
        self._steps.append(time.perf_counter() - self._start)
        if len(self._steps) < 2:
            return
        first, second = self._steps
        self.seconds = max(first - second, 0.0)
        if trainer.is_global_zero:
            print(f"torch.compile: {self.seconds:.1f} s (first training step {first:.1f} s, second {second:.3f} s)")
            for logger in trainer.loggers:
                logger.log_metrics({"perf/compile_s": self.seconds}, step=trainer.global_step)


def _scalar(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):  # a tensor of more than one element
        return None
    return v if math.isfinite(v) else None


class RunRecord(Callback):
    """Keep `<run dir>/run.json` up to date (rank 0): status, step, wall time, last values and history of every
    logged scalar. Listed after the evaluation callback, so an evaluation step's `val/*` metrics are seen in it.
    Reads the logged values every `trainer.log_every_n_steps` steps (one host sync then), never in between.
    Written whole or not at all (ddpm.atomic); a write that fails (a full disk) is warned about once and training
    goes on: the record is a report, and the next write brings it up to date."""

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.path = Path(dirpath) / RECORD
        self.record: dict[str, Any] = {}
        self._seen: dict[str, Any] = {}  # metric -> the value object last recorded (held, so a new one is never the same object)
        self._start = 0.0
        self._wall_before = 0.0
        self._warned = False  # about a failed write: once per run

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        previous = {}
        if self.path.is_file():  # a resumed run continues its record; a damaged one is a report lost, not a reason to stop
            try:
                previous = read_record(self.path)
            except ConfigError as e:
                print(f"warning: {e}; starting a new record", file=sys.stderr)
        step = trainer.global_step  # the resumed step (0 for a fresh run): the loops are restored by now
        history = {k: [p for p in v if p[0] <= step] for k, v in previous.get("history", {}).items()}
        self._wall_before = previous.get("wall_s", 0.0) if step else 0.0
        self._start = time.time()
        self.record = {"status": "running", "error": None, "step": step, "wall_s": self._wall_before,
                       "started": previous.get("started") if step else None, "pid": os.getpid(),
                       "last": {k: v[-1][1] for k, v in history.items() if v}, "history": history}  # fmt: skip
        self.record["started"] = self.record["started"] or time.strftime("%Y-%m-%dT%H:%M:%S")
        self._save(trainer)

    def _take(self, trainer: pl.Trainer, prefixes: tuple[str, ...], only_new: bool) -> bool:
        step, taken = trainer.global_step, False
        for name, value in trainer.callback_metrics.items():
            if not name.startswith(prefixes) or (only_new and self._seen.get(name) is value):
                continue
            v = _scalar(value)
            self._seen[name] = value
            if v is None:
                continue
            series = self.record["history"].setdefault(name, [])
            if series and series[-1][0] == step:
                series[-1] = [step, v]
            else:
                series.append([step, v])
            self.record["last"][name] = v
            taken = True
        return taken

    def _save(self, trainer: pl.Trainer, status: str | None = None, error: str | None = None) -> None:
        if status:
            self.record["status"], self.record["error"] = status, error
        self.record["step"] = trainer.global_step
        self.record["wall_s"] = round(self._wall_before + time.time() - self._start, 2)
        self.record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            write_text_atomic(self.path, json.dumps(self.record, indent=1))
        except OSError as e:
            if not self._warned:
                print(f"warning: cannot write {self.path} ({e.strerror or e}); training goes on, the next write will retry", file=sys.stderr)
                self._warned = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._take(trainer, ("train/", "lr"), only_new=False)
            self._take(trainer, ("val/",), only_new=True)  # an evaluation at this step
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and self.record:
            if self._take(trainer, ("val/",), only_new=True):
                self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.record:
            self._take(trainer, ("train/", "lr"), only_new=False)
            self._take(trainer, ("val/",), only_new=True)
            self._save(trainer, "finished")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and self.record:
            stopped = isinstance(exception, (SIGTERMException, KeyboardInterrupt))
            self._save(trainer, "stopped" if stopped else "failed", None if stopped else f"{type(exception).__name__}: {exception}".splitlines()[0])
