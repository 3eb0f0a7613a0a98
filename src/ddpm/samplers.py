"""Reverse-process samplers over a GaussianDiffusion: ancestral DDPM and DDIM.

Each sampler is a plain function `(diffusion, model, x_T, *, generator, eta, progress, model_kwargs,
clip_denoised) -> x_0`, registered by name; `GaussianDiffusion.sample` picks the process (full or
respaced to fewer steps) and the starting noise, then calls one of these. Adding a sampler is one
function decorated with `@register_sampler("name")`. Pure PyTorch.

References:
- Ho et al. 2020, Algorithm 2 (ancestral sampling), eq. 11.
- Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 (and eq. 16 for sigma_t(eta)).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from ddpm.diffusion import GaussianDiffusion

Sampler = Callable[..., Tensor]
SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str) -> Callable[[Sampler], Sampler]:
    """Decorator that adds a sampler function to SAMPLERS under `name`."""

    def add(fn: Sampler) -> Sampler:
        SAMPLERS[name] = fn
        return fn

    return add


def _reverse_steps(diffusion: GaussianDiffusion, progress: bool, desc: str) -> list[int]:
    steps = list(range(diffusion.num_timesteps))[::-1]
    return tqdm(steps, desc=desc, leave=False) if progress else steps


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@register_sampler("ddpm")
def ddpm_sample(
    diffusion: GaussianDiffusion, model: Callable[..., Tensor], x: Tensor, *, generator: torch.Generator | None = None,
    eta: float = 1.0, progress: bool = False, model_kwargs: dict | None = None, clip_denoised: bool = True,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t-1} = mu_theta(x_t, t) + sigma_t z, no noise at t = 0.

    `eta` is ignored (ancestral sampling is stochastic by definition).
    """
    for i in _reverse_steps(diffusion, progress, "ddpm"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        x = p.mean + (0.5 * p.log_variance).exp() * _randn_like(x, generator) if i > 0 else p.mean
    return x


@register_sampler("ddim")
def ddim_sample(
    diffusion: GaussianDiffusion, model: Callable[..., Tensor], x: Tensor, *, generator: torch.Generator | None = None,
    eta: float = 0.0, progress: bool = False, model_kwargs: dict | None = None, clip_denoised: bool = True,
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
    return x
