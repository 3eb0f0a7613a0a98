"""Reverse-process samplers over a GaussianDiffusion: ancestral DDPM, DDIM, DPM-Solver++(2M) (ODE and SDE) and Heun.

Each sampler is a plain function `(diffusion, model, x_T, *, generator, eta, progress, model_kwargs,
clip_denoised, replace, **options) -> x_0`, registered by name; `GaussianDiffusion.sample` picks the process (full or
respaced to fewer steps) and the starting noise, then calls one of these. Adding a sampler is one
function decorated with `@register_sampler("name")`. Pure PyTorch.

References:
- Ho et al. 2020, Algorithm 2 (ancestral sampling), eq. 11.
- Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 (and eq. 16 for sigma_t(eta)).
- Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Alg. 2
  and its SDE variant (SDE-DPM-Solver++(2M)).
- Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Alg. 1 and 2.
- Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models", Alg. 1 (`replace`
  and ddpm's `resample`).
"""
from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from ddpm.diffusion import GaussianDiffusion

Sampler = Callable[..., Tensor]
Replace = Callable[[Tensor, int], Tensor]  # (x at step i of the process, i) -> x; i = -1: the data
SAMPLERS: dict[str, Sampler] = {}
STOCHASTIC: set[str] = set()  # samplers that draw fresh noise on their steps (ddim does when eta > 0)
DEFAULT_SPACING: dict[str, str] = {}  # the timestep spacing each sampler uses unless told otherwise
EVALUATIONS_PER_STEP: dict[str, Callable[[int], int]] = {}  # network evaluations for K visited timesteps


def register_sampler(
    name: str, spacing: str = "uniform", evaluations: Callable[[int], int] = lambda steps: steps, stochastic: bool = False
) -> Callable[[Sampler], Sampler]:
    """Decorator that adds a sampler function to SAMPLERS under `name`, with its default timestep spacing, the
    number of network evaluations it makes over `steps` visited timesteps (one per timestep unless told), and
    whether it draws noise on its steps."""

    def add(fn: Sampler) -> Sampler:
        SAMPLERS[name] = fn
        DEFAULT_SPACING[name] = spacing
        EVALUATIONS_PER_STEP[name] = evaluations
        if stochastic:
            STOCHASTIC.add(name)
        return fn

    return add


def network_evaluations(name: str, steps: int) -> int:
    """How many times sampler `name` calls the network over `steps` visited timesteps (its NFE)."""
    return EVALUATIONS_PER_STEP[name](steps)


COMMON_OPTIONS = frozenset({"generator", "eta", "progress", "model_kwargs", "clip_denoised", "replace"})


def sampler_options(name: str) -> dict[str, object]:
    """The keyword options particular to sampler `name` (beyond COMMON_OPTIONS), with their defaults."""
    params = inspect.signature(SAMPLERS[name]).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in COMMON_OPTIONS}


def _reverse_steps(diffusion: GaussianDiffusion, progress: bool, desc: str) -> list[int]:
    steps = list(range(diffusion.num_timesteps))[::-1]
    return tqdm(steps, desc=desc, leave=False) if progress else steps


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _replaced(x: Tensor, i: int, replace: Replace | None) -> Tensor:
    return x if replace is None else replace(x, i)


@register_sampler("ddpm", stochastic=True)
def ddpm_sample(
    diffusion: GaussianDiffusion, model: Callable[..., Tensor], x: Tensor, *, generator: torch.Generator | None = None,
    eta: float = 1.0, progress: bool = False, model_kwargs: dict | None = None, clip_denoised: bool = True,
    replace: Replace | None = None, resample: int = 1,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t-1} = mu_theta(x_t, t) + sigma_t z, no noise at t = 0.

    `resample` = U > 1 repeats each step but the last U times, going back by the forward step
    x_t ~ N(sqrt(1 - beta_t) x_{t-1}, beta_t I) in between (RePaint, Lugmayr et al. 2022, Alg. 1 with jump
    length 1): with `replace` (inpainting) it lets the generated region agree with the kept one; it costs
    U network evaluations per step. `eta` is ignored (ancestral sampling is stochastic by definition).
    """
    for i in _reverse_steps(diffusion, progress, "ddpm"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        for u in range(resample if i > 0 else 1):
            if u > 0:  # back to step i from step i - 1
                beta = diffusion.betas[i].float()
                x = (1 - beta).sqrt() * x + beta.sqrt() * _randn_like(x, generator)
            p = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            x = _replaced(p.mean + (0.5 * p.log_variance).exp() * _randn_like(x, generator) if i > 0 else p.mean, i - 1, replace)
    return x


@register_sampler("ddim")
def ddim_sample(
    diffusion: GaussianDiffusion, model: Callable[..., Tensor], x: Tensor, *, generator: torch.Generator | None = None,
    eta: float = 0.0, progress: bool = False, model_kwargs: dict | None = None, clip_denoised: bool = True,
    replace: Replace | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) over the steps of `diffusion` (a respaced process for fewer steps).

    x_{t-1} = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma^2) eps_pred + sigma z, with
    sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev) (eq. 16): eta = 0 is deterministic,
    eta = 1 matches the DDPM posterior variance. eps_pred is recomputed from the (clipped) x0_pred.
    """
    for i in _reverse_steps(diffusion, progress, "ddim"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        eps = diffusion.predict_eps_from_x0(x, t, p.pred_x0)
        a = diffusion.alphas_cumprod[i].float()
        a_prev = diffusion.alphas_cumprod_prev[i].float()
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * p.pred_x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if i > 0 and eta > 0:
            x = x + sigma * _randn_like(x, generator)
        x = _replaced(x, i - 1, replace)
    return x


def _log_snr_half(alpha_bar: Tensor) -> Tensor:
    """lambda = log(alpha / sigma) = 0.5 log(alpha_bar / (1 - alpha_bar)), the half log-SNR of DPM-Solver."""
    return 0.5 * (alpha_bar.log() - torch.log1p(-alpha_bar))


def _dpm_solver_pp_2m(
    diffusion: GaussianDiffusion, model: Callable[..., Tensor], x: Tensor, generator: torch.Generator | None,
    eta: float, s_tmax: float, progress: bool, model_kwargs: dict | None, clip_denoised: bool, desc: str,
    replace: Replace | None,
) -> Tensor:
    """The 2nd-order multistep update in the data prediction, as an ODE (eta = 0) or an SDE (eta > 0).

    With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma), h = lambda' - lambda
    and D = (1 + 1/(2 r)) x0 - 1/(2 r) x0_prev, r = h_prev / h (D = x0 on the first step):
        x' = (sigma' / sigma) e^{-eta h} x + alpha' (1 - e^{-(1 + eta) h}) D + eta-noise sigma' sqrt(1 - e^{-2 eta h}) z.
    eta = 0 is DPM-Solver++(2M) (Lu et al. 2022, Alg. 2); eta = 1 is SDE-DPM-Solver++(2M) (the same paper's
    SDE solver; diffusers' "sde-dpmsolver++", k-diffusion's dpmpp_2m_sde with its midpoint rule). Noise enters
    only on steps whose variance-exploding sigma/alpha is at most `s_tmax` (Karras et al. 2022, Alg. 2's
    S_tmax); the other steps take the eta = 0 update. The last step, to alpha_bar = 1, returns the data prediction.
    """
    previous_x0, previous_h = None, None
    for i in _reverse_steps(diffusion, progress, desc):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x0 = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs).pred_x0
        a = diffusion.alphas_cumprod[i].double()
        if i == 0:  # last step: to alpha_bar = 1, where sigma = 0 and x equals the data prediction
            return _replaced(x0, -1, replace)
        a_next = diffusion.alphas_cumprod_prev[i].double()
        h = _log_snr_half(a_next) - _log_snr_half(a)
        eta_i = eta if ((1 - a) / a).sqrt() <= s_tmax else 0.0
        D = x0 if previous_x0 is None else x0 + (x0 - previous_x0) * (h / (2 * previous_h)).float()
        decay = -torch.expm1(-(1 + eta_i) * h)  # 1 - e^{-(1 + eta) h}
        x = (((1 - a_next) / (1 - a)).sqrt() * torch.exp(-eta_i * h)).float() * x + (a_next.sqrt() * decay).float() * D
        if eta_i > 0:
            x = x + ((1 - a_next) * -torch.expm1(-2 * eta_i * h)).sqrt().float() * _randn_like(x, generator)
        x = _replaced(x, i - 1, replace)
        previous_x0, previous_h = x0, h
    return x


@register_sampler("dpmsolver++", spacing="karras")
def dpm_solver_pp_2m_sample(
    diffusion: GaussianDiffusion, model: Callable[..., Tensor], x: Tensor, *, generator: torch.Generator | None = None,
    eta: float = 0.0, progress: bool = False, model_kwargs: dict | None = None, clip_denoised: bool = True,
    replace: Replace | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep 2nd order in the data prediction.

    The update of `_dpm_solver_pp_2m` with eta = 0: x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i
    (first order on the first step and on the last, which lands on alpha_bar = 1, i.e. returns the data
    prediction). One network evaluation per step of `diffusion`. Deterministic: `eta` and `generator` are unused.
    """
    return _dpm_solver_pp_2m(diffusion, model, x, None, 0.0, 0.0, progress, model_kwargs, clip_denoised, "dpmsolver++", replace)


SDE_S_TMAX = math.inf  # dpmsolver++sde's default: noise on every step, as Lu et al. 2022 publish the SDE solver


@register_sampler("dpmsolver++sde", spacing="karras", stochastic=True)
def sde_dpm_solver_pp_2m_sample(
    diffusion: GaussianDiffusion, model: Callable[..., Tensor], x: Tensor, *, generator: torch.Generator | None = None,
    eta: float = 1.0, progress: bool = False, model_kwargs: dict | None = None, clip_denoised: bool = True,
    replace: Replace | None = None, s_tmax: float = SDE_S_TMAX,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022; diffusers' "sde-dpmsolver++"), by default with noise on every step.

    The update of `_dpm_solver_pp_2m` with noise scale 1 on the steps whose sigma/alpha is at most `s_tmax`
    (Karras et al. 2022's S_tmax: fresh noise can correct the network's errors, at the cost of a larger
    discretisation error per step, which at few steps is largest where the noise is high); the other
    steps are the ODE's. s_tmax = inf injects noise on every step (Lu et al.'s SDE solver as published); 0 is dpmsolver++.
    Every choice keeps the marginals of the diffusion (Karras et al. 2022 eq. 6), so the sampler converges
    to the data as the steps grow. `eta` is ignored (the solver is stochastic by definition, as ddpm is).
    """
    return _dpm_solver_pp_2m(diffusion, model, x, generator, 1.0, s_tmax, progress, model_kwargs, clip_denoised, "dpmsolver++sde", replace)


@register_sampler("heun", spacing="karras", evaluations=lambda steps: 2 * steps - 1)
def heun_sample(
    diffusion: GaussianDiffusion, model: Callable[..., Tensor], x: Tensor, *, generator: torch.Generator | None = None,
    eta: float = 0.0, progress: bool = False, model_kwargs: dict | None = None, clip_denoised: bool = True,
    replace: Replace | None = None,
) -> Tensor:
    """Heun's 2nd-order ODE solver (Karras et al. 2022, "EDM", Algorithm 1 with S_churn = 0).

    In the variance-exploding variable x~ = x / sqrt(alpha_bar) with sigma = sqrt((1 - alpha_bar) / alpha_bar),
    the probability-flow ODE is dx~/dsigma = (x~ - D(x~; sigma)) / sigma, D the x_0 prediction. Steps run
    over the sigmas of `diffusion`'s timesteps and end at sigma = 0 with an Euler step: 2 K - 1 network
    evaluations for K timesteps. Deterministic: `eta` and `generator` are unused.
    """
    steps = list(_reverse_steps(diffusion, progress, "heun"))
    alphas_cumprod = diffusion.alphas_cumprod.double()
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()

    def denoise(x_ve: Tensor, i: int) -> Tensor:
        t = torch.full((x_ve.shape[0],), i, device=x_ve.device, dtype=torch.long)
        x_t = x_ve * alphas_cumprod[i].sqrt().float()
        return diffusion.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs).pred_x0

    x_ve = x / alphas_cumprod[steps[0]].sqrt().float()
    for i in steps:
        sigma = sigmas[i].float()
        d = (x_ve - denoise(x_ve, i)) / sigma  # dx~/dsigma at sigma_i
        if i == 0:  # Euler to sigma = 0
            return _replaced(x_ve - sigma * d, -1, replace)
        sigma_next = sigmas[i - 1].float()
        x_euler = x_ve + (sigma_next - sigma) * d
        d_next = (x_euler - denoise(x_euler, i - 1)) / sigma_next
        x_ve = x_ve + (sigma_next - sigma) * 0.5 * (d + d_next)
        if replace is not None:  # in x_t = sqrt(alpha_bar) x~
            scale = alphas_cumprod[i - 1].sqrt().float()
            x_ve = replace(x_ve * scale, i - 1) / scale
    return x_ve


def ddim_invert(
    diffusion: GaussianDiffusion, model: Callable[..., Tensor], x0: Tensor, *, progress: bool = False,
    model_kwargs: dict | None = None,
) -> Tensor:
    """DDIM inversion: the deterministic encoding of data x0 to x at the last step of `diffusion` (a respaced
    process for fewer steps), DDIM's eta = 0 update (Song et al. 2021, eq. 13, the ODE) run forward in time:
        x_i = sqrt(a_i) x0_hat + sqrt(1 - a_i) eps_hat,  (eps_hat, x0_hat) the network's at (x_{i-1}, t_{i-1}),
    and at i = 0 eps_hat = eps_theta(x0, t_0) with x0_hat = x0 itself. Unclipped: ddim with eta = 0 and
    clip_denoised=False over the same process decodes it back, with an error that falls as the steps grow
    (the inversion evaluates the network one step below where the decoder does)."""
    x = x0.float()
    steps = range(diffusion.num_timesteps)
    for i in tqdm(steps, desc="ddim inversion", leave=False) if progress else steps:
        t = torch.full((x.shape[0],), max(i - 1, 0), device=x.device, dtype=torch.long)
        x0_hat = diffusion.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs=model_kwargs).pred_x0
        eps = diffusion.predict_eps_from_x0(x, t, x0_hat)
        if i == 0:
            x0_hat = x
        a = diffusion.alphas_cumprod[i].float()
        x = a.sqrt() * x0_hat + (1 - a).sqrt() * eps
    return x


def slerp(z0: Tensor, z1: Tensor, w: float | Tensor) -> Tensor:
    """Spherical interpolation between noises z0 and z1 (per sample: the dims after the first), w in [0, 1]:
    sin((1 - w) theta) / sin theta z0 + sin(w theta) / sin theta z1, theta their angle; keeps a Gaussian's
    norm where the straight line would shrink it (linear interpolation when they are parallel)."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = cos.clamp(-1, 1).acos()[:, None]
    w = torch.as_tensor(w, dtype=torch.float64)
    small = theta < 1e-6
    s0 = torch.where(small, 1 - w, torch.sin((1 - w) * theta) / torch.sin(theta).clamp(min=1e-12))
    s1 = torch.where(small, w, torch.sin(w * theta) / torch.sin(theta).clamp(min=1e-12))
    return (s0 * a + s1 * b).reshape(z0.shape).to(z0.dtype)
