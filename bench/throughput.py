"""Training and sampling throughput of the eps-network, against a measured convolution ceiling and diffusers.

    python bench/throughput.py                                        # ddpm_cifar10, 32x32, batch 8, fp32 + bf16
    python bench/throughput.py --preset small --batch-size 64
    python bench/throughput.py --channels-last on,off --compile off,on
    python bench/throughput.py --device cuda --precision 32,bf16-mixed,16-mixed --batch-size 128

For every configuration (model x precision x channels_last x compile) it times, interleaved with all the
others (each repetition visits every configuration, in a rotated order, so load from other processes
hits them alike):

- training images/s for the step the Trainer runs: forward + `GaussianDiffusion.training_loss` (under
  autocast; the schedule math and the loss stay fp32) + backward + gradient clipping (norm 1) + Adam
  (fused; foreach under 16-mixed, where the loss scale must come off before clipping; as DiffusionModule builds it) + EMA update (`AveragedModel`
  with `get_ema_multi_avg_fn`, the path of Lightning's `WeightAveraging`);
- sampling images/s: reverse steps (`p_mean_variance` + noise, one network evaluation per image)
  under `torch.inference_mode()`, the steps of a repetition inside one autocast region as in a sampler;
- GFLOP per image (`torch.utils.flop_counter.FlopCounterMode`: one forward for sampling, forward +
  backward for training) and the GFLOP/s achieved, as a fraction of the ceiling measured in the same
  run: a 128->128 3x3 convolution at 32x32, batch 32, channels_last, in fp32 and in bf16;
- peak memory of the configuration alone, measured in a fresh process (2 training steps + 1 sampling
  step): peak RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA;
- with torch.compile, the compile time (first training and sampling calls minus their steady time).

With diffusers installed (`pip install -e .[bench]`) the same step runs on diffusers' `UNet2DModel` in the
google/ddpm-cifar10-32 configuration (same widths, blocks and attention as ours; dropout set to ours),
and the script prints our/their ratios. Each figure comes from the fastest repetition (the least disturbed
one on a shared machine); compare ratios from one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import multiprocessing as mp
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode

from ddpm import GaussianDiffusion, UNet, make_betas

PRESETS: dict[str, dict] = {
    # Ho et al. 2020, CIFAR-10: the UNet defaults (35.7M parameters)
    "ddpm_cifar10": dict(),
    # the 8x8 digits model
    "small": dict(image_size=8, in_channels=1, base_channels=64, channel_mult=(1, 2), num_res_blocks=2,
                  attention_resolutions=(4,), norm_groups=32),
}  # fmt: skip
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
AUTOCAST_DTYPE = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
CEILING = dict(batch=32, channels=128, size=32)  # the reference 3x3 convolution
_clock = time.perf_counter  # --clock cpu: time.process_time


@dataclass(frozen=True)
class Config:
    impl: str  # "ddpm" (ours) or "diffusers"
    precision: str
    channels_last: bool
    compile: bool

    @property
    def name(self) -> str:
        return f"{self.impl} {self.precision} cl={'on' if self.channels_last else 'off'} compile={'on' if self.compile else 'off'}"


@dataclass
class Settings:
    preset: str
    image_size: int
    batch_size: int
    device: str
    threads: int
    seed: int = 0


# ---- models -----------------------------------------------------------------------------------------


def build_ours(s: Settings) -> nn.Module:
    return UNet(**(PRESETS[s.preset] | dict(image_size=s.image_size)))


class DiffusersEps(nn.Module):
    """diffusers' UNet2DModel as an eps-network callable as net(x_t, t) -> eps."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample


def build_diffusers(s: Settings) -> nn.Module:
    """google/ddpm-cifar10-32's UNet2DModel config (its hub config.json), scaled like our preset."""
    from diffusers import UNet2DModel

    kw = PRESETS[s.preset]
    base = kw.get("base_channels", 128)
    mult = kw.get("channel_mult", (1, 2, 2, 2))
    attn = kw.get("attention_resolutions", (16,))
    res = [s.image_size // 2**i for i in range(len(mult))]
    down = tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(res))
    net = UNet2DModel(
        sample_size=s.image_size, in_channels=kw.get("in_channels", 3), out_channels=kw.get("in_channels", 3),
        block_out_channels=tuple(base * m for m in mult), layers_per_block=kw.get("num_res_blocks", 2),
        down_block_types=down, up_block_types=up, attention_head_dim=None, norm_num_groups=kw.get("norm_groups", 32),
        norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, act_fn="silu",
        time_embedding_type="positional", dropout=kw.get("dropout", 0.1),
    )  # fmt: skip
    return DiffusersEps(net)


# ---- one configuration ------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Runner:
    """One configuration: model, optimizer, EMA, batch, and its timed training and sampling steps."""

    cfg: Config
    s: Settings
    times: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "sample": []})
    warmup_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg, s = self.cfg, self.s
        self.device = torch.device(s.device)
        torch.manual_seed(s.seed)
        model = (build_ours if cfg.impl == "ddpm" else build_diffusers)(s).to(self.device)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=fmt)  # weights in the layout the activations use
        self.net = torch.compile(self.model) if cfg.compile else self.model
        self.diffusion = GaussianDiffusion(make_betas("linear", 1000)).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # as DiffusionModule builds it: fused Adam; foreach under 16-mixed, which unscales before clipping
        impl = {"foreach": True} if cfg.precision == "16-mixed" else {"fused": True}
        self.opt = torch.optim.Adam(self.params, lr=2e-4, **impl)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=False)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "16-mixed" else None
        c = PRESETS[s.preset].get("in_channels", 3)
        g = torch.Generator(device="cpu").manual_seed(s.seed)
        x0 = torch.rand(s.batch_size, c, s.image_size, s.image_size, generator=g) * 2 - 1
        self.x0 = x0.to(self.device).contiguous(memory_format=fmt)  # as a datamodule batch, converted once
        self.xt = torch.randn_like(self.x0)
        self.t_sample = torch.full((s.batch_size,), 500, device=self.device, dtype=torch.long)
        self.dtype = AUTOCAST_DTYPE[cfg.precision]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def train_step(self) -> None:
        self.model.train()
        with self.autocast():
            loss = self.diffusion.training_loss(self.net, self.x0)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        if self.scaler is None:
            self.opt.step()
        else:
            self.scaler.step(self.opt)
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update_parameters(self.model)

    def train_loop(self, steps: int) -> None:
        for _ in range(steps):
            self.train_step()

    @torch.inference_mode()
    def sample_loop(self, steps: int) -> None:
        """`steps` reverse steps inside one autocast region, as a sampler runs them: autocast then
        casts each weight to bf16 once per region (its cast cache), not once per network call."""
        self.model.eval()
        with self.autocast():
            for _ in range(steps):
                p = self.diffusion.p_mean_variance(self.net, self.xt, self.t_sample)
                self.xt = p.mean + (0.5 * p.log_variance).exp() * torch.randn_like(p.mean)

    def sample_step(self) -> None:
        self.sample_loop(1)

    def loop(self, kind: str) -> Callable[[int], None]:
        return self.train_loop if kind == "train" else self.sample_loop

    def warmup(self, n: int = 2) -> None:
        """First calls (compile, allocator, oneDNN primitive caches) are timed apart from the rest."""
        for kind in ("train", "sample"):
            fn = self.loop(kind)
            sync(self.device)
            t0 = _clock()
            fn(1)
            sync(self.device)
            self.warmup_s[kind] = _clock() - t0
            fn(n - 1)
            sync(self.device)

    def timed(self, kind: str, steps: int) -> None:
        fn = self.loop(kind)
        sync(self.device)
        t0 = _clock()
        fn(steps)
        sync(self.device)
        self.times[kind].append((_clock() - t0) / steps)

    def images_per_s(self, kind: str) -> float:
        return self.s.batch_size / min(self.times[kind])

    def compile_s(self) -> float | None:
        if not self.cfg.compile:
            return None
        return sum(self.warmup_s[k] - min(self.times[k]) for k in ("train", "sample"))

    def flops_per_image(self) -> dict[str, float]:
        """FLOPs of one forward (sampling) and of forward + backward of the loss (training), per image, fp32."""
        model = self.model
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(self.x0, self.t_sample)
        fwd = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            self.diffusion.training_loss(model, self.x0).backward()
        model.zero_grad(set_to_none=True)
        return {"sample": fwd / self.s.batch_size, "train": fc.get_total_flops() / self.s.batch_size}


class Ceiling:
    """A large 3x3 convolution (channels_last) in fp32 and in bf16: the GFLOP/s this machine can reach."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        b, c, n = CEILING["batch"], CEILING["channels"], CEILING["size"]
        self.flops = 2 * b * c * c * 9 * n * n
        self.conv = nn.Conv2d(c, c, 3, padding=1).to(self.device, memory_format=torch.channels_last)
        self.x = torch.randn(b, c, n, n, device=self.device).contiguous(memory_format=torch.channels_last)
        self.conv_bf16 = copy.deepcopy(self.conv).to(torch.bfloat16)
        self.x_bf16 = self.x.to(torch.bfloat16)
        self.times: dict[str, list[float]] = {"32": [], "bf16": []}

    @torch.inference_mode()
    def run(self, kind: str) -> None:
        if kind == "bf16":  # bf16 weights and input, as a layer inside a bf16 network sees them
            self.conv_bf16(self.x_bf16)
        else:
            self.conv(self.x)

    def timed(self, kind: str, steps: int) -> None:
        sync(self.device)
        t0 = _clock()
        for _ in range(steps):
            self.run(kind)
        sync(self.device)
        self.times[kind].append((_clock() - t0) / steps)

    def gflops(self, kind: str) -> float:
        return self.flops / min(self.times[kind]) / 1e9


# ---- peak memory in a fresh process -----------------------------------------------------------------


def _peak_rss_mib() -> float:
    """This process's peak resident set: VmHWM (reset by exec, unlike ru_maxrss, which a spawned child
    inherits from its parent on Linux), else ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _peak_memory_child(cfg: Config, s: Settings, queue: mp.Queue) -> None:
    try:
        torch.set_num_threads(s.threads)
        runner = Runner(cfg, s)
        if runner.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runner.device)
        runner.train_step()
        runner.train_step()
        runner.sample_step()
        if runner.device.type == "cuda":
            queue.put(torch.cuda.max_memory_allocated(runner.device) / 2**20)
        else:
            queue.put(_peak_rss_mib())
    except Exception as e:  # reported in the table rather than killing the benchmark
        queue.put(f"{type(e).__name__}: {e}")


def peak_memory_mib(cfg: Config, s: Settings) -> float | str:
    """Peak RSS (CPU) or max allocated (CUDA), in MiB, of a fresh process running this configuration."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(cfg, s, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# ---- the run ----------------------------------------------------------------------------------------


def parse_list(text: str, allowed: tuple[str, ...], name: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    for v in values:
        if v not in allowed:
            raise SystemExit(f"--{name}: {v!r} is not one of {', '.join(allowed)}")
    return values


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ddpm_cifar10")
    ap.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precision", default="32,bf16-mixed", help="comma list of 32, bf16-mixed, 16-mixed (CUDA only)")
    ap.add_argument("--channels-last", default="on", help="comma list of on, off")
    ap.add_argument("--compile", default="off", help="comma list of off, on")
    ap.add_argument("--diffusers", choices=("auto", "off"), default="auto", help="auto: compare when installed")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions per configuration")
    ap.add_argument("--steps", type=int, default=2, help="steps per repetition")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or all cores)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-configuration peak-memory processes")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time, immune to time slicing by other processes; only with --threads 1 on CPU")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    precisions = parse_list(args.precision, PRECISIONS, "precision")
    if "16-mixed" in precisions and device.type != "cuda":
        print("note: 16-mixed is measured on CUDA only; skipped on", device.type)
        precisions.remove("16-mixed")
    cls = [v == "on" for v in parse_list(args.channels_last, ("on", "off"), "channels-last")]
    compiles = [v == "on" for v in parse_list(args.compile, ("off", "on"), "compile")]
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    if args.clock == "cpu":
        if threads != 1 or device.type != "cpu":
            raise SystemExit("--clock cpu needs --threads 1 and --device cpu (with more threads it would count spin-waits)")
        global _clock
        _clock = time.process_time
    torch.set_num_threads(threads)
    image_size = args.image_size or PRESETS[args.preset].get("image_size", 32)
    s = Settings(args.preset, image_size, args.batch_size, args.device, threads)

    impls = ["ddpm"]
    note = None
    if args.diffusers == "auto":
        try:
            import diffusers  # noqa: F401

            impls.append("diffusers")
        except ImportError:
            note = "diffusers is not installed (pip install -e .[bench]): no comparison"

    configs = [Config(*c) for c in itertools.product(impls, precisions, cls, compiles)]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  device {device}  threads {threads}  "
          f"clock {args.clock}  load {os.getloadavg()[0]:.1f}  preset {args.preset}  {image_size}x{image_size}  batch {args.batch_size}  reps {args.reps} x {args.steps} steps")  # fmt: skip
    if note:
        print("note:", note)

    runners = [Runner(cfg, s) for cfg in configs]
    for r in runners:
        r.warmup()
    flops = {}
    for r in runners:
        if r.cfg.impl not in flops:
            flops[r.cfg.impl] = r.flops_per_image()
    ceiling = Ceiling(args.device)
    for kind in ("32", "bf16"):
        ceiling.run(kind)

    jobs: list[tuple[Callable[[str, int], None], str]] = [(r.timed, k) for k in ("train", "sample") for r in runners]
    jobs += [(ceiling.timed, "32"), (ceiling.timed, "bf16")]
    for rep in range(args.reps):
        shift = rep % len(jobs)
        for fn, kind in jobs[shift:] + jobs[:shift]:
            fn(kind, args.steps if fn.__self__ is not ceiling else 4 * args.steps)

    memory = {}  # after the timing, so compile times above are cold-cache ones
    if not args.no_memory:
        for cfg in configs:
            memory[cfg] = peak_memory_mib(cfg, s)

    report(runners, flops, ceiling, memory, device)


def report(runners: list[Runner], flops: dict, ceiling: Ceiling, memory: dict, device: torch.device) -> None:
    ceil = {"32": ceiling.gflops("32"), "bf16-mixed": ceiling.gflops("bf16"), "16-mixed": ceiling.gflops("bf16")}
    mem_name = "max alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    header = ["model", "precision", "ch-last", "compile", "train img/s", "sample img/s", "train GFLOP/img",
              "train GFLOP/s", "of ceiling", "sample GFLOP/s", "of ceiling", mem_name, "compile s"]  # fmt: skip
    rows = []
    for r in runners:
        c = r.cfg
        tr, sa = r.images_per_s("train"), r.images_per_s("sample")
        f = flops[c.impl]
        tr_gf, sa_gf = tr * f["train"] / 1e9, sa * f["sample"] / 1e9
        mem = memory.get(c)
        comp = r.compile_s()
        rows.append([
            c.impl, c.precision, "on" if c.channels_last else "off", "on" if c.compile else "off",
            f"{tr:.2f}", f"{sa:.1f}", f"{f['train'] / 1e9:.1f}", f"{tr_gf:.0f}", f"{tr_gf / ceil[c.precision]:.0%}",
            f"{sa_gf:.0f}", f"{sa_gf / ceil[c.precision]:.0%}",
            "-" if mem is None else (f"{mem:.0f}" if isinstance(mem, float) else str(mem)),
            "-" if comp is None else f"{comp:.1f}",
        ])  # fmt: skip
    print_table(f"throughput (sampling: {flops['ddpm']['sample'] / 1e9:.2f} GFLOP/img forward)", header, rows)
    b, c_, n = CEILING["batch"], CEILING["channels"], CEILING["size"]
    print(f"ceiling: 3x3 conv {c_}->{c_} at {n}x{n}, batch {b}, channels_last: "
          f"fp32 {ceiling.gflops('32'):.0f} GFLOP/s, bf16 {ceiling.gflops('bf16'):.0f} GFLOP/s")  # fmt: skip

    theirs = {(r.cfg.precision, r.cfg.channels_last, r.cfg.compile): r for r in runners if r.cfg.impl == "diffusers"}
    ratio_rows = []
    for r in runners:
        key = (r.cfg.precision, r.cfg.channels_last, r.cfg.compile)
        if r.cfg.impl == "ddpm" and key in theirs:
            o = theirs[key]
            ratio_rows.append([
                r.cfg.precision, "on" if key[1] else "off", "on" if key[2] else "off",
                f"{r.images_per_s('train') / o.images_per_s('train'):.2f}x",
                f"{r.images_per_s('sample') / o.images_per_s('sample'):.2f}x",
            ])  # fmt: skip
    if ratio_rows:
        print_table("ours / diffusers (same run, interleaved)", ["precision", "ch-last", "compile", "train", "sample"], ratio_rows)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print(title)
        for line in [header, *rows]:
            print("  ".join(v.rjust(w) for v, w in zip(line, widths)))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


if __name__ == "__main__":
    sys.exit(main())
