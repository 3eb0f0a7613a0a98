"""Noise schedules: the betas of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

References:
- Ho et al. 2020, "Denoising Diffusion Probabilistic Models", sec. 4: linear betas 1e-4 -> 0.02, T = 1000.
- Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", eq. 17: cosine schedule.

Adding a schedule is one function decorated with `@register_schedule("name")` plus one YAML file in
conf/schedule/. Betas are computed in float64 (the constants derived from them are products of up to
T factors); consumers cast them when they store them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ddpm.registry import registrar

MAX_BETA = 0.999  # Nichol & Dhariwal 2021, sec. 3.2: clip betas to avoid singularities near t = T

SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {}


register_schedule = registrar(SCHEDULES)  # `@register_schedule(name)` adds a `betas(timesteps) -> (T,) float64` function.


@register_schedule("linear")
def linear_betas(timesteps: int) -> torch.Tensor:
    """Ho et al. 2020: beta_t linear from 1e-4 to 0.02 at T = 1000.

    For other T both ends are scaled by 1000 / T (as improved-diffusion does), so that the total
    noise sum_t beta_t stays comparable; betas are clipped at MAX_BETA for very short chains.
    """
    scale = 1000.0 / timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    return betas.clamp(max=MAX_BETA)


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17 (before normalisation): cos^2(((t + s) / (1 + s)) * pi / 2), t in [0, 1]."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


@register_schedule("cosine")
def cosine_betas(timesteps: int) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: beta_t = 1 - alpha_bar(t/T) / alpha_bar((t-1)/T), clipped at 0.999."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = cosine_alpha_bar(t)
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=MAX_BETA)


def make_betas(name: str, timesteps: int) -> torch.Tensor:
    """The betas of schedule `name` over `timesteps` steps: a float64 tensor of shape (T,), values in (0, 0.999]."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(sorted(SCHEDULES))}")
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"schedule timesteps must be an integer >= 1, got {timesteps!r}")
    betas = SCHEDULES[name](timesteps)
    assert betas.shape == (timesteps,) and bool(((betas > 0) & (betas <= MAX_BETA)).all()), name
    return betas
