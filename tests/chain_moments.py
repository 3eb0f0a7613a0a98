"""Exact output moments of every registered sampler for Gaussian data N(mu, v), fed the exact posterior-mean oracle.

For Gaussian data each sampler step is affine in its state plus independent Gaussian noise, so the output's
mean and variance follow from a recursion over the kept alpha_bar values, written here from the papers'
update rules and independently of ddpm.samplers. A sampler whose samples disagree with its recursion is
implemented wrong; a recursion whose variance differs from v measures the sampler's discretisation error.

With a = alpha_bar at the current kept step and a' at the next (1 after the last), the oracle is
x0_hat = offset + g x with g = sqrt(a) v / (a v + 1 - a) and offset = mu - g sqrt(a) mu.

`EXACT_MOMENTS[name](alphas_cumprod, mu, v, **options) -> (mean, variance)` takes the kept alpha_bar values
(ascending timesteps); a sampler registered without an entry here fails the combination tests.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ddpm import make_betas
from ddpm.diffusion import spaced_timesteps
from ddpm.samplers import SDE_S_TMAX


def kept_alphas_cumprod(schedule: str, steps: int, spacing: str, timesteps: int = 1000) -> list[float]:
    """alpha_bar at the timesteps a sampler with `steps` and `spacing` visits, ascending."""
    alphas_cumprod = torch.cumprod(1 - make_betas(schedule, timesteps), 0)
    return alphas_cumprod[spaced_timesteps(timesteps, steps, spacing, alphas_cumprod)].tolist()


def _oracle(a: float, mu: float, v: float) -> tuple[float, float]:
    g = math.sqrt(a) * v / (a * v + 1 - a)
    return g, mu - g * math.sqrt(a) * mu


def ancestral_moments(alphas: list[float], mu: float, v: float, eta: float = 1.0, ddpm: bool = True) -> tuple[float, float]:
    """DDPM (Ho et al. 2020 eq. 7 with beta = 1 - a / a'): x' = c1 x0_hat + c2 x + sqrt(beta~) z; DDIM (Song et al.
    2021 eq. 12): x' = sqrt(a') x0_hat + sqrt(1 - a' - s^2) (x - sqrt(a) x0_hat) / sqrt(1 - a) + s z, s^2 = eta^2 beta~."""
    m, V = 0.0, 1.0
    for i in range(len(alphas) - 1, -1, -1):
        a, a_prev = alphas[i], alphas[i - 1] if i > 0 else 1.0
        g, offset = _oracle(a, mu, v)
        beta = 1 - a / a_prev
        if ddpm:
            c1, c2 = math.sqrt(a_prev) * beta / (1 - a), math.sqrt(a / a_prev) * (1 - a_prev) / (1 - a)
            L, K = c1 * g + c2, c1 * offset
            noise = beta * (1 - a_prev) / (1 - a) if i > 0 else 0.0
        else:
            noise = eta**2 * (1 - a_prev) / (1 - a) * beta if i > 0 else 0.0
            c = math.sqrt(max(1 - a_prev - noise, 0.0)) / math.sqrt(1 - a)
            L = math.sqrt(a_prev) * g + c * (1 - math.sqrt(a) * g)
            K = (math.sqrt(a_prev) - c * math.sqrt(a)) * offset
        m, V = L * m + K, L**2 * V + noise
    return m, V


def dpm_solver_moments(alphas: list[float], mu: float, v: float, s_tmax: float = 0.0) -> tuple[float, float]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) and its SDE variant with noise where sigma/alpha <= s_tmax.

    x' = A x + B D + n z, D = x0_hat + c (x0_hat - x0_prev), A = (sigma'/sigma) e^{-eta h}, B = alpha' (1 - e^{-(1 + eta) h}),
    n = sigma' sqrt(1 - e^{-2 eta h}), c = h / (2 h_prev) (0 on the first step): linear in (x, x0_prev), so the mean
    and the 2x2 covariance follow exactly. The last step returns x0_hat.
    """
    mean, cov = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    previous_h = None
    for i in range(len(alphas) - 1, 0, -1):
        a, a_next = alphas[i], alphas[i - 1]
        g, offset = _oracle(a, mu, v)
        h = 0.5 * math.log(a_next / (1 - a_next)) - 0.5 * math.log(a / (1 - a))
        eta = 1.0 if math.sqrt((1 - a) / a) <= s_tmax else 0.0
        A = math.sqrt((1 - a_next) / (1 - a)) * math.exp(-eta * h)
        B = math.sqrt(a_next) * (1 - math.exp(-(1 + eta) * h))
        n2 = (1 - a_next) * (1 - math.exp(-2 * eta * h))
        c = 0.0 if previous_h is None else h / (2 * previous_h)
        M = torch.tensor([[A + B * (1 + c) * g, -B * c], [g, 0.0]], dtype=torch.float64)
        mean = M @ mean + torch.tensor([B * (1 + c) * offset, offset], dtype=torch.float64)
        cov = M @ cov @ M.T + torch.diag(torch.tensor([n2, 0.0], dtype=torch.float64))
        previous_h = h
    g, offset = _oracle(alphas[0], mu, v)
    return offset + g * mean[0].item(), g**2 * cov[0, 0].item()


def heun_moments(alphas: list[float], mu: float, v: float) -> tuple[float, float]:
    """Heun's method on the probability-flow ODE in x~ = x / sqrt(a), sigma = sqrt((1 - a) / a) (Karras et al. 2022,
    Alg. 1, S_churn = 0): d = (x~ - D(x~)) / sigma with D = x0_hat(sqrt(a) x~); x_e = x~ + (sigma' - sigma) d;
    x~' = x~ + (sigma' - sigma) (d + d(x_e; sigma')) / 2; the last step (Euler to sigma = 0) returns D."""

    def denoiser(i: int) -> tuple[float, float]:  # D(x~) = o + G x~ at kept step i
        g, offset = _oracle(alphas[i], mu, v)
        return g * math.sqrt(alphas[i]), offset

    sigmas = [math.sqrt((1 - a) / a) for a in alphas]
    m, V = 0.0, 1.0 / alphas[-1]  # x~_T = x_T / sqrt(a_T)
    for i in range(len(alphas) - 1, 0, -1):
        G, o = denoiser(i)
        Gn, on = denoiser(i - 1)
        s, sn = sigmas[i], sigmas[i - 1]
        dL, dK = (1 - G) / s, -o / s  # d = dL x + dK
        eL, eK = 1 + (sn - s) * dL, (sn - s) * dK  # x_e = eL x + eK
        dnL, dnK = (1 - Gn) * eL / sn, ((1 - Gn) * eK - on) / sn  # d' = dnL x + dnK
        L, K = 1 + (sn - s) * 0.5 * (dL + dnL), (sn - s) * 0.5 * (dK + dnK)
        m, V = L * m + K, L**2 * V
    G, o = denoiser(0)
    return o + G * m, G**2 * V


EXACT_MOMENTS: dict[str, Callable[..., tuple[float, float]]] = {
    "ddpm": lambda alphas, mu, v, eta=1.0: ancestral_moments(alphas, mu, v, ddpm=True),
    "ddim": lambda alphas, mu, v, eta=0.0: ancestral_moments(alphas, mu, v, eta=eta, ddpm=False),
    "dpmsolver++": lambda alphas, mu, v, eta=0.0: dpm_solver_moments(alphas, mu, v, s_tmax=0.0),
    "dpmsolver++sde": lambda alphas, mu, v, eta=0.0, s_tmax=SDE_S_TMAX: dpm_solver_moments(alphas, mu, v, s_tmax=s_tmax),
    "heun": lambda alphas, mu, v, eta=0.0: heun_moments(alphas, mu, v),
}


def clamped_moments(mean: float, variance: float) -> tuple[float, float, float]:
    """Mean, variance and 4th central moment of clamp(X, -1, 1) for X ~ N(mean, variance), as sampling returns
    values in [-1, 1]; by quadrature over z in [-12, 12] (error far below the Monte Carlo tolerances)."""
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    w = torch.exp(-0.5 * z**2) * (z[1] - z[0]) / math.sqrt(2 * math.pi)
    y = (mean + math.sqrt(variance) * z).clamp(-1, 1)
    m = (w * y).sum().item()
    return m, (w * (y - m) ** 2).sum().item(), (w * (y - m) ** 4).sum().item()
