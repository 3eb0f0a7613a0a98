"""Closed-form optimal denoisers for data with known distributions, used as `model` in the diffusion tests.

For x_t = a x_0 + s eps with a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t):
- Gaussian data x_0 ~ N(mu, Sigma): E[x_0 | x_t] = mu + a Sigma (a^2 Sigma + s^2 I)^{-1} (x_t - a mu).
- Mixture sum_k w_k N(mu_k, v_k I): responsibilities r_k(x_t) proportional to w_k N(x_t; a mu_k, (a^2 v_k + s^2) I),
  E[x_0 | x_t] = sum_k r_k [mu_k + a v_k / (a^2 v_k + s^2) (x_t - a mu_k)].
The minimiser of L_simple is this posterior mean expressed in the objective's parameterisation, so
a sampler fed by the oracle must reproduce the data distribution up to its discretisation error.
For objective "edm" (Karras et al. 2022 table 1 with sigma = s / a, y = x_t / a = x_0 + sigma eps) the network
sees c_in y with c_in = 1 / sqrt(sigma^2 + sigma_data^2) and outputs F with x_0 = c_skip y + c_out F,
c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ddpm import GaussianDiffusion


class Oracle(ABC):
    """Wraps a posterior-mean function x0_hat(x_t, a, s) as a network for `diffusion`'s objective."""

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        self.diffusion = diffusion
        self.alphas_cumprod = torch.cumprod(1.0 - diffusion.betas.double(), 0)  # original timesteps

    @abstractmethod
    def posterior_mean(self, xt: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """E[x_0 | x_t] in float64, shape of xt; a and s are (B, 1, ...) broadcastable."""

    def __call__(self, net_input: Tensor, t: Tensor) -> Tensor:
        alpha_bar = self.alphas_cumprod[t].reshape(-1, *([1] * (net_input.ndim - 1)))
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        objective = self.diffusion.objective
        if objective == "edm":
            sigma, sigma_data = s / a, self.diffusion.sigma_data
            c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
            c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
            c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
            y = net_input.double() / c_in
            return ((self.posterior_mean(a * y, a, s) - c_skip * y) / c_out).float()
        xt = net_input.double()
        x0 = self.posterior_mean(xt, a, s)
        eps = (xt - a * x0) / s
        out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[objective]
        return out.float()


class GaussianOracle(Oracle):
    """Data x_0 ~ N(mean, cov) in D dimensions; inputs are (B, D)."""

    def __init__(self, diffusion: GaussianDiffusion, mean: Tensor, cov: Tensor) -> None:
        super().__init__(diffusion)
        self.mean, self.cov = mean.double(), cov.double()
        self.diagonal = bool((self.cov == torch.diag(self.cov.diag())).all())

    def posterior_mean(self, xt: Tensor, a: Tensor, s: Tensor) -> Tensor:
        if self.diagonal:  # independent coordinates: the scalar formula per coordinate
            var = self.cov.diag()
            return self.mean + a * var / (a**2 * var + s**2) * (xt - a * self.mean)
        eye = torch.eye(len(self.mean), dtype=torch.float64)
        a, s = a.reshape(-1, 1, 1), s.reshape(-1, 1, 1)
        gain = a * self.cov @ torch.linalg.inv(a**2 * self.cov + s**2 * eye)  # (B, D, D)
        return self.mean + (gain @ (xt - a.squeeze(-1) * self.mean).unsqueeze(-1)).squeeze(-1)


class MixtureOracle(Oracle):
    """Data x_0 ~ sum_k weights_k N(means_k, variances_k I); inputs are (B, D)."""

    def __init__(self, diffusion: GaussianDiffusion, weights: Tensor, means: Tensor, variances: Tensor) -> None:
        super().__init__(diffusion)
        self.weights, self.means, self.variances = weights.double(), means.double(), variances.double()

    def posterior_mean(self, xt: Tensor, a: Tensor, s: Tensor) -> Tensor:
        a, s = a.reshape(-1, 1, 1), s.reshape(-1, 1, 1)  # (B, 1, 1) against (B, K, D)
        var_t = a**2 * self.variances.reshape(1, -1, 1) + s**2  # (B, K, 1)
        diff = xt.unsqueeze(1) - a * self.means  # (B, K, D)
        D = xt.shape[1]
        log_r = self.weights.log() - 0.5 * (diff**2).sum(-1) / var_t.squeeze(-1) - 0.5 * D * var_t.squeeze(-1).log()
        r = torch.softmax(log_r, dim=1).unsqueeze(-1)  # (B, K, 1)
        component_means = self.means + a * self.variances.reshape(1, -1, 1) / var_t * diff
        return (r * component_means).sum(1)


def sample_mixture(weights: Tensor, means: Tensor, variances: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n draws from the mixture and their component indices."""
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    x = means[k] + variances[k].sqrt().unsqueeze(-1) * torch.randn(n, means.shape[1], generator=generator, dtype=means.dtype)
    return x, k
