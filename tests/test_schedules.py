"""Beta schedules against their definitions (Ho et al. 2020 sec. 4; Nichol & Dhariwal 2021 eq. 17)."""
import math

import pytest
import torch

from ddpm import make_betas
from ddpm.schedules import MAX_BETA, SCHEDULES


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("timesteps", [1, 2, 10, 100, 1000, 4000])
def test_betas_in_range_and_float64(name, timesteps):
    betas = make_betas(name, timesteps)
    assert betas.dtype == torch.float64 and betas.shape == (timesteps,)
    assert bool((betas > 0).all()) and bool((betas <= MAX_BETA).all())


def test_linear_matches_ho_et_al_at_1000_and_destroys_the_signal():
    betas = make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    assert torch.cumprod(1 - betas, 0)[-1].item() < 1e-4


def test_linear_scales_both_ends_by_1000_over_T():
    betas = make_betas("linear", 2000)
    assert betas[0].item() == pytest.approx(0.5e-4) and betas[-1].item() == pytest.approx(0.01)
    # the total noise stays comparable: alpha_bar_T about the same as at T = 1000
    assert torch.cumprod(1 - betas, 0)[-1].item() == pytest.approx(torch.cumprod(1 - make_betas("linear", 1000), 0)[-1].item(), rel=0.5)


@pytest.mark.parametrize("timesteps", [50, 1000])
def test_cosine_alpha_bar_equals_the_formula_up_to_the_clip(timesteps):
    s = 0.008
    f = lambda t: math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = make_betas("cosine", timesteps)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    unclipped = int((betas < MAX_BETA).sum())  # the clip can only act at the very end
    assert bool((betas[:unclipped] < MAX_BETA).all())
    expected = torch.tensor([f(t + 1) / f(0) for t in range(unclipped)], dtype=torch.float64)
    assert torch.allclose(alphas_cumprod[:unclipped], expected, rtol=1e-9, atol=1e-12)
    assert unclipped >= timesteps - 1
    assert betas[-1].item() == pytest.approx(MAX_BETA)


def test_unknown_schedule_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'.*cosine, linear"):
        make_betas("quadratic", 1000)


@pytest.mark.parametrize("timesteps", [0, -3, 2.5, True])
def test_bad_timesteps_are_rejected(timesteps):
    with pytest.raises(ValueError, match="timesteps must be an integer >= 1"):
        make_betas("linear", timesteps)
