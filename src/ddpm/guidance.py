"""Classifier-free guidance (Ho & Salimans 2022): steer a class-conditional network at sampling time.

The network is trained with labels dropped to the null label some of the time (`cond_drop_prob`), so
it predicts both eps(x_t, t, y) and eps(x_t, t, null). At sampling time the two are combined:

    out = out_uncond + s * (out_cond - out_uncond)

s = 0 is unconditional sampling, s = 1 plain conditional sampling, s > 1 strengthens the condition
(Ho & Salimans' w is s - 1). The combination is linear in the output, so it holds for the eps, x0 and
v objectives alike; with a learned variance only the first half of the channels (the mean's) is guided.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class ClassifierFreeGuidance:
    """Wraps `model(x_t, t, y=...)` into a guided `model(x_t, t, y=...)` for GaussianDiffusion.sample.

    Args:
        model: a class-conditional network whose label `null_label` means "no class".
        guidance_scale: s above.
        null_label: the unconditional label (UNet's `num_classes`).
        guided_channels: how many leading output channels to guide (None: all); pass the data's
            channel count for a network with learned variance.
    """

    def __init__(self, model: Callable[..., Tensor], guidance_scale: float, null_label: int, guided_channels: int | None = None):
        self.model = model
        self.guidance_scale = guidance_scale
        self.null_label = null_label
        self.guided_channels = guided_channels

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        null = torch.full_like(y, self.null_label)
        if self.guidance_scale == 0:
            return self.model(x, t, y=null)
        if self.guidance_scale == 1:
            return self.model(x, t, y=y)
        cond, uncond = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null])).chunk(2)  # one batched call
        c = self.guided_channels or cond.shape[1]
        guided = uncond[:, :c] + self.guidance_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1)
