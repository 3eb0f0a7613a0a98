"""Where a training step of the CIFAR-10 UNet spends its time, eager or compiled (torch.profiler, self CPU time).

    OMP_NUM_THREADS=2 python bench/profile_step.py eager
    OMP_NUM_THREADS=2 python bench/profile_step.py compiled

ddpm_cifar10 preset, batch 8 at 32x32, channels_last, bf16 autocast, loss + backward + clipping + fused Adam
(the module's step under bf16-mixed). Two warm-up steps, then two profiled ones; prints the convolutions' share
of the self CPU time and the top operators.
"""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from ddpm import GaussianDiffusion, UNet, make_betas


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "eager"
    if mode not in ("eager", "compiled"):
        raise SystemExit(f"mode {mode!r}: expected eager or compiled")
    torch.manual_seed(0)
    net = UNet().to(memory_format=torch.channels_last)
    model = torch.compile(net) if mode == "compiled" else net
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    opt = torch.optim.Adam(net.parameters(), 2e-4, fused=True)
    x0 = (torch.rand(8, 3, 32, 32) * 2 - 1).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            loss = diffusion.training_loss(model, x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    print(f"{mode}: {total / 2e3:.0f} ms of self CPU time a step, convolutions {conv / total:.0%}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
