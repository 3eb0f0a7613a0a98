"""Samplers against oracles: with the exact posterior-mean denoiser, sampling must reproduce the data.

For Gaussian data every sampler here is a linear map of x_T plus Gaussian noise, so its output is exactly
Gaussian with a mean and variance computed by the same recursion over alpha_bar (tests/chain_moments.py),
independently of GaussianDiffusion. That separates two questions: is the sampler implemented right (sample statistics
equal the recursion's within Monte Carlo error) and how large is its discretisation error (the
recursion's variance against the data's; e.g. deterministic DDIM with 50 steps is about 10% narrow on
N(0.2, 0.25^2) with the linear schedule and converges as the steps grow).
Monte Carlo tolerances: 5 standard errors, sqrt(V / N) for means and V sqrt(2 / (N - 1)) for variances.
Clipping of x_0 is off, so that it cannot bias these checks.
"""
import math

import pytest
import torch

from ddpm import GaussianDiffusion, make_betas
from ddpm.diffusion import spaced_timesteps
from chain_moments import ancestral_moments, dpm_solver_moments, kept_alphas_cumprod
from oracles import GaussianOracle, MixtureOracle, sample_mixture

MU, SD, N = 0.2, 0.25, 20_000


def reverse_chain_moments(schedule: str, steps: int, sampler: str, eta: float, mu: float = MU, v: float = SD**2) -> tuple[float, float]:
    """Exact mean and variance of DDPM's or DDIM's output at `steps` uniformly spaced timesteps (tests/chain_moments.py)."""
    return ancestral_moments(kept_alphas_cumprod(schedule, steps, "uniform"), mu, v, eta=eta, ddpm=sampler == "ddpm")


def gaussian_samples(schedule: str, sampler: str, steps: int, eta: float, seed: int = 0, spacing: str | None = None) -> torch.Tensor:
    diffusion = GaussianDiffusion(make_betas(schedule, 1000))
    oracle = GaussianOracle(diffusion, torch.full((2,), MU), torch.eye(2) * SD**2)
    g = torch.Generator().manual_seed(seed)
    x = diffusion.sample(oracle, (N, 2), sampler=sampler, steps=steps, eta=eta, generator=g, clip_denoised=False, spacing=spacing)
    return x.double()


CASES = [  # (sampler, steps, eta): DDPM over all T and respaced to 100; DDIM 50 with eta 0 and 1
    ("ddpm", 1000, 0.0), ("ddpm", 100, 0.0), ("ddim", 50, 0.0), ("ddim", 50, 1.0),
]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,steps,eta", CASES)
def test_gaussian_oracle_samples_have_the_exact_reverse_chain_moments(schedule, sampler, steps, eta):
    x = gaussian_samples(schedule, sampler, steps, eta)
    m, V = reverse_chain_moments(schedule, steps, sampler, eta)
    assert torch.all((x.mean(0) - m).abs() < 5 * math.sqrt(V / N))
    assert torch.all((x.var(0) - V).abs() < 5 * V * math.sqrt(2 / (N - 1)))


@pytest.mark.parametrize(
    "schedule,sampler,steps,eta,max_sd_error",
    [  # how close each sampler's spread is to the data's: discretisation error, from the recursion above
        ("linear", "ddpm", 1000, 0.0, 0.02),
        ("cosine", "ddpm", 1000, 0.0, 0.01),
        ("linear", "ddpm", 100, 0.0, 0.12),
        ("cosine", "ddpm", 100, 0.0, 0.07),
        ("linear", "ddim", 50, 0.0, 0.11),
        ("cosine", "ddim", 50, 0.0, 0.06),
        ("linear", "ddim", 50, 1.0, 0.19),
        ("cosine", "ddim", 50, 1.0, 0.12),
    ],
)
def test_gaussian_oracle_reproduces_the_data_within_the_discretisation_error(schedule, sampler, steps, eta, max_sd_error):
    m, V = reverse_chain_moments(schedule, steps, sampler, eta)
    assert abs(m - MU) < 1e-3
    assert abs(math.sqrt(V) / SD - 1) < max_sd_error
    x = gaussian_samples(schedule, sampler, steps, eta)
    assert torch.all((x.mean(0) - MU).abs() < 0.01)
    assert torch.all((x.std(0) / SD - 1).abs() < max_sd_error + 0.02)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_deterministic_ddim_converges_to_the_data_as_steps_grow(schedule):
    errors = [abs(math.sqrt(reverse_chain_moments(schedule, s, "ddim", 0.0)[1]) / SD - 1) for s in (20, 50, 200, 1000)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01
    x = gaussian_samples(schedule, "ddim", 1000, 0.0)
    assert torch.all((x.std(0) / SD - 1).abs() < 0.02)


def test_full_covariance_gaussian_with_ddpm():
    mean, cov = torch.tensor([0.2, -0.1]), torch.tensor([[0.0625, 0.02], [0.02, 0.04]])
    diffusion = GaussianDiffusion(make_betas("cosine", 1000))
    x = diffusion.sample(GaussianOracle(diffusion, mean, cov), (N, 2), generator=torch.Generator().manual_seed(3), clip_denoised=False)
    assert torch.allclose(x.mean(0), mean, atol=0.01)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.004)  # 5 standard errors of a covariance entry is about 0.0025, plus 1% bias


MIX_WEIGHTS, MIX_MEANS, MIX_VARS = torch.tensor([0.3, 0.7]), torch.tensor([[-0.5, -0.5], [0.5, 0.4]]), torch.tensor([0.01, 0.02])


@pytest.mark.parametrize(
    "sampler,steps,eta,cov_tol",
    [("ddpm", 1000, 0.0, 0.003), ("ddim", 50, 0.0, 0.012), ("ddim", 50, 1.0, 0.012)],
)
def test_mixture_oracle_reproduces_weights_mean_and_covariance(sampler, steps, eta, cov_tol):
    """2-component mixture in 2-D: component weights within 3.5 standard errors (sqrt(w (1 - w) / N) = 0.0032),
    mean and covariance within Monte Carlo error plus the sampler's discretisation error (a narrower spread
    within components: measured with the cosine schedule, about 1% for DDPM and 8% for DDIM 50)."""
    diffusion = GaussianDiffusion(make_betas("cosine", 1000))
    oracle = MixtureOracle(diffusion, MIX_WEIGHTS, MIX_MEANS, MIX_VARS)
    x = diffusion.sample(oracle, (N, 2), sampler=sampler, steps=steps, eta=eta, generator=torch.Generator().manual_seed(4), clip_denoised=False)
    data, _ = sample_mixture(MIX_WEIGHTS, MIX_MEANS, MIX_VARS, 400_000, torch.Generator().manual_seed(5))
    component = ((x.unsqueeze(1) - MIX_MEANS) ** 2).sum(-1).argmin(1)
    assert abs((component == 1).float().mean().item() - 0.7) < 3.5 * math.sqrt(0.21 / N)
    assert torch.allclose(x.mean(0), data.mean(0), atol=0.01)
    assert torch.allclose(torch.cov(x.T), torch.cov(data.T), atol=cov_tol)


def test_sampling_is_deterministic_for_a_generator_and_returns_values_in_range():
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    oracle = GaussianOracle(diffusion, torch.full((3,), 0.9), torch.eye(3) * 0.09)  # mass beyond 1: clipped output
    runs = [diffusion.sample(oracle, (64, 3), sampler=s, steps=10, eta=0.5, generator=torch.Generator().manual_seed(7)) for s in ("ddpm", "ddpm", "ddim", "ddim")]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3]) and not torch.equal(runs[0], runs[2])
    assert all(bool((r.abs() <= 1).all()) for r in runs)
    other = diffusion.sample(oracle, (64, 3), steps=10, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other, runs[0])


def test_respaced_process_keeps_alpha_bar_at_the_kept_steps():
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    kept = spaced_timesteps(1000, 100)
    respaced = diffusion.respace(kept)
    assert respaced.num_timesteps == 100 and torch.equal(respaced.timestep_map, kept)
    assert torch.allclose(respaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-5)
    assert kept[0] == 0 and kept[-1] == 999


def test_bad_sampling_arguments_are_rejected():
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 100\]"):
        diffusion.sample(model, (1, 2), steps=101)
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 100\]"):
        diffusion.sample(model, (1, 2), steps=0)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        diffusion.sample(model, (1, 2), sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="unknown sampler 'euler'; known samplers: ddim, ddpm"):
        diffusion.sample(model, (1, 2), sampler="euler")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["dpmsolver++", "heun"])
def test_second_order_solvers_converge_to_the_data(schedule, sampler):
    """DPM-Solver++(2M) and Heun are consistent ODE solvers: with the oracle, their spread reaches the
    data's within 2% at 200 uniformly spaced steps and the error shrinks from 50 to 200 steps."""
    def sd_error(steps):
        x = gaussian_samples(schedule, sampler, steps, 0.0, spacing="uniform")
        assert torch.all((x.mean(0) - MU).abs() < 0.01)
        return (x.std(0) / SD - 1).abs().max().item()

    coarse, fine = sd_error(50), sd_error(200)
    assert fine < 0.02 and fine < coarse


@pytest.mark.parametrize(
    "schedule,sampler,steps,max_sd_error",
    [  # few-step budgets with Karras et al.'s sigma spacing (measured errors: about 6%, 6%, 6%)
        ("linear", "dpmsolver++", 20, 0.09),
        ("cosine", "dpmsolver++", 20, 0.09),
        ("linear", "heun", 20, 0.09),
    ],
)
def test_second_order_solvers_at_few_steps_with_karras_spacing(schedule, sampler, steps, max_sd_error):
    diffusion = GaussianDiffusion(make_betas(schedule, 1000))
    oracle = GaussianOracle(diffusion, torch.full((2,), MU), torch.eye(2) * SD**2)
    x = diffusion.sample(oracle, (N, 2), sampler=sampler, steps=steps, spacing="karras", generator=torch.Generator().manual_seed(0), clip_denoised=False)
    assert torch.all((x.mean(0) - MU).abs() < 0.01)
    assert torch.all((x.std(0) / SD - 1).abs() < max_sd_error)


def test_dpm_solver_reproduces_the_mixture_at_20_steps():
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    oracle = MixtureOracle(diffusion, MIX_WEIGHTS, MIX_MEANS, MIX_VARS)
    x = diffusion.sample(oracle, (N, 2), sampler="dpmsolver++", steps=20, spacing="karras", generator=torch.Generator().manual_seed(4), clip_denoised=False)
    data, _ = sample_mixture(MIX_WEIGHTS, MIX_MEANS, MIX_VARS, 400_000, torch.Generator().manual_seed(5))
    component = ((x.unsqueeze(1) - MIX_MEANS) ** 2).sum(-1).argmin(1)
    assert abs((component == 1).float().mean().item() - 0.7) < 3.5 * math.sqrt(0.21 / N)
    assert torch.allclose(x.mean(0), data.mean(0), atol=0.01)
    # measured 0.014 off on the variance: the 2nd-order steps push the components slightly apart
    assert torch.allclose(torch.cov(x.T), torch.cov(data.T), atol=0.02)


@pytest.mark.parametrize("spacing", ["uniform", "trailing", "karras"])
def test_spacings_give_sorted_timesteps_that_end_at_the_noisiest_step(spacing):
    """uniform and trailing end at T - 1; karras at sigma_max = min(sigma_{T-1}, 80), which is T - 1 only when
    every timestep is kept (tests/test_combinations.py checks the counts and the clamp on every schedule)."""
    alphas_cumprod = torch.cumprod(1 - make_betas("linear", 1000), 0)
    for steps in (1, 5, 20, 1000):
        kept = spaced_timesteps(1000, steps, spacing, alphas_cumprod)
        assert bool((kept.diff() > 0).all()) and len(kept) == steps
        assert kept[-1] == 999 or (spacing == "karras" and steps < 1000)
    assert spaced_timesteps(1000, 5, "trailing").tolist() == [199, 399, 599, 799, 999]
    with pytest.raises(ValueError, match="spacing must be one of uniform, trailing, karras"):
        spaced_timesteps(1000, 5, "log")


def dpm_solver_chain_moments(schedule: str, steps: int, s_tmax: float, spacing: str = "karras") -> tuple[float, float]:
    """Exact mean and variance of DPM-Solver++(2M)'s output, noise on the steps with sigma/alpha <= s_tmax (tests/chain_moments.py)."""
    return dpm_solver_moments(kept_alphas_cumprod(schedule, steps, spacing), MU, SD**2, s_tmax=s_tmax)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,s_tmax", [("dpmsolver++", 0.0), ("dpmsolver++sde", 1.0), ("dpmsolver++sde", math.inf)])
def test_dpm_solver_samples_have_the_exact_multistep_moments(schedule, sampler, s_tmax):
    """ODE and SDE DPM-Solver++(2M) at 20 Karras-spaced steps: sample moments equal the exact recursion
    within 5 standard errors (the SDE's noise draws and the 2nd-order memory both enter the recursion)."""
    diffusion = GaussianDiffusion(make_betas(schedule, 1000))
    oracle = GaussianOracle(diffusion, torch.full((2,), MU), torch.eye(2) * SD**2)
    options = {"s_tmax": s_tmax} if sampler == "dpmsolver++sde" else None
    x = diffusion.sample(oracle, (N, 2), sampler=sampler, steps=20, generator=torch.Generator().manual_seed(0),
                         clip_denoised=False, sampler_options=options).double()  # fmt: skip
    m, V = dpm_solver_chain_moments(schedule, 20, s_tmax)
    assert torch.all((x.mean(0) - m).abs() < 5 * math.sqrt(V / N))
    assert torch.all((x.var(0) - V).abs() < 5 * V * math.sqrt(2 / (N - 1)))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("s_tmax", [1.0, math.inf])
def test_sde_dpm_solver_converges_to_the_data_as_steps_grow(schedule, s_tmax):
    """The exact spread's error shrinks from 50 to 200 Karras-spaced steps and is under 1% from 200 on (at 50:
    about 2% on both schedules; at 200 and 1000 about 0.1%, where starting from N(0, I) at the top timestep is
    the rest); the mean is exact within 1e-3 throughout. Sampled check at 200."""
    moments = [dpm_solver_chain_moments(schedule, s, s_tmax) for s in (50, 200, 1000)]
    errors = [abs(math.sqrt(V) / SD - 1) for _, V in moments]
    assert errors[1] < errors[0] and max(errors[1:]) < 0.01
    assert all(abs(m - MU) < 1e-3 for m, _ in moments)
    diffusion = GaussianDiffusion(make_betas(schedule, 1000))
    oracle = GaussianOracle(diffusion, torch.full((2,), MU), torch.eye(2) * SD**2)
    x = diffusion.sample(oracle, (N, 2), "dpmsolver++sde", 200, generator=torch.Generator().manual_seed(2),
                         clip_denoised=False, sampler_options={"s_tmax": s_tmax})  # fmt: skip
    assert torch.all((x.mean(0) - MU).abs() < 0.01) and torch.all((x.std(0) / SD - 1).abs() < 0.03)


def test_sde_dpm_solver_without_noise_steps_is_dpm_solver():
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    oracle = GaussianOracle(diffusion, torch.full((2,), MU), torch.eye(2) * SD**2)
    ode = diffusion.sample(oracle, (64, 2), "dpmsolver++", 20, generator=torch.Generator().manual_seed(1))
    sde = [diffusion.sample(oracle, (64, 2), "dpmsolver++sde", 20, generator=torch.Generator().manual_seed(1), sampler_options={"s_tmax": s})
           for s in (0.0, 1.0)]  # fmt: skip
    assert torch.equal(ode, sde[0]) and not torch.equal(ode, sde[1])


def test_sde_dpm_solver_reproduces_the_mixture_at_20_steps():
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    oracle = MixtureOracle(diffusion, MIX_WEIGHTS, MIX_MEANS, MIX_VARS)
    x = diffusion.sample(oracle, (N, 2), sampler="dpmsolver++sde", steps=20, generator=torch.Generator().manual_seed(4), clip_denoised=False)
    data, _ = sample_mixture(MIX_WEIGHTS, MIX_MEANS, MIX_VARS, 400_000, torch.Generator().manual_seed(5))
    component = ((x.unsqueeze(1) - MIX_MEANS) ** 2).sum(-1).argmin(1)
    assert abs((component == 1).float().mean().item() - 0.7) < 3.5 * math.sqrt(0.21 / N)
    # measured 0.013 off on the mean (noise on every step, the default) and 0.024 on the variance: about 9% wider
    # in spread, as the exact Gaussian recursion has it at 20 steps
    assert torch.allclose(x.mean(0), data.mean(0), atol=0.02)
    assert torch.allclose(torch.cov(x.T), torch.cov(data.T), atol=0.03)
