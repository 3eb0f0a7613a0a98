"""DiffusionModule: the LightningModule that trains a UNet under a GaussianDiffusion (Ho et al. 2020, Alg. 1).

It holds the network (`unet`) and the process (`diffusion`), logs the loss (also per quarter of the
timesteps), draws each step's t and noise so that a global batch gets the same draws however devices and
gradient accumulation split it, validates with a fixed draw of t and noise, builds Adam/AdamW (fused where
torch has the kernel) with a linear warm-up, keeps the UNet and the batches channels_last, optionally
torch.compiles the UNet (`compile_unet`; ddpm.callbacks.CompileTime reports the cost), and draws samples (`sample`) and per-image bits/dim (`bits_per_dim`).
The sample grids and the evaluation during training are callbacks (ddpm.sample_callbacks) that run on every rank;
their settings (`sample_*`, `eval_*`) stay arguments of this module, so the config keys `module.sample_*` and
`module.eval_*` and every checkpoint carry them (conf/callbacks/default.yaml hands them to the callbacks).

All constructor arguments are plain values and `save_hyperparameters()` stores them, so a checkpoint
alone rebuilds the model: `DiffusionModule.load_from_checkpoint(path)` (EMA weights when the run had
EMA) or `ddpm.checkpoints.load_module(path, use_ema=...)`.
"""
from __future__ import annotations

import inspect
import math
import sys
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor

from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError
from ddpm.evaluation import validate_metrics
from ddpm.guidance import ClassifierFreeGuidance
from ddpm.schedules import make_betas
from ddpm.schema import LrDecay, Optimizer, check_lr_decay, check_module
from ddpm.unet import UNet, is_channels_last

QUARTILES = 4
# The checkpoint key of the step where lr_decay ends, fixed by the run's first trainer.max_steps. A resume keeps it:
# the curve is the run's state, as the optimizer's moments are. A resume that stops earlier follows it and says so in
# one line; one that would go past its end (where the lr is 0) is refused, since those steps would train nothing: a
# longer curve is a new run from the weights (init_weights=<run dir>). With lr_decay=none, max_steps only says where
# a leg stops.
LR_HORIZON = "lr_decay_steps"


def _seed_of(*entropy: int) -> int:
    """A 64-bit generator seed mixed from integers by numpy's SeedSequence (nearby inputs, unrelated streams)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0])


def lr_factor(step: int, warmup: int, decay: str = "none", total: int = 0) -> float:
    """The learning rate at optimizer step `step` (0-based) over the peak: linear warm-up over `warmup` steps, then
    1 ("none"), or half a cosine wave / a line from 1 at the warm-up's end to 0 at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "none":
        return 1.0
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


# GaussianDiffusion's options that a DiffusionModule takes as its own (module.objective=v, ...)
_PROCESS = {n: p for n, p in inspect.signature(GaussianDiffusion).parameters.items() if n not in ("betas", "timestep_map")}
PROCESS_OPTIONS = tuple(_PROCESS)
PROCESS_DEFAULTS = {n: p.default for n, p in _PROCESS.items()}


class DiffusionModule(LightningModule):
    """A GaussianDiffusion over a UNet, trained with L_simple (Ho et al. 2020, eq. 14).

    Args:
        unet: keyword arguments of ddpm.UNet (image_size, in_channels, base_channels, channel_mult, ...).
        schedule: a beta schedule name in ddpm.schedules.SCHEDULES ("linear", "cosine").
        timesteps: T, the length of the forward process.
        cond_drop_prob: for class-conditional models (model.num_classes), the probability that a label is
            replaced by the null label in training, so classifier-free guidance can sample (Ho & Salimans 2022).
        optimizer: "adam" (the paper) or "adamw".
        lr: peak learning rate, reached after `warmup_steps` linear steps, then held (`lr_decay` "none") or
            decayed to 0 at the trainer's `max_steps` ("cosine": half a cosine wave; "linear").
        betas: Adam's (beta1, beta2).
        weight_decay: decoupled for AdamW, L2 for Adam.
        warmup_steps: linear learning-rate warm-up length in optimizer steps (0: none).
        lr_decay: "none", "cosine" or "linear" decay after the warm-up, to 0 at trainer.max_steps (which must be set)
            of the run's first start; a resumed run keeps that curve (LR_HORIZON).
        sample_every_n_steps: draw a grid every this many optimizer steps and at the end (0: never); done by
            ddpm.sample_callbacks.SampleGrid, as are the other sample_* settings.
        sample_n: images in the grid.
        sample_sampler: sampler for the grid and the evaluation (a name in ddpm.samplers.SAMPLERS).
        sample_steps: sampling steps for the grid and the evaluation (None: all T).
        sample_spacing: where those steps lie, "uniform", "trailing" or "karras" (None: the sampler's default;
            ddpm.diffusion.spaced_timesteps).
        sample_seed: seed of the grid's noise, fixed so grids are comparable across steps and runs (the evaluation's
            samples and bits/dim draw from seeds derived from it).
        eval_every_n_steps: every this many optimizer steps and at the end, score `eval_n` samples of the EMA weights
            against the datamodule's val split and log `val/<metric>` and the floors (0: never); done by
            ddpm.sample_callbacks.Evaluation on every rank, as are the other eval_* settings.
        eval_n: samples per evaluation (the FID floor is computed at the same count).
        eval_metrics: any of fid, kid, precision, recall, confidence, coverage, bpd (ddpm.metrics).
        eval_extractor: FID/KID features, "digits" or "inception".
        eval_inception_weights: path of the Inception weights file (None: torch hub's cache).
        eval_bpd_timesteps: timesteps of the quick held-out bits/dim estimate (None: all T).
        channels_last: store the UNet's convolution weights and the training batches NHWC
            (torch.channels_last), the layout oneDNN's fp32 and cuDNN's tensor-core convolutions run fastest;
            the activations follow the weights. Numerically the same net. The config's `auto` is settled by
            train.py for the hardware before the module is built (ddpm.hardware.choose).
        **process: the forward process's and the loss's options, passed to GaussianDiffusion, which documents each
            (PROCESS_OPTIONS: objective, variance, min_snr_gamma, vlb_weight, sigma_data, timestep_sampling,
            lognormal_mean, lognormal_std); hyperparameters like the others (module.objective=v, ...).
    """

    def __init__(
        self,
        unet: dict[str, Any],
        schedule: str = "linear",
        timesteps: int = 1000,
        cond_drop_prob: float = 0.0,
        optimizer: Optimizer = "adam",
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 5000,
        lr_decay: LrDecay = "none",
        sample_every_n_steps: int = 1000,
        sample_n: int = 64,
        sample_sampler: str = "ddim",
        sample_steps: int | None = 50,
        sample_spacing: str | None = None,
        sample_seed: int = 0,
        eval_every_n_steps: int = 0,
        eval_n: int = 256,
        eval_metrics: list[str] | tuple[str, ...] = ("fid",),
        eval_extractor: str = "digits",
        eval_inception_weights: str | None = None,
        eval_bpd_timesteps: int | None = 100,
        channels_last: bool = True,
        **process: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        known = set(inspect.signature(UNet).parameters)
        unknown = sorted(set(unet) - known)
        if unknown:
            raise ConfigError(f"model.{unknown[0]} is not a UNet argument; known: {', '.join(sorted(known))}")
        check_module({k: v for k, v in self.hparams.items() if k != "unet"})  # by config key: module.lr, ...
        validate_metrics(eval_metrics, key="module.eval_metrics")
        unknown = sorted(set(process) - set(PROCESS_OPTIONS))
        if unknown:
            raise ConfigError(f"module.{unknown[0]} is not an option of the module; its process options: {', '.join(PROCESS_OPTIONS)}")
        self.hparams.update({**PROCESS_DEFAULTS, **process})  # every option in the checkpoint, defaults included
        if not isinstance(channels_last, bool):
            raise ConfigError(f"module.channels_last={channels_last}: the module takes true or false; train.py settles auto for the hardware")
        try:
            self.diffusion = GaussianDiffusion(make_betas(schedule, timesteps), **process)
            unet = dict(unet)
            if unet.get("out_channels") is None:  # learned_range predicts a variance too: twice the channels
                unet["out_channels"] = self.diffusion.model_channels(unet.get("in_channels", 3))
            self.unet = UNet(**unet)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)  # 4-D weights only; load_state_dict keeps the layout
        self.image_shape = (self.unet.in_channels, self.unet.image_size, self.unet.image_size)  # (C, H, W)
        # L_simple summed and counted per quarter of [0, T) over the epoch: where in the chain the net still has
        # to learn. Plain tensors, not buffers: buffers would enter checkpoints and the EMA's weight swaps.
        self._q_sum = torch.zeros(QUARTILES)
        self._q_count = torch.zeros(QUARTILES)
        self._draw_generator: torch.Generator | None = None  # training_draws(), re-seeded every step
        self._lr_horizon: int | None = None  # where lr_decay ends: the run's first trainer.max_steps (LR_HORIZON)

    @property
    def conditional(self) -> bool:
        return self.unet.num_classes is not None

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The UNet's output for its input (B, C, H, W) at t (B,): eps, x0, v or EDM's F by objective (with "edm"
        the input is c_in x_t; GaussianDiffusion.model_output scales it)."""
        return self.unet(x_t, t, y)

    def _model_kwargs(self, y: Tensor, drop_prob: float = 0.0, uniforms: Tensor | None = None) -> dict[str, Tensor] | None:
        """{"y": labels} for a class-conditional net (each replaced by the null label with `drop_prob`, where its
        entry of `uniforms` (B,), default fresh draws, falls below it), else None."""
        if not self.conditional:
            return None
        if drop_prob > 0:
            u = torch.rand(y.shape, device=y.device) if uniforms is None else uniforms
            y = torch.where(u < drop_prob, torch.full_like(y, self.unet.num_classes), y)
        return {"y": y}

    # ---- training --------------------------------------------------------------------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Images to channels_last on the device (with `channels_last`), so the first conv reads NHWC."""
        if self.hparams.channels_last and isinstance(batch, (tuple, list)) and batch and batch[0].dim() == 4:
            return (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
        return batch

    def compile_unet(self, **options: Any) -> None:
        """torch.compile the UNet in place (`nn.Module.compile`: parameter names, checkpoints and the EMA's
        eager copy are unchanged); `options` go to torch.compile (mode, backend, dynamic, ...).

        Compilation happens in the first training step (ddpm.callbacks.CompileTime reports its cost).
        """
        try:
            self.unet.compile(**options)
        except RuntimeError as e:  # an unknown mode or backend
            raise ConfigError(f"compile_options={options}: {str(e).strip().splitlines()[0]}") from e

    def training_draws(self, x0: Tensor, batch_idx: int) -> tuple[Tensor, Tensor, Tensor]:
        """t (B,), noise (B, C, H, W) and the label-dropout uniforms (B,) of this rank's micro-batch.

        They are rows of one draw for the whole optimizer step (accumulate_grad_batches x world_size x B rows),
        seeded by (torch.initial_seed(), global_step): micro-batch m takes the m-th block of world_size x B rows
        and rank r every world_size-th row of it from r, the positions DistributedSampler gives that rank's images.
        So ranks never repeat each other's noise (seeded alike, each would otherwise draw the same t and noise for
        its own images), the same global batch gets the same draws however it is split over devices and
        accumulation, and a resumed run draws what an uninterrupted one would. Each rank draws the global batch's
        noise and keeps its rows: one call, the size of accumulate_grad_batches x world_size micro-batches.
        """
        trainer = self._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        accum = trainer.accumulate_grad_batches if trainer is not None else 1
        B, device = x0.shape[0], x0.device
        if self._draw_generator is None or self._draw_generator.device != device:
            self._draw_generator = torch.Generator(device=device)
        g = self._draw_generator.manual_seed(_seed_of(torch.initial_seed(), self.global_step))
        n = accum * world * B
        t = self.diffusion.sample_timesteps(n, generator=g, device=device)
        drop = torch.rand((n,), generator=g, device=device)
        noise = torch.randn((n, *x0.shape[1:]), generator=g, device=device)
        rows = torch.arange(B, device=device) * world + (batch_idx % accum) * world * B + rank
        memory_format = torch.channels_last if is_channels_last(x0) else torch.contiguous_format
        return t[rows], noise[rows].contiguous(memory_format=memory_format), drop[rows]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, y = batch  # (B, C, H, W) in [-1, 1], (B,)
        T = self.diffusion.num_timesteps
        t, noise, drop = self.training_draws(x0, batch_idx)
        kwargs = self._model_kwargs(y, self.hparams.cond_drop_prob, drop)
        losses = self.diffusion.training_loss(self.unet, x0, t=t, noise=noise, model_kwargs=kwargs, reduction="none")
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True)
        quartile = t * QUARTILES // T  # (B,) in 0..3
        if self._q_sum.device != x0.device:
            self._q_sum, self._q_count = self._q_sum.to(x0.device), self._q_count.to(x0.device)
        self._q_sum.index_add_(0, quartile, losses.detach().float())
        self._q_count.index_add_(0, quartile, torch.ones_like(losses, dtype=torch.float))
        return loss

    def on_train_epoch_end(self) -> None:
        """Log train/loss_q1..q4, the epoch's mean loss for t in each quarter of [0, T) (q1: least noise), summed over
        ranks; a quarter that no training t fell in (rare under timestep_sampling=lognormal) is not logged."""
        sums = self.trainer.strategy.reduce(self._q_sum.clone(), reduce_op="sum")
        counts = self.trainer.strategy.reduce(self._q_count.clone(), reduce_op="sum")
        for i in range(QUARTILES):
            if counts[i] > 0:
                self.log(f"train/loss_q{i + 1}", sums[i] / counts[i])
        self._q_sum.zero_()
        self._q_count.zero_()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """L_simple on held-out images with t and noise drawn from a per-batch seed, so values compare across evaluations."""
        x0, y = batch
        g = torch.Generator(device=x0.device).manual_seed(batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), generator=g, device=x0.device)
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        loss = self.diffusion.training_loss(self.unet, x0, t=t, noise=noise, model_kwargs=self._model_kwargs(y))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """Adam/AdamW with torch's fused kernel (one kernel for all parameters) where it has one for their device
        and dtype, else the foreach implementation. Under 16-mixed with gradient clipping it is foreach too: the
        gradients must be unscaled before clipping, and a fused optimizer unscales inside its own step."""
        hp = self.hparams
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[hp.optimizer]
        kwargs = dict(lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        trainer = self._trainer
        plugin = trainer.precision_plugin if trainer is not None else None
        scaled_clipping = isinstance(plugin, MixedPrecision) and plugin.scaler is not None and bool(trainer.gradient_clip_val)
        if not scaled_clipping:
            try:
                return cls(self.unet.parameters(), fused=True, **kwargs)
            except RuntimeError:  # no fused kernel for some parameter's device or dtype
                pass
        return cls(self.unet.parameters(), foreach=True, **kwargs)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Lightning's clipping, except under bf16-mixed: there Lightning's autocast plugin refuses any fused
        optimizer (one that could unscale inside its step), though bf16 has no loss scale, so the gradients are
        the true ones and the plain precision plugin's clipping (as under 32-true) applies."""
        plugin = self.trainer.precision_plugin
        if not gradient_clip_val or not isinstance(plugin, MixedPrecision) or plugin.scaler is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")  # None means norm, as in LightningModule.clip_gradients
        Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = self._make_optimizer()
        max_steps = self._decay_steps()
        if self._lr_horizon is None:  # a fresh run; a resumed one has its first run's from the checkpoint
            self._lr_horizon = max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    def _lr_factor(self, step: int) -> float:
        """lr_factor with this run's horizon, read at each step: a checkpoint restored after configure_optimizers
        (as FSDP's) still sets it."""
        hp = self.hparams
        return lr_factor(step, warmup=hp.warmup_steps, decay=hp.lr_decay, total=self._lr_horizon)

    def _decay_steps(self) -> int:
        """The trainer's max_steps, checked to be set when `lr_decay` needs an end."""
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        check_lr_decay(self.hparams.lr_decay, max_steps)
        return max_steps

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[LR_HORIZON] = self._lr_horizon

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run keeps the learning-rate curve of its first start (the rule: LR_HORIZON)."""
        horizon = checkpoint.get(LR_HORIZON)
        if horizon is None:  # written before checkpoints held it: the trainer's max_steps, as then
            return
        self._lr_horizon = int(horizon)
        trainer = self._trainer
        if trainer is None or self.hparams.lr_decay == "none" or trainer.max_steps == horizon:
            return
        decay = self.hparams.lr_decay
        if trainer.max_steps == -1 or trainer.max_steps > horizon:
            raise ConfigError(f"trainer.max_steps={trainer.max_steps} goes past the end of this run's lr_decay={decay} curve, which reaches "
                              f"lr 0 at step {horizon} (its first max_steps); resume with trainer.max_steps<={horizon}, or train on "
                              f"from its weights as a new run: init_weights=<run dir> trainer.max_steps=<more>")  # fmt: skip
        if trainer.is_global_zero:
            print(f"note: trainer.max_steps={trainer.max_steps} stops before the end of this run's lr_decay={decay} curve, "
                  f"which keeps its end at step {horizon}", file=sys.stderr)  # fmt: skip

    # ---- sampling and likelihood ---------------------------------------------------------------------

    def sample(
        self,
        n: int,
        sampler: str = "ddim",
        steps: int | None = 50,
        eta: float = 0.0,
        seed: int = 0,
        labels: Tensor | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
        guidance_scale: float = 1.0,
        spacing: str | None = None,
        sampler_options: dict | None = None,
        noise: Tensor | None = None,
        x_init: Tensor | None = None,
        strength: float = 1.0,
        mask: Tensor | None = None,
        clip_denoised: bool = True,
    ) -> Tensor:
        """n images (n, C, H, W) in [-1, 1] from this module's weights, deterministic for `seed`
        (or drawn from `generator`, which then replaces the seed, to continue one stream over batches).
        `noise` gives x_T; `x_init` (n images), `strength` and `mask` edit images (SDEdit, inpainting: see
        GaussianDiffusion.sample); `clip_denoised=False` leaves the x_0 predictions unclipped (to decode DDIM
        inversions).

        Conditional models get `labels` (n,), by default 0, 1, ..., num_classes - 1 repeated, and
        `guidance_scale` s (classifier-free guidance: 0 unconditional, 1 conditional, > 1 stronger).
        `spacing`: where the `steps` timesteps lie (None: the sampler's default; see ddpm.diffusion.spaced_timesteps).
        `sampler_options`: keywords particular to the sampler (ddpm.samplers.sampler_options), e.g. {"s_tmax": 0.5}.
        """
        device = self.diffusion.betas.device
        if self.conditional and labels is None:
            labels = torch.arange(n, device=device) % self.unet.num_classes
        g = generator if generator is not None else torch.Generator(device=device).manual_seed(seed)
        model = self.unet
        if self.conditional and guidance_scale != 1.0:
            model = ClassifierFreeGuidance(self.unet, guidance_scale, self.unet.num_classes, guided_channels=self.image_shape[0])
        was_training = self.unet.training
        self.unet.eval()
        try:
            return self.diffusion.sample(
                model, (n, *self.image_shape), sampler=sampler, steps=steps, eta=eta, generator=g,
                progress=progress, model_kwargs=None if labels is None else {"y": labels.to(device)}, device=device,
                spacing=spacing, sampler_options=sampler_options, noise=noise, x_init=x_init, strength=strength, mask=mask,
                clip_denoised=clip_denoised,
            )  # fmt: skip
        finally:
            self.unet.train(was_training)

    def bits_per_dim(
        self, x0: Tensor, y: Tensor | None = None, num_timesteps: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """The variational bound in bits/dim of each image of x0 (B, C, H, W) in [-1, 1], shape (B,), in float32.

        A class-conditional model is scored given the labels `y` (B,) (without them, on its null label).
        `num_timesteps` = K < T: the stratified K-term estimate (GaussianDiffusion.bits_per_dim), None all T terms.
        """
        device = self.diffusion.betas.device
        x0 = x0.to(device)
        kwargs = self._model_kwargs(y.to(device)) if y is not None else None
        was_training = self.unet.training
        self.unet.eval()
        try:
            bpd = self.diffusion.bits_per_dim(self.unet, x0, num_timesteps=num_timesteps, generator=generator, model_kwargs=kwargs)
            return bpd.total
        finally:
            self.unet.train(was_training)
