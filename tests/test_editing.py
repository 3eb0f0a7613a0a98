"""Editing with a trained model, against the exact Gaussian oracle: SDEdit (`strength`), inpainting (`mask`, with
RePaint's resampling), DDIM inversion and spherical interpolation of noises. Every sampler of the registry is
crossed with the editing options. Clipping of x_0 is off, so it cannot bias the checks.
"""
from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from ddpm import GaussianDiffusion, make_betas
from ddpm.diffusion import Objective, Spacing
from ddpm.samplers import SAMPLERS, slerp
from oracles import GaussianOracle

ALL_SAMPLERS = sorted(SAMPLERS)
SPACINGS = get_args(Spacing)
OBJECTIVES = get_args(Objective)


def correlated_gaussian(schedule: str = "linear", rho: float = 0.9, scale: float = 0.5, objective: str = "eps"):
    """Data N(0, scale^2 [[1, rho], [rho, 1]]) and its exact denoiser for `objective`."""
    diffusion = GaussianDiffusion(make_betas(schedule, 1000), objective=objective)
    cov = torch.tensor([[1.0, rho], [rho, 1.0]]) * scale**2
    return diffusion, GaussianOracle(diffusion, torch.zeros(2), cov), cov


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_sdedit_strength_zero_returns_the_input_and_one_is_plain_sampling(sampler: str, spacing: str) -> None:
    diffusion, oracle, _ = correlated_gaussian()
    x_init = torch.rand(64, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))

    def run(**kw):
        return diffusion.sample(oracle, (64, 2), sampler=sampler, steps=20, noise=noise, generator=torch.Generator().manual_seed(2),
                                clip_denoised=False, spacing=spacing, **kw)  # fmt: skip

    assert torch.equal(run(x_init=x_init, strength=0.0), x_init)
    assert torch.equal(run(x_init=x_init, strength=1.0), run())


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_sdedit_keeps_more_of_the_input_at_lower_strength(sampler: str) -> None:
    """The distance of the output from the input grows with the strength, and every output is a plausible
    sample of the data (the oracle pulls even a far-off input onto the data's scale)."""
    diffusion, oracle, cov = correlated_gaussian()
    x_init = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2)) @ torch.linalg.cholesky(cov).T
    distances = []
    for strength in (0.2, 0.5, 0.9):
        g = torch.Generator().manual_seed(3)
        x = diffusion.sample(oracle, x_init.shape, sampler=sampler, steps=20, generator=g, x_init=x_init, strength=strength, clip_denoised=False)
        distances.append(float((x - x_init).norm(dim=1).mean()))
    assert distances[0] < distances[1] < distances[2], distances


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_inpainting_keeps_the_kept_pixels_exactly(sampler: str, spacing: str, objective: str) -> None:
    """Every sampler, spacing and parameterisation, with SDEdit's strength too: the kept pixels come back exactly."""
    diffusion, oracle, _ = correlated_gaussian(objective=objective)
    x_init = torch.rand(256, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.tensor([[0.0, 1.0]])  # generate coordinate 1, keep coordinate 0
    for strength in (1.0, 0.6):
        g = torch.Generator().manual_seed(4)
        x = diffusion.sample(oracle, x_init.shape, sampler=sampler, steps=10, generator=g, x_init=x_init, mask=mask, strength=strength,
                             spacing=spacing, clip_denoised=False)  # fmt: skip
        assert torch.equal(x[:, 0], x_init[:, 0]) and not torch.equal(x[:, 1], x_init[:, 1])


def test_repaint_resampling_reaches_the_conditional_moments() -> None:
    """Keep x_0 = c of a correlated pair, fill x_1: its exact conditional is N(rho c, s^2 (1 - rho^2)). Plain
    replacement (resample 1) is biased towards the prior mean (Lugmayr et al. 2022's motivation); resampling
    each ancestral step 5 times brings the mean within 0.035 and the variance within 12% (N = 4000: the mean's
    standard error is 0.0034)."""
    diffusion, oracle, cov = correlated_gaussian(rho=0.9)
    rho, var, c = 0.9, float(cov[0, 0]), 0.5
    target_mean, target_var = rho * c, var * (1 - rho**2)
    x_init = torch.tensor([[c, 0.0]]).repeat(4000, 1)
    mask = torch.tensor([[0.0, 1.0]])
    moments = {}
    for resample in (1, 5):
        g = torch.Generator().manual_seed(5)
        x = diffusion.sample(oracle, x_init.shape, sampler="ddpm", generator=g, x_init=x_init, mask=mask,
                             sampler_options={"resample": resample}, clip_denoised=False)  # fmt: skip
        moments[resample] = (float(x[:, 1].mean()), float(x[:, 1].var()))
    mean, v = moments[5]
    assert abs(mean - target_mean) < 0.035 and abs(v / target_var - 1) < 0.12, (moments, target_mean, target_var)
    assert abs(moments[1][0] - target_mean) > 0.1, moments


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_inversion_reconstructs_with_first_order_error(schedule: str, objective: str) -> None:
    """Invert with DDIM, decode with DDIM (eta 0): the error halves as the steps double (first order) and is
    below 0.03 RMS at 100 steps; the encodings are close to standard normal (the data's law pushed through the
    ODE; their spread is within 0.1 of 1 at 100 steps, approaching it as the steps grow)."""
    diffusion = GaussianDiffusion(make_betas(schedule, 1000), objective=objective)
    A = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.15
    mean, cov = torch.linspace(-0.2, 0.2, 4), A @ A.T + 0.01 * torch.eye(4)
    oracle = GaussianOracle(diffusion, mean, cov)
    noise = torch.randn(2000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = (mean + noise @ torch.linalg.cholesky(cov.double()).T).float().clamp(-1, 1)
    errors = {}
    for steps in (50, 100):
        x_T = diffusion.ddim_invert(oracle, x0, steps=steps)
        decoded = diffusion.sample(oracle, x0.shape, sampler="ddim", steps=steps, eta=0.0, noise=x_T, clip_denoised=False)
        errors[steps] = float((decoded - x0).pow(2).mean().sqrt())
    assert errors[100] < 0.03 and 1.6 < errors[50] / errors[100] < 2.5, errors
    assert abs(float(x_T.mean())) < 0.05 and abs(float(x_T.std()) - 1) < 0.1


def test_slerp_endpoints_and_norms() -> None:
    """w = 0 and 1 give the endpoints; between two independent Gaussian noises of dimension D the
    interpolants keep the norm sqrt(D) (within 3%), where the straight line's midpoint shrinks it by sqrt(2)."""
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(64, 1, 16, 16, generator=g), torch.randn(64, 1, 16, 16, generator=g)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    for w in (0.25, 0.5, 0.75):
        norms = slerp(z0, z1, w).flatten(1).norm(dim=1) / math.sqrt(256)
        assert abs(float(norms.mean()) - 1) < 0.03 and abs(float(norms.std()) - float((z0.flatten(1).norm(dim=1) / 16).std())) < 0.03
    assert abs(float((0.5 * (z0 + z1)).flatten(1).norm(dim=1).mean()) / 16 - 1 / math.sqrt(2)) < 0.03
    torch.testing.assert_close(slerp(z0, z0 * 2, 0.5), z0 * 1.5)  # parallel: the straight line
