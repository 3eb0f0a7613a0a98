"""Sample grids and evaluation during training: Lightning callbacks that run on every rank.

`SampleGrid` writes `<run dir>/samples/step_<6-digit step>.png` (and the logger's image) every `every_n_steps`
optimizer steps and at the end of training. `Evaluation` scores `n` samples against the datamodule's val split
(ddpm.metrics: FID and its floor, KID, ...) and the held-out bits/dim, every `every_n_steps` steps and at the end,
and sets `val/<metric>` in `trainer.callback_metrics` on every rank, so a ModelCheckpoint can monitor `val/fid`.
Both draw from the EMA weights (ddpm.callbacks.ema_module) after the EMA callback's update of the step; list them
after it (conf/callbacks/default.yaml does; `setup` refuses the other order). train.py builds them from the
`module.sample_*` and `module.eval_*` keys (conf/callbacks/default.yaml interpolates them).

How the ranks share the work (`draw_samples`, `Evaluation.heldout_bits_per_dim`):
- The samples are fixed chunks of `chunk_size`: chunk k is drawn from seed `seed + k * chunk_size` (its class labels,
  for a conditional model, are k * chunk_size, ... mod num_classes) by rank k % world_size. The sample set is the
  same whatever the number of ranks; a grid of at most `chunk_size` images is `module.sample(n, seed=seed)`.
- Every rank runs the same number of rounds. Each round's chunks are padded to one shape and gathered with
  `trainer.strategy.all_gather`; global rank 0 keeps them (in chunk order) and scores them: the evaluator, with its
  reference features, is built there only. The scores are broadcast (`trainer.strategy.broadcast`).
- Under FSDP every forward all-gathers sharded weights, so every rank must run it: a rank without a chunk in the last
  round draws a throwaway one, and the sharded module is called through the FSDP wrapper's forward (Lightning's
  forward redirection, as for training_step). Under DDP such a rank goes straight to the gather.
- bits/dim splits the held-out images (and their labels: a class-conditional model is scored given them) into chunks
  the same way, chunk k with noise seeded `seed + k`; the per-image values are gathered and averaged on rank 0.
- A failure on one rank stops every rank at once (`_together`): each round's drawing on every rank, and each step only
  global rank 0 takes (building the evaluator, scoring, writing and logging the grid or the scores), is followed by
  a verdict shared by all ranks before anyone goes on, and every rank raises the same error. Without it, the other
  ranks would wait in the next collective (a gather, the scores' broadcast, DDP's gradient all-reduce) until the
  process group's timeout, 30 minutes by default.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

from ddpm.callbacks import EMA, ema_module
from ddpm.diffusion import Spacing
from ddpm.errors import ConfigError, Failure
from ddpm.evaluation import SAMPLE_METRICS, build_evaluator, datamodule_images, dataset_images, dataset_labels, validate_metrics
from ddpm.images import make_grid, save_grid, to_uint8
from ddpm.metrics import Metric
from ddpm.samplers import SAMPLERS

def _check_int(key: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{key}={value!r} is invalid: expected an integer >= {least}")
    return value


def _check_sampler(key: str, sampler: str, steps: int | None, spacing: str | None) -> None:
    if sampler not in SAMPLERS:
        raise ConfigError(f"{key}.sampler={sampler!r} is invalid: expected one of {', '.join(sorted(SAMPLERS))}")
    if steps is not None:
        _check_int(f"{key}.steps", steps, 1)
    if spacing is not None and spacing not in get_args(Spacing):
        raise ConfigError(f"{key}.spacing={spacing!r} is invalid: expected null or {' | '.join(get_args(Spacing))}")


def _is_fsdp(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def _call(trainer: pl.Trainer, module: pl.LightningModule, method: str, *args: Any, **kwargs: Any) -> Any:
    """module.<method>(*args, **kwargs); for the FSDP-sharded training module, through the wrapper's forward, which
    gathers the root's weights (the inner units gather theirs at each of their forwards)."""
    strategy = trainer.strategy
    if _is_fsdp(trainer) and module is trainer.lightning_module and strategy.model is not module:
        return strategy._forward_redirection(strategy.model, module, method, *args, **kwargs)
    return getattr(module, method)(*args, **kwargs)


T = TypeVar("T")


def _together(trainer: pl.Trainer, work: Callable[[], T]) -> T:
    """`work()` on this rank, then a verdict shared by every rank: its value when no rank raised, else every rank raises
    the error of the lowest rank that did (`Failure.exception`; that rank chains its original, with its traceback).

    Every rank must call it, at the same point (module docstring): a flag per rank is gathered (one small collective),
    and only after a failure does the failing rank broadcast its error. One process re-raises its own error unchanged.
    """
    error: Exception | None = None
    value: Any = None
    try:
        value = work()
    except Exception as e:
        error = e
    if trainer.world_size == 1:
        if error is not None:
            raise error
        return value
    flag = torch.tensor([error is not None], dtype=torch.int32, device=trainer.strategy.root_device)
    failed = trainer.strategy.all_gather(flag).reshape(-1)  # (world,)
    if not failed.any():
        return value
    source = int(failed.nonzero()[0])
    mine = None if error is None else Failure.of(error, trainer.global_rank)
    failure: Failure = trainer.strategy.broadcast(mine, src=source)
    raise failure.exception() from error


Work = Callable[[int | None, int, int], Tensor]  # (chunk index or None for a throwaway, first row, rows) -> values


def _gather_rounds(trainer: pl.Trainer, count: int, chunk_size: int, work: Work, shape: tuple[int, ...]) -> Tensor | None:
    """Run `work(k, start, size)` for chunks k = 0 .. ceil(count / chunk_size) - 1, round robin over the ranks, and
    gather the results, (size, *shape) each, on global rank 0: (count, *shape) float32 on the CPU there, None elsewhere.

    `work(None, 0, 1)`: a rank's throwaway call in a round without a chunk for it, made under FSDP only.
    """
    world, rank = trainer.world_size, trainer.global_rank
    chunks = math.ceil(count / chunk_size)
    fsdp = _is_fsdp(trainer)
    kept: list[Tensor] = []
    device = trainer.strategy.root_device
    for r in range(math.ceil(chunks / world)):
        k = r * world + rank
        buffer = torch.zeros(chunk_size, *shape, device=device)

        def fill() -> None:
            if k < chunks:
                start = k * chunk_size
                size = min(chunk_size, count - start)
                buffer[:size] = work(k, start, size).to(device, torch.float32)
            elif fsdp:
                work(None, 0, 1)

        _together(trainer, fill)  # a rank that failed to draw stops every rank here, not in the gather
        gathered = trainer.strategy.all_gather(buffer)  # (world, chunk_size, *shape); one rank: (chunk_size, *shape)
        if rank == 0:
            kept.append(gathered.reshape(-1, *shape).cpu())
    if rank != 0:
        return None
    # rows are chunks 0, 1, 2, ... each padded to chunk_size: only the last real one is short, so the first
    # `count` rows are exactly the real values
    return torch.cat(kept)[:count]


def draw_samples(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    n: int,
    sampler: str = "ddim",
    steps: int | None = 50,
    seed: int = 0,
    chunk_size: int = 64,
    spacing: str | None = None,
) -> Tensor | None:
    """n samples (n, C, H, W) in [-1, 1] of `module` drawn over all ranks of `trainer`: chunk k from seed
    `seed + k * chunk_size` on rank k % world_size; all n (float32, CPU) on global rank 0, None on the others.
    `spacing`: where the `steps` timesteps lie (None: the sampler's default). Every rank must call it (it gathers)."""
    num_classes = module.unet.num_classes

    def work(k: int | None, start: int, size: int) -> Tensor:
        labels = None
        if num_classes is not None:
            labels = (torch.arange(size) + start) % num_classes
        chunk_seed = seed if k is None else seed + start
        return _call(trainer, module, "sample", size, sampler, steps, seed=chunk_seed, labels=labels, spacing=spacing)

    with torch.no_grad(), trainer.precision_plugin.forward_context():
        return _gather_rounds(trainer, n, chunk_size, work, tuple(module.image_shape))


def _check_ema_first(trainer: pl.Trainer, callback: Callback) -> None:
    """The EMA callback must update the average before `callback` samples it, in the same on_train_batch_end."""
    callbacks = list(trainer.callbacks)
    if callback in callbacks and any(isinstance(c, EMA) for c in callbacks[callbacks.index(callback) + 1 :]):
        raise ConfigError(
            f"callbacks: {type(callback).__name__} is listed before the EMA callback; list it after, so that it samples "
            "the EMA weights of the step just taken"
        )


class _EveryNSteps(Callback, ABC):
    """Calls `run(trainer, pl_module)` after every `every_n_steps`-th optimizer step (0: never); the micro-batches
    of gradient accumulation, which leave global_step unchanged, do not count."""

    every_n_steps: int
    _seen_step = -1  # the global step at the last on_train_batch_end: a new value means an optimizer step

    @abstractmethod
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The work done every `every_n_steps` optimizer steps, on every rank."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # a micro-batch of gradient accumulation: no optimizer step yet
            return
        self._seen_step = step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)


TABLE_COLUMNS = ("step", "sampler", "steps", "guidance_scale", "label", "image")  # SampleGrid's W&B Table


class SampleGrid(_EveryNSteps):
    """Every `every_n_steps` optimizer steps and at the end of training, draw a fixed-seed grid of `n` samples from the
    EMA weights on every rank, write `<default_root_dir>/samples/step_<6-digit step>.png` on global rank 0 and log it to
    the loggers that take images (W&B: the grid as `samples`, and each image as a row of the Table `sample_table`).
    `last_path`: the last grid written (rank 0).

    Args:
        every_n_steps: optimizer steps between grids (0: none, not even at the end).
        n: images in the grid.
        sampler, steps: the sampler (ddpm.samplers.SAMPLERS) and its number of steps (None: all T).
        spacing: where those steps lie, uniform | trailing | karras (None: the sampler's default).
        seed: the grid's noise, fixed so grids compare across steps, runs and world sizes.
        chunk_size: samples per sampling call and per seed (see the module docstring); a grid of at most this
            many images is drawn by one rank.
    """

    def __init__(
        self, every_n_steps: int = 1000, n: int = 64, sampler: str = "ddim", steps: int | None = 50, seed: int = 0,
        chunk_size: int = 64, spacing: str | None = None,
    ) -> None:  # fmt: skip
        self.every_n_steps = _check_int("callbacks.sample_grid.every_n_steps", every_n_steps, 0)
        self.n = _check_int("callbacks.sample_grid.n", n, 1)
        self.chunk_size = _check_int("callbacks.sample_grid.chunk_size", chunk_size, 1)
        _check_sampler("callbacks.sample_grid", sampler, steps, spacing)
        self.sampler, self.steps, self.seed, self.spacing = sampler, steps, seed, spacing
        self.last_path: Path | None = None
        self._last_step = -1  # the step of the last grid

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.every_n_steps:
            _check_ema_first(trainer, self)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        return self.draw(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps and trainer.global_step != self._last_step:
            self.draw(trainer, pl_module)

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Draw the grid of this step (every rank must call it); its path on global rank 0, None on the others."""
        step = self._last_step = trainer.global_step
        module = ema_module(trainer, pl_module)
        images = draw_samples(trainer, module, self.n, self.sampler, self.steps, self.seed, self.chunk_size, self.spacing)

        def write() -> Path | None:
            if images is None:
                return None
            path = save_grid(images, Path(trainer.default_root_dir) / "samples" / f"step_{step:06d}.png")
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):  # WandbLogger
                    logger.log_image(key="samples", images=[make_grid(images)], step=step, caption=[f"step {step}"])
                if hasattr(logger, "log_table"):  # WandbLogger: one row per image, to filter and compare across steps
                    logger.log_table(key="sample_table", columns=list(TABLE_COLUMNS), data=self.table_rows(module, images, step), step=step)
            return path

        path = _together(trainer, write)  # rank 0 writes; a full disk there stops every rank
        if path is not None:
            self.last_path = path
        return path

    def table_rows(self, module: pl.LightningModule, images: Tensor, step: int) -> list[list[Any]]:
        """Rows of TABLE_COLUMNS for a W&B Table: the step, sampler, steps, guidance scale (1: the grid is conditional
        on its labels without guidance), the label (None for an unconditional model) and the image."""
        import wandb

        classes = getattr(getattr(module, "unet", None), "num_classes", None)
        labels = [i % classes if classes else None for i in range(len(images))]
        pixels = to_uint8(images)  # (B, H, W, C)
        return [[step, self.sampler, self.steps, 1.0, label, wandb.Image(img[..., 0] if img.shape[-1] == 1 else img)]
                for label, img in zip(labels, pixels)]  # fmt: skip


def _evaluated_metric(monitor: str | None) -> str | None:
    """The evaluation metric a monitored key comes from (`val/fid_floor` -> fid), None for any other key (val/loss)."""
    if not monitor or not monitor.startswith("val/"):
        return None
    name = monitor[len("val/") :].split("_")[0]
    return name if name in get_args(Metric) else None


def check_monitored_checkpoints(callbacks: Mapping[str, Callback] | Sequence[Callback]) -> None:
    """Refuse (ConfigError) a ModelCheckpoint that monitors an evaluation metric (`val/fid`, ...) it could rank badly.

    Such a checkpoint needs an Evaluation callback with evaluation on that logs the metric, and must save on
    evaluation steps only (`every_n_train_steps` a multiple of the evaluation's, no `every_n_epochs` or
    `train_time_interval`): a save on another step would pair the weights of that step with the value of an earlier
    evaluation. `callbacks`: by config name (callbacks.<name>, as train.py has them) or a plain list.
    """
    named = list(callbacks.items()) if isinstance(callbacks, Mapping) else [(None, c) for c in callbacks]
    evaluation = next((c for _, c in named if isinstance(c, Evaluation)), None)
    every = evaluation.every_n_steps if evaluation is not None else 0
    for name, checkpoint in named:
        if not isinstance(checkpoint, ModelCheckpoint):
            continue
        metric = _evaluated_metric(checkpoint.monitor)
        if metric is None:
            continue
        where = f"callbacks.{name}.monitor={checkpoint.monitor}" if name else f"ModelCheckpoint(monitor={checkpoint.monitor!r})"
        prefix = f"callbacks.{name}." if name else ""
        if evaluation is None:
            raise ConfigError(f"{where} needs the evaluation callback (callbacks.evaluation, ddpm.sample_callbacks.Evaluation)")
        if not every:
            raise ConfigError(f"{where} needs evaluation during training: set module.eval_every_n_steps=N (now 0)")
        if metric not in evaluation.metrics:
            raise ConfigError(f"{where} is not evaluated: add {metric} to module.eval_metrics (now {list(evaluation.metrics)})")
        steps = checkpoint._every_n_train_steps
        if not steps or steps % every or checkpoint.every_n_epochs or checkpoint._train_time_interval is not None:
            raise ConfigError(
                f"{where} must save on evaluation steps only ({prefix}every_n_train_steps={steps or None}, "
                f"module.eval_every_n_steps={every}): set {prefix}every_n_train_steps to a multiple of {every}, "
                "without every_n_epochs or train_time_interval"
            )


class Evaluation(_EveryNSteps):
    """Every `every_n_steps` optimizer steps, and at the end of training when the last step was not one of them, score
    `n` samples of the EMA weights against the datamodule's val split (`metrics`: fid, kid, precision, recall, confidence, coverage; the
    FID/KID floors at the same count) and the val split's bits/dim (`bpd`), on every rank (module docstring).

    Every rank sets `val/<metric>` (and `val/fid_floor`, ...) in `trainer.callback_metrics` in the same step; global
    rank 0 sends them to the loggers once, at that step. `last_results`: the full results of the last evaluation.

    Checkpoints ranked by these metrics: Lightning calls ModelCheckpoint callbacks after all others in every hook
    (callback_connector._reorder_callbacks), so at step k this evaluation runs before a checkpoint saves, and at the
    end of training before ddpm.callbacks.Checkpoint.on_train_end ranks the final state. The values stay in
    callback_metrics until the next evaluation, so a monitored checkpoint must save on evaluation steps only:
    `check_monitored_checkpoints` refuses one that would not (train.py runs it before training starts, `setup`
    again), and `setup` sets `save_on_train_epoch_end` of such checkpoints (when unset), so Lightning does not postpone
    a save that falls on the last batch of an epoch to the next validation, which may come at a step without
    evaluation. Every state a monitored checkpoint ranks is thus ranked by its own evaluation; conf/callbacks/best_fid.yaml
    saves best.ckpt on every evaluation step.

    The evaluator (and the reference features) is built at fit start on global rank 0, so a missing extractor fails
    then; bits/dim needs the val images (and labels) on every rank.

    Args:
        every_n_steps: optimizer steps between evaluations (0: none).
        n: samples per evaluation (at least 2).
        metrics: any of fid, kid, precision, recall, confidence, coverage, bpd (ddpm.metrics).
        extractor: FID/KID features, "digits" or "inception"; inception_weights: its weights file (None: torch hub's cache).
        bpd_timesteps: timesteps of the stratified bits/dim estimate (None: all T; capped at T).
        sampler, steps: the sampler and its number of steps (None: all T).
        spacing: where those steps lie, uniform | trailing | karras (None: the sampler's default).
        seed: the samples' chunk k is drawn from seed + 1 + k * chunk_size; bits/dim's chunk k from seed + k.
        chunk_size: samples (and held-out images) per sampling call and per seed.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        n: int = 256,
        metrics: Iterable[str] = ("fid",),
        extractor: str = "digits",
        inception_weights: str | None = None,
        bpd_timesteps: int | None = 100,
        sampler: str = "ddim",
        steps: int | None = 50,
        seed: int = 0,
        chunk_size: int = 64,
        spacing: str | None = None,
    ) -> None:
        self.every_n_steps = _check_int("callbacks.evaluation.every_n_steps", every_n_steps, 0)
        self.n = _check_int("callbacks.evaluation.n", n, 2)
        self.chunk_size = _check_int("callbacks.evaluation.chunk_size", chunk_size, 1)
        self.metrics = validate_metrics(metrics, key="callbacks.evaluation.metrics")
        _check_sampler("callbacks.evaluation", sampler, steps, spacing)
        if bpd_timesteps is not None:
            _check_int("callbacks.evaluation.bpd_timesteps", bpd_timesteps, 1)
        self.extractor, self.inception_weights, self.bpd_timesteps = extractor, inception_weights, bpd_timesteps
        self.sampler, self.steps, self.seed, self.spacing = sampler, steps, seed, spacing
        self.last_results: dict[str, float] = {}
        self._evaluator: Any = None  # SampleEvaluator on global rank 0
        self._heldout: tuple[Tensor, Tensor] | None = None  # val images and labels, for bpd
        self._last_step = -1
        self._start_step = 0

    @property
    def sample_metrics(self) -> list[str]:
        return [m for m in self.metrics if m in SAMPLE_METRICS]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_monitored_checkpoints(trainer.callbacks)
        if not self.every_n_steps:
            return
        _check_ema_first(trainer, self)
        for checkpoint in trainer.checkpoint_callbacks:
            if isinstance(checkpoint, ModelCheckpoint) and _evaluated_metric(checkpoint.monitor) is not None:
                if checkpoint._save_on_train_epoch_end is None:
                    checkpoint._save_on_train_epoch_end = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The held-out data (every rank, for bpd) and the evaluator (global rank 0) from the datamodule's val
        (reference) and train (floor) splits: a missing extractor or weights file fails here, not at the first evaluation."""
        if self.every_n_steps:
            _together(trainer, lambda: self._prepare(trainer, pl_module))  # an evaluator that fails on rank 0 stops every rank

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_set"):
            raise ConfigError("module.eval_every_n_steps needs an ImageDataModule (its val split is the reference)")
        if trainer.is_global_zero and self.sample_metrics:
            val, train, dataset = datamodule_images(datamodule)
            self._evaluator = build_evaluator(
                val, train, self.sample_metrics, extractor=self.extractor, inception_weights=self.inception_weights,
                dataset=dataset, device=pl_module.device, key_prefix="module.eval_",
            )  # fmt: skip
        if "bpd" in self.metrics:
            datamodule.setup("fit")
            self._heldout = (dataset_images(datamodule.val_set), dataset_labels(datamodule.val_set))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_step = trainer.global_step

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        return self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self.every_n_steps and step != self._start_step and step != self._last_step:
            self.evaluate(trainer, pl_module, at_end=True)

    def heldout_bits_per_dim(self, trainer: pl.Trainer, module: pl.LightningModule) -> float | None:
        """Mean bits/dim of the val split (given its labels when the model is class-conditional), over all ranks;
        the value on global rank 0, None on the others."""
        assert self._heldout is not None
        images, labels = self._heldout
        T = module.diffusion.num_timesteps
        timesteps = None if self.bpd_timesteps is None else min(self.bpd_timesteps, T)
        conditional = module.unet.num_classes is not None

        def work(k: int | None, start: int, size: int) -> Tensor:
            generator = torch.Generator(device=module.diffusion.betas.device).manual_seed(self.seed + (k or 0))
            y = labels[start : start + size] if conditional else None
            return _call(trainer, module, "bits_per_dim", images[start : start + size], y, timesteps, generator)

        with torch.no_grad():  # in float32, outside the precision context: the likelihood is no place for bf16
            values = _gather_rounds(trainer, len(images), self.chunk_size, work, ())
        return None if values is None else float(values.double().mean())

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at_end: bool = False) -> dict[str, float]:
        """Evaluate the EMA weights now (every rank must call it) and set val/<metric>; the results on every rank.

        The loggers get the values at the logger step of the optimizer step just taken, as its train/loss (`at_end`:
        called after the loop counted that step).
        """
        self._last_step = trainer.global_step
        module = ema_module(trainer, pl_module)
        images = bpd = None
        if self.sample_metrics:
            images = draw_samples(trainer, module, self.n, self.sampler, self.steps, self.seed + 1, self.chunk_size, self.spacing)
        if "bpd" in self.metrics:
            bpd = self.heldout_bits_per_dim(trainer, module)

        def score() -> dict[str, float]:
            """The results on global rank 0, sent to the loggers there; {} on the others."""
            results: dict[str, float] = {}
            if images is not None:
                results.update(self._evaluator(images))
            if bpd is not None:
                results["bpd"] = bpd
            if trainer.is_global_zero:
                # Straight to the loggers, once per evaluation (as LearningRateMonitor does): pl_module.log() from this
                # hook would be re-emitted at every logging step until the epoch ends.
                step = trainer.fit_loop.epoch_loop._batches_that_stepped - (1 if at_end else 0)
                for logger in trainer.loggers:
                    logger.log_metrics(_logged(results), step=step)
            return results

        # a scoring or logging error on rank 0 stops every rank here, instead of leaving them in the broadcast
        results = trainer.strategy.broadcast(_together(trainer, score), src=0)
        # callback_metrics, on every rank, lets ModelCheckpoint monitor them
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in _logged(results).items()})
        self.last_results = results
        return results


def _logged(results: Mapping[str, float]) -> dict[str, float]:
    """The evaluation results sent to the loggers and callback_metrics, as `val/<name>`: not the counts (`n_*`) nor
    the standard deviations of KID and of the floors."""
    return {
        f"val/{k}": float(v) for k, v in results.items()
        if not k.startswith("n_") and k != "kid_std" and not k.endswith("_floor_std")
    }  # fmt: skip
