"""ddpm: denoising diffusion probabilistic models (Ho et al. 2020) for PyTorch, with Lightning + Hydra experiments.

Public API (stable): GaussianDiffusion, UNet, make_betas.
"""
from ddpm.diffusion import GaussianDiffusion
from ddpm.schedules import make_betas
from ddpm.unet import UNet

__all__ = ["GaussianDiffusion", "UNet", "make_betas"]
