"""ddpm: denoising diffusion probabilistic models (Ho et al. 2020) for PyTorch, with Lightning + Hydra experiments.

Public API (stable): GaussianDiffusion, UNet, make_betas.
"""
from ddpm.diffusion import GaussianDiffusion
from ddpm.schedules import make_betas

__all__ = ["GaussianDiffusion", "UNet", "make_betas"]


def __getattr__(name: str):
    # UNet imports lazily so the diffusion math stays importable on its own
    if name == "UNet":
        from ddpm.unet import UNet

        return UNet
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
