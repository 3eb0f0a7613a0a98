"""Time one optimizer step of DiffusionModule on the CPU: fp32 and bf16 autocast, interleaved so both see the same load.

    python bench/train_step.py                               # the digits demo model (model=small), batch 128
    OMP_WAIT_POLICY=PASSIVE python bench/train_step.py       # as train.py runs it
    OMP_NUM_THREADS=1 python bench/train_step.py --base 64

Prints the median milliseconds per step (forward, L_simple, backward, Adam) for each precision.
"""
from __future__ import annotations

import argparse
import time

import torch

from ddpm.module import DiffusionModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=32, help="UNet base_channels (model=small: 32)")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    unet = dict(image_size=args.resolution, in_channels=1, base_channels=args.base, channel_mult=[1, 2],
                num_res_blocks=2, attention_resolutions=[], dropout=0.0, norm_groups=8)  # fmt: skip
    module = DiffusionModule(unet=unet)
    opt = torch.optim.Adam(module.parameters(), 1e-3)
    x = torch.rand(args.batch, 1, args.resolution, args.resolution) * 2 - 1  # (B, 1, H, W)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.steps):
        for precision, seconds in times.items():
            start = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                loss = module.diffusion.training_loss(module.unet, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            seconds.append(time.perf_counter() - start)
    params = sum(p.numel() for p in module.unet.parameters())
    print(f"UNet base {args.base}, {params / 1e6:.2f}M params, batch {args.batch} at {args.resolution}x{args.resolution}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for precision, seconds in times.items():
        print(f"{precision}: {sorted(seconds)[len(seconds) // 2] * 1000:.0f} ms/step (median of {len(seconds)})")


if __name__ == "__main__":
    main()
