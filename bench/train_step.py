"""Time one optimizer step of DiffusionModule on the CPU: fp32 / bf16 autocast x channels_last on / off, interleaved.

    python bench/train_step.py                               # the digits demo model (model=small), batch 128
    OMP_WAIT_POLICY=PASSIVE python bench/train_step.py       # as train.py runs it
    OMP_NUM_THREADS=1 python bench/train_step.py --base 64

Each step is what the Trainer runs: the module's batch hook (channels_last), forward, L_simple with the
module's draws of t and noise, backward, and the optimizer `configure_optimizers` builds (fused Adam).
Every repetition visits every configuration, so load from other processes hits them alike. Prints the
median milliseconds per step of each.
"""
from __future__ import annotations

import argparse
import itertools
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

    unet = dict(image_size=args.resolution, in_channels=1, base_channels=args.base, channel_mult=[1, 2],
                num_res_blocks=2, attention_resolutions=[], dropout=0.0, norm_groups=8)  # fmt: skip
    x = torch.rand(args.batch, 1, args.resolution, args.resolution) * 2 - 1  # (B, 1, H, W)
    y = torch.zeros(args.batch, dtype=torch.long)  # labels, unused by the unconditional net
    runs = {}
    for precision, channels_last in itertools.product(("fp32", "bf16"), (False, True)):
        torch.manual_seed(0)
        module = DiffusionModule(unet=unet, channels_last=channels_last)
        runs[(precision, channels_last)] = (module, module.configure_optimizers()["optimizer"], [])
    for _ in range(args.steps):
        for (precision, _), (module, opt, seconds) in runs.items():
            start = time.perf_counter()
            x0 = module.on_after_batch_transfer((x, y), 0)[0]
            t, noise, _ = module.training_draws(x0, 0)
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                loss = module.diffusion.training_loss(module.unet, x0, t=t, noise=noise)
            loss.backward()
            opt.step()
            opt.zero_grad()
            seconds.append(time.perf_counter() - start)
    module = next(iter(runs.values()))[0]
    print(f"UNet base {args.base}, {module.unet.num_params() / 1e6:.2f}M params, batch {args.batch} at "
          f"{args.resolution}x{args.resolution}, {torch.get_num_threads()} threads, optimizer {type(opt).__name__} "
          f"fused={opt.defaults.get('fused')}")  # fmt: skip
    for (precision, channels_last), (_, _, seconds) in runs.items():
        median = sorted(seconds)[len(seconds) // 2]
        print(f"{precision} channels_last={'on' if channels_last else 'off'}: {median * 1000:.0f} ms/step (median of {len(seconds)})")


if __name__ == "__main__":
    main()
