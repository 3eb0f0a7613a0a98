"""The hardware choices train.py makes at start rather than in the config groups: CPU threads, precision, layout.

On a CPU, torch splits every operation over one thread per core. For small images each convolution is too
little work to share: the split and the wait cost more than they save (a step of the digits demo, 8x8
images, is faster on one thread than on two; docs/benchmarks.md). Larger images gain from every core.

bf16 autocast pays on a CPU that computes bf16 in hardware (AVX-512 BF16 or AMX) when the process runs on one
thread: a digits step takes about 0.7x the fp32 time there, in the NCHW layout (oneDNN's bf16 kernels for
these small convolutions are slower NHWC). Over several threads that sleep between operations (train.py's
OMP_WAIT_POLICY=PASSIVE) bf16 is slower than fp32, so "auto" keeps fp32 there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

# images of at most this many pixels a side train on one thread (`threads: auto`)
ONE_THREAD_MAX_SIZE = 16


def cpu_threads(setting: int | str, image_size: int) -> tuple[int, str]:
    """The intra-op threads to train with and why: `setting` if a number; for "auto", OMP_NUM_THREADS when the user
    set it, else 1 for images of at most ONE_THREAD_MAX_SIZE pixels, else torch's default (one per core)."""
    if setting != "auto":
        return int(setting), f"threads={setting}"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"threads=auto, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    if image_size <= ONE_THREAD_MAX_SIZE:
        return 1, f"threads=auto: {image_size}x{image_size} images are too small to split over cores"
    return torch.get_num_threads(), "threads=auto: one per core"


def on_cpu(accelerator: Any) -> bool:
    """Whether Lightning's `accelerator` (a name, or "auto") trains on the CPU here."""
    if accelerator == "auto":
        mps = getattr(torch.backends, "mps", None)
        return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))
    return accelerator == "cpu"


def native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX-512 BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's probes of the instruction sets
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def auto_precision(accelerator: str, threads: int, native: bool) -> tuple[str, str]:
    """The Lightning precision that `precision: auto` trains with, and why: on the CPU bf16-mixed when it computes
    bf16 natively (`native`) and trains on one thread, else 32-true; on other accelerators 32-true (the gpu_amp and
    ddp_amp hardware options choose fp16 there)."""
    if accelerator != "cpu":
        return "32-true", f"precision=auto: 32-true on {accelerator} (hardware=gpu_amp for fp16 autocast)"
    if not native:
        return "32-true", "precision=auto: 32-true, this CPU has no native bf16"
    if threads > 1:
        return "32-true", f"precision=auto: 32-true, bf16 autocast is slower than fp32 over {threads} sleeping threads"
    return "bf16-mixed", "precision=auto: bf16-mixed, this CPU computes bf16 natively and trains on one thread"


def auto_channels_last(accelerator: str, precision: str) -> bool:
    """The layout `channels_last: auto` trains in: NCHW under bf16 on the CPU (oneDNN's bf16 kernels for small
    convolutions are slower NHWC), NHWC otherwise (oneDNN's fp32 and cuDNN's tensor-core convolutions run fastest)."""
    return not (accelerator == "cpu" and "bf16" in str(precision))


@dataclass(frozen=True)
class Choices:
    """What train.py trains with: intra-op threads (None: not on the CPU, torch's default), Lightning's precision,
    the layout, and the one line that says so."""

    threads: int | None
    precision: str
    channels_last: bool
    line: str


def choose(accelerator: Any, threads: int | str, image_size: int, precision: str, channels_last: bool | str, native: bool) -> Choices:
    """Settle the `auto` settings (threads, precision, channels_last) for this machine; explicit ones are kept."""
    device = "cpu" if on_cpu(accelerator) else str(accelerator)
    parts, n = [device], None
    if device == "cpu":
        n, why = cpu_threads(threads, image_size)
        parts.append(f"{n} thread{'s' if n > 1 else ''} ({why})")
    if precision == "auto":
        precision, why = auto_precision(device, n or torch.get_num_threads(), native)
        parts.append(why)
    else:
        parts.append(f"precision={precision}")
    if channels_last == "auto":
        channels_last = auto_channels_last(device, precision)
        parts.append(f"channels_last=auto: {'NHWC' if channels_last else 'NCHW'}")
    else:
        parts.append(f"channels_last={str(bool(channels_last)).lower()}")
    line = "hardware: " + ", ".join(parts) + " (threads=N, hardware.precision=..., module.channels_last=... set them)"
    return Choices(n, precision, bool(channels_last), line)


def settle(cfg: Any) -> Choices:
    """Choose for a composed train config (a DictConfig) and write the choices into it: trainer.precision (and
    hardware.precision where it said auto, so the logged config says what ran) and module.channels_last. The
    caller sets the threads (torch.set_num_threads) and prints the line."""
    chosen = choose(cfg.trainer.accelerator, cfg.get("threads", "auto"), cfg.module.unet.image_size, cfg.trainer.precision,
                    cfg.module.channels_last, native_bf16())  # fmt: skip
    cfg.trainer.precision, cfg.module.channels_last = chosen.precision, chosen.channels_last
    if cfg.hardware.get("precision") == "auto":
        cfg.hardware.precision = chosen.precision
    return chosen
