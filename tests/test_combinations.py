"""Every schedule x sampler x spacing x step count (and objective), against the exact oracles.

The matrix is built from the registries (ddpm.schedules.SCHEDULES, ddpm.samplers.SAMPLERS, the Spacing Literal),
so a new schedule, sampler or spacing joins it by being registered. For each combination:
- the network is called exactly `samplers.network_evaluations(sampler, steps)` times, at exactly `steps`
  distinct (original) timesteps;
- with the Gaussian oracle, the sample mean and variance equal those of the sampler's exact recursion
  (tests/chain_moments.py), clamped to [-1, 1] as sample() returns, within 5 Monte Carlo standard errors:
  sqrt(V / N) for the mean, sqrt((mu_4 - V^2) / N) for the variance;
- the recursion itself (no Monte Carlo) keeps the mean within 0.002 of the data's, and, for each sampler at
  its default spacing, the spread within the bounds of QUALITY;
- with the two-component mixture oracle at 50 steps (default spacing), for every objective (the oracle speaks
  each parameterisation), component weights, mean and covariance match the data.
The training grids' and the evaluation's path (draw_samples) is crossed with every sampler and spacing too.
"""
from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from chain_moments import EXACT_MOMENTS, clamped_moments
from conftest import perturbed
from ddpm import GaussianDiffusion, make_betas
from ddpm.diffusion import Objective, Spacing, spaced_timesteps
from ddpm.samplers import DEFAULT_SPACING, SAMPLERS, network_evaluations
from ddpm.schedules import SCHEDULES
from oracles import GaussianOracle, MixtureOracle, sample_mixture

MU, SD, N, T = 0.2, 0.25, 20_000, 1000
STEPS = (5, 10, 20, 50)
SPACINGS = get_args(Spacing)

# Largest |std / SD - 1| of the exact recursion for each sampler at its default spacing, over every schedule:
# {steps: bound}. Measured (worst of linear, cosine): ddpm 0.32 at 20, 0.18 at 50 (few ancestral steps shrink
# the spread); ddim 0.24 / 0.10; dpmsolver++ 0.05 / 0.007; dpmsolver++sde 0.10 / 0.02; heun 0.05 / 0.006.
QUALITY = {
    "ddpm": {20: 0.34, 50: 0.19},
    "ddim": {20: 0.25, 50: 0.11},
    "dpmsolver++": {20: 0.06, 50: 0.01},
    "dpmsolver++sde": {20: 0.11, 50: 0.025},
    "heun": {20: 0.06, 50: 0.01},
}


class CountingOracle(GaussianOracle):
    """The Gaussian oracle, recording the timesteps of every call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def __call__(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert bool((t == t[0]).all())
        self.calls.append(int(t[0]))
        return super().__call__(xt, t)


def test_every_registered_sampler_has_an_exact_moment_recursion():
    assert set(SAMPLERS) <= set(EXACT_MOMENTS), f"add the recursion of {set(SAMPLERS) - set(EXACT_MOMENTS)} to tests/chain_moments.py"
    assert set(SAMPLERS) <= set(QUALITY), f"state the quality bounds of {set(SAMPLERS) - set(QUALITY)}"


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_spacings_return_exactly_the_steps_asked_for(schedule, spacing):
    alphas_cumprod = torch.cumprod(1 - make_betas(schedule, T), 0)
    for timesteps in (T, 50):
        for steps in sorted({1, 2, 5, 10, 20, 50, 100, 500, timesteps} & set(range(1, timesteps + 1))):
            kept = spaced_timesteps(timesteps, steps, spacing, torch.cumprod(1 - make_betas(schedule, timesteps), 0))
            assert len(kept) == steps and bool((kept.diff() > 0).all()) and 0 <= kept[0] and kept[-1] <= timesteps - 1
    if spacing != "karras":  # uniform and trailing start at the noisiest step
        assert spaced_timesteps(T, 20, spacing)[-1] == T - 1
    else:  # karras starts at sigma_max = min(sigma_{T-1}, 80), EDM's clamp
        sigma = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        top = spaced_timesteps(T, 20, spacing, alphas_cumprod)[-1]
        assert abs(sigma[top].log() - math.log(min(sigma[-1].item(), 80.0))) < 0.05


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_sampler_matrix_against_the_gaussian_oracle(schedule, sampler, spacing, steps):
    diffusion = GaussianDiffusion(make_betas(schedule, T))
    oracle = CountingOracle(diffusion, torch.full((2,), MU), torch.eye(2) * SD**2)
    x = diffusion.sample(oracle, (N, 2), sampler=sampler, steps=steps, spacing=spacing,
                         generator=torch.Generator().manual_seed(steps), clip_denoised=False).double()  # fmt: skip
    alphas_cumprod = torch.cumprod(1 - make_betas(schedule, T), 0)
    kept = spaced_timesteps(T, steps, spacing, alphas_cumprod)
    assert len(oracle.calls) == network_evaluations(sampler, steps)
    assert sorted(set(oracle.calls)) == kept.tolist()

    m, V = EXACT_MOMENTS[sampler](alphas_cumprod[kept].tolist(), MU, SD**2)
    assert abs(m - MU) < 0.002
    clamped_mean, clamped_var, fourth = clamped_moments(m, V)  # sample() returns values in [-1, 1]
    # Heun's trapezoid over a first step from sigma_{T-1} ~ 2e4 (the cosine schedule with uniform or trailing spacing)
    # amplifies the float32 rounding of the oracle's eps (an x_0 error of about 2e4 * 6e-8): measured up to 7% of the
    # variance at 10-20 steps, where the exact recursion is already 24-200% off (karras spacing avoids that step).
    alphas_top = alphas_cumprod[kept[-1]].item()
    rounding = 0.1 * clamped_var if sampler == "heun" and (1 - alphas_top) / alphas_top > 1e6 else 0.0
    assert torch.all((x.mean(0) - clamped_mean).abs() < 5 * math.sqrt(clamped_var / N) + rounding)
    assert torch.all((x.var(0) - clamped_var).abs() < 5 * math.sqrt((fourth - clamped_var**2) / N) + rounding)
    if spacing == DEFAULT_SPACING[sampler] and steps in QUALITY[sampler]:
        assert abs(math.sqrt(V) / SD - 1) < QUALITY[sampler][steps]


MIX_WEIGHTS, MIX_MEANS, MIX_VARS = torch.tensor([0.3, 0.7]), torch.tensor([[-0.5, -0.5], [0.5, 0.4]]), torch.tensor([0.01, 0.02])


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("objective", get_args(Objective))
def test_sampler_matrix_against_the_mixture_oracle(schedule, sampler, objective):
    """At 50 steps with the sampler's default spacing: component weights within 3.5 standard errors
    (sqrt(w (1 - w) / N)), the mean within 0.01 and the covariance within 0.02 (entries 0.17-0.23; the
    within-component spread carries each sampler's discretisation error: measured 0.016 for ddpm on linear)."""
    diffusion = GaussianDiffusion(make_betas(schedule, T), objective=objective)
    oracle = MixtureOracle(diffusion, MIX_WEIGHTS, MIX_MEANS, MIX_VARS)
    x = diffusion.sample(oracle, (N, 2), sampler=sampler, steps=50, generator=torch.Generator().manual_seed(4), clip_denoised=False)
    data, _ = sample_mixture(MIX_WEIGHTS, MIX_MEANS, MIX_VARS, 400_000, torch.Generator().manual_seed(5))
    component = ((x.unsqueeze(1) - MIX_MEANS) ** 2).sum(-1).argmin(1)
    assert abs((component == 1).float().mean().item() - 0.7) < 3.5 * math.sqrt(0.21 / N)
    assert torch.allclose(x.mean(0), data.mean(0), atol=0.01)
    assert torch.allclose(torch.cov(x.T), torch.cov(data.T), atol=0.02)


@pytest.fixture(scope="module")
def grid_setup():
    """A tiny DiffusionModule (T = 100) with perturbed weights (at the zero init every spacing of ddim gives the
    same images) and an unfitted one-device Trainer: what SampleGrid and Evaluation hand to draw_samples."""
    import lightning.pytorch as pl

    from ddpm.module import DiffusionModule

    torch.manual_seed(0)
    unet = dict(image_size=8, in_channels=1, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[], norm_groups=8)
    module = DiffusionModule(unet=unet, timesteps=100, warmup_steps=0, sample_every_n_steps=0)
    perturbed(module.unet)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer, module


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("spacing", [*SPACINGS, None])
def test_training_grids_draw_every_sampler_at_every_spacing(grid_setup, sampler, spacing):
    """module.sample_spacing reaches the samples of the training grids and the evaluation (draw_samples) for
    every sampler: they are module.sample's at that spacing, and differ from the sampler's default spacing's."""
    from ddpm.sample_callbacks import draw_samples

    trainer, module = grid_setup
    drawn = draw_samples(trainer, module, 4, sampler, 5, seed=3, chunk_size=8, spacing=spacing)
    with torch.no_grad():
        assert torch.equal(drawn, module.sample(4, sampler, 5, seed=3, spacing=spacing).float())
        if spacing not in (None, DEFAULT_SPACING[sampler]):
            assert not torch.equal(drawn, module.sample(4, sampler, 5, seed=3).float())
