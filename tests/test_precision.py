"""Every precision the validator accepts, crossed with every objective, variance and timestep sampling, and with
every sampler.

- The schedule constants stay exact whatever the module's dtype: casting GaussianDiffusion (bf16-true, 16-true,
  64-true) leaves its float32 buffers equal to the float64 schedule rounded once, so every sampler returns the
  same samples as in float32; they are not saved in checkpoints, and rounded ones in an older checkpoint are
  not loaded back.
- Each precision x objective x variance x timestep sampling trains a tiny model for two steps with Lightning (EMA on) and samples
  finite images from the live and the EMA weights.
"""
from __future__ import annotations

from typing import get_args

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddpm import GaussianDiffusion, make_betas
from ddpm.callbacks import EMA
from ddpm.diffusion import Objective, TimestepSampling, Variance
from ddpm.module import DiffusionModule
from ddpm.samplers import SAMPLERS
from ddpm.schema import precisions
from oracles import GaussianOracle

# the precisions under their full names (the short aliases 64, 32, 16 and bf16 are the same plugins)
TRAIN_PRECISIONS = [p for p in precisions() if "-" in p]
DTYPES = [torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_casting_the_process_leaves_the_schedule_exact(dtype):
    exact = GaussianDiffusion(make_betas("cosine", 1000))
    cast = GaussianDiffusion(make_betas("cosine", 1000)).to(dtype)
    for name, buffer in exact.named_buffers():
        assert getattr(cast, name).dtype == buffer.dtype and torch.equal(getattr(cast, name), buffer), name
    assert cast.alphas_cumprod[0].item() == pytest.approx(1 - make_betas("cosine", 1000)[0].item(), rel=1e-6)
    assert cast.alphas_cumprod[0] < 1  # bf16 would round it to exactly 1


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_sampler_gives_the_same_samples_from_a_cast_process(sampler, dtype):
    """Full-T sampling (where the constants near t = 0 matter most) is finite and identical after a cast."""
    reference = GaussianDiffusion(make_betas("linear", 100))
    cast = GaussianDiffusion(make_betas("linear", 100)).to(dtype)
    samples = [
        d.sample(GaussianOracle(reference, torch.full((2,), 0.2), torch.eye(2) * 0.0625), (256, 2), sampler=sampler,
                 generator=torch.Generator().manual_seed(0))
        for d in (reference, cast)
    ]  # fmt: skip
    assert bool(samples[1].isfinite().all()) and torch.equal(samples[0], samples[1])


def test_schedule_constants_are_not_saved_and_rounded_ones_are_not_loaded():
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    assert diffusion.state_dict() == {}
    rounded = {name: buffer.to(torch.bfloat16).float() for name, buffer in diffusion.named_buffers()}  # an older bf16-true checkpoint
    fresh = GaussianDiffusion(make_betas("linear", 1000))
    fresh.load_state_dict(rounded)  # strict: the old keys are accepted ...
    assert torch.equal(fresh.alphas_cumprod, diffusion.alphas_cumprod)  # ... and not copied in


def test_sampling_on_another_device_or_with_fewer_steps_never_moves_or_changes_the_process():
    """The process a module holds stays on its device: sampling elsewhere (the meta device stands in for a GPU
    here) or over fewer steps runs on a respaced copy."""
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    before = {name: buffer.clone() for name, buffer in diffusion.named_buffers()}
    zeros = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for steps in (None, 10):
        assert diffusion.sample(zeros, (4, 2), steps=steps, device="meta").device.type == "meta"
        assert diffusion.sample(zeros, (4, 2), steps=steps, generator=torch.Generator().manual_seed(0)).device.type == "cpu"
    assert all(torch.equal(buffer, before[name]) and buffer.device.type == "cpu" for name, buffer in diffusion.named_buffers())


def _tiny_module(objective: str, variance: str, timestep_sampling: str = "uniform") -> DiffusionModule:
    unet = dict(image_size=8, in_channels=1, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                attention_resolutions=[], norm_groups=4)  # fmt: skip
    return DiffusionModule(unet, schedule="linear", timesteps=50, objective=objective, variance=variance,
                           timestep_sampling=timestep_sampling, warmup_steps=0, sample_every_n_steps=0)  # fmt: skip


@pytest.mark.parametrize("precision", TRAIN_PRECISIONS)
@pytest.mark.parametrize("objective", get_args(Objective))
@pytest.mark.parametrize("variance", get_args(Variance))
@pytest.mark.parametrize("timestep_sampling", get_args(TimestepSampling))
def test_every_precision_objective_and_variance_trains_and_samples(precision, objective, variance, timestep_sampling):
    torch.manual_seed(0)
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    data = DataLoader(TensorDataset(images, torch.zeros(16, dtype=torch.long)), batch_size=8)
    module = _tiny_module(objective, variance, timestep_sampling)
    ema = EMA(decay=0.9)
    trainer = pl.Trainer(
        accelerator="cpu", precision=precision, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ema], gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=data)
    assert trainer.global_step == 2
    assert module.diffusion.alphas_cumprod.dtype == torch.float32  # the cast module keeps the exact schedule
    weight = next(module.unet.parameters())
    assert bool(weight.isfinite().all())
    for holder in (module, ema.averaged_module):
        with trainer.precision_plugin.forward_context():
            x = holder.sample(4, sampler="ddim", steps=3, seed=0)
        assert x.shape == (4, 1, 8, 8) and bool(x.isfinite().all())
