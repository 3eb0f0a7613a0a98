"""Quality per CPU-minute: digits-FID over its floor after each minute of training, lever by lever, beside diffusers.

    python bench/quality_per_minute.py --minutes 1,2,5 --levers default,bf16,v,edm,lognormal,diffusers --jobs 2
    python bench/quality_per_minute.py --skip-training --levers default,v   # score the runs of an earlier call
    python bench/quality_per_minute.py --minutes 5 --levers default --lever fast module.lr_decay=cosine trainer.max_steps=1000
    python bench/quality_per_minute.py --steps 2100,2800 --levers default,bf16 --seeds 0,1   # step budgets instead

Each lever is the digits demo config (`python train.py`, `--base` overrides, then the lever's own) trained for the
largest of `--minutes` on `--threads` threads, `--jobs` runs at a time (so every run gets the same share of
the machine), with a checkpoint every minute. With `--steps` each of ours trains to the largest step budget
instead, keeping a checkpoint at each, so the load on the machine cannot move its figures (a step count for a
lever's minutes comes from its steps per second, measured side by side). The lever `diffusers` (and `diffusers_bf16`, under bf16 autocast) is
the plain loop a diffusers user writes: UNet2DModel of 4.0M parameters, DDPMScheduler (linear, T = 1000), AdamW
2e-4, EMAModel (0.9999 with its warm-up), batch 128 of the same train split, snapshots of the EMA weights every
minute. Every snapshot then draws `--n` samples (once per `--seeds`) at each of `--nfe` network evaluations,
ours with `--sampler` at `--spacing` (default: the sampler's own), diffusers' with its own DPMSolverMultistepScheduler (DPM-Solver++(2M),
the SDE variant `sde-dpmsolver++` when `--sampler dpmsolver++sde`), and scores them with the digits-FID (the mean
over the draws) against the val split (ddpm.metrics.SampleEvaluator); the ratio is over the FID of n real
train images (the floor, all 1438 when n is larger). `--fid-at` also scores prefixes and extrapolates to
infinitely many samples (ddpm.metrics.fid_infinity), over the FID of all 1438 train images: both sides then
carry no small-sample bias. (At n > 1438 the plain ratio is not: a perfect model of the train images scores
about 1.11x at n = 2000, see bench/fid_floor.py.) Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ddpm.data import digits_split
from ddpm.metrics import SampleEvaluator, fid_infinity
from ddpm.checkpoints import load_module
from quality_vs_time import timed_checkpoints, train_command

LEVERS: dict[str, list[str]] = {
    "default": [],
    "bf16": ["hardware=bf16"],
    "linear": ["schedule=linear"],
    "cosine": ["schedule=cosine"],
    "v": ["module.objective=v"],
    "edm": ["module.objective=edm"],
    "uniform": ["module.timestep_sampling=uniform"],
    "lognormal": ["module.timestep_sampling=lognormal"],
    "min_snr5": ["module.min_snr_gamma=5"],
    "lr2e-3": ["module.lr=2e-3"],
    "lr5e-4": ["module.lr=5e-4"],
    "ema0.998": ["callbacks.ema.decay=0.998"],
    "ema0.9995": ["callbacks.ema.decay=0.9995"],
    "batch64": ["data.batch_size=64"],
    "batch256": ["data.batch_size=256"],
    "wide": ["model.base_channels=64"],
}
DIFFUSERS = ("diffusers", "diffusers_bf16")


# ---- the diffusers loop ---------------------------------------------------------------------------


def diffusers_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip


def train_diffusers(run_dir: Path, minutes: int, bf16: bool, seed: int = 0) -> None:
    """The plain diffusers loop for `minutes`, saving the EMA weights (and the step) at every full minute."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    images, _ = digits_split("train")
    unet, scheduler = diffusers_unet(), DDPMScheduler(num_train_timesteps=1000)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-4)
    run_dir.mkdir(parents=True, exist_ok=True)
    start, step, saved = time.perf_counter(), 0, 0
    while saved < minutes:
        for batch in torch.randperm(len(images)).split(128):
            x0 = images[batch]
            noise, t = torch.randn_like(x0), torch.randint(0, 1000, (len(x0),))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pred = unet(scheduler.add_noise(x0, noise, t), t).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.step(unet.parameters())
            step += 1
            if time.perf_counter() - start >= 60 * (saved + 1):
                saved += 1
                shadow = diffusers_unet()
                ema.copy_to(shadow.parameters())
                torch.save({"state_dict": shadow.state_dict(), "step": step}, run_dir / f"minute_{saved:02d}.pt")
                if saved == minutes:
                    break


# diffusers' DPMSolverMultistepScheduler variant for each of our samplers (the ODE one for the others)
DIFFUSERS_ALGORITHM = {"dpmsolver++": "dpmsolver++", "dpmsolver++sde": "sde-dpmsolver++"}


@torch.no_grad()
def sample_diffusers(path: Path, n: int, nfe: int, seed: int, batch_size: int, algorithm: str = "dpmsolver++") -> tuple[torch.Tensor, int]:
    from diffusers import DPMSolverMultistepScheduler

    snapshot = torch.load(path, weights_only=True)
    unet = diffusers_unet().eval()
    unet.load_state_dict(snapshot["state_dict"])
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type=algorithm)
    g, out = torch.Generator().manual_seed(seed), []
    for i in range(0, n, batch_size):
        scheduler.set_timesteps(nfe)
        x = torch.randn(min(batch_size, n - i), 1, 8, 8, generator=g)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=g).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out), snapshot["step"]


# ---- ours ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ours(path: Path, n: int, nfe: int, sampler: str, seed: int, batch_size: int, spacing: str | None) -> tuple[torch.Tensor, int]:
    from ddpm.samplers import network_evaluations

    loaded = load_module(path)
    steps = next(k for k in range(1, nfe + 1) if network_evaluations(sampler, k) >= nfe)  # heun: 2 K - 1 <= nfe
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([loaded.module.sample(min(batch_size, n - i), sampler, steps, generator=g, spacing=spacing) for i in range(0, n, batch_size)])
    return x.float(), loaded.global_step


# ---- the benchmark ------------------------------------------------------------------------------------


def step_command(run_dir: Path, steps: list[int], overrides: list[str]) -> list[str]:
    """`python train.py` to the largest of `steps`, keeping <run_dir>/checkpoints/steps/step_<N>.ckpt at each of them."""
    every = math.gcd(*steps)
    return [
        sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"trainer.max_steps={max(steps)}",
        "+callbacks.at_steps._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.at_steps.dirpath={run_dir}/checkpoints/steps", "+callbacks.at_steps.filename='step_{step:06d}'",
        "+callbacks.at_steps.auto_insert_metric_name=false", "+callbacks.at_steps.save_top_k=-1",
        f"+callbacks.at_steps.every_n_train_steps={every}", *overrides,
    ]  # fmt: skip


def train_all(
    levers: list[str], minutes: int, out_dir: Path, base: list[str], jobs: int, threads: int, custom: dict[str, list[str]],
    steps: list[int] | None = None,
) -> None:
    """Train every lever, `jobs` at a time, each on `threads` threads, for `minutes` (or to the largest of `steps`)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    commands = []
    for lever in levers:
        run_dir = out_dir / lever
        if lever in DIFFUSERS:
            cmd = [sys.executable, __file__, "--diffusers-worker", str(run_dir), "--minutes", str(minutes)]
            commands.append(cmd + (["--bf16-worker"] if lever == "diffusers_bf16" else []))
        else:
            overrides = [*base, *LEVERS.get(lever, []), *custom.get(lever, []), "logger=csv", "module.sample_every_n_steps=0"]
            if steps:
                commands.append(step_command(run_dir, steps, overrides))
                continue
            cmd = train_command(run_dir, minutes, overrides)
            if any(o.startswith("trainer.max_steps=") for o in overrides):  # a step budget too: whichever ends first
                cmd.remove("trainer.max_steps=-1")
            commands.append(cmd)
    running: list[subprocess.Popen] = []
    for cmd in commands:
        while len(running) >= jobs:
            running = [p for p in running if p.poll() is None]
            time.sleep(1)
        print(" ".join(cmd), flush=True)
        running.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
    for p in running:
        p.wait()


def snapshots(lever: str, run_dir: Path, minutes: list[int]) -> dict[float, Path]:
    """{training minutes: snapshot} at each of `minutes` that the run reached, and, for a run that a step budget
    ended early, its last checkpoint at the minutes it trained (Lightning's Timer state)."""
    if lever in DIFFUSERS:
        found = sorted(run_dir.glob("minute_*.pt"))
        return {m: found[m - 1] for m in minutes if m <= len(found)}
    timed = [p for p in timed_checkpoints(run_dir) if p.exists()]
    last = run_dir / "checkpoints" / "last.ckpt"
    elapsed = torch.load(last, map_location="cpu", weights_only=False)["callbacks"]["Timer"]["time_elapsed"]["train"] / 60
    found = {m: timed[m - 1] for m in minutes if m <= len(timed) and m <= elapsed + 0.05}
    if elapsed < minutes[-1] - 0.05:
        found[round(elapsed, 2)] = last
    return found


def step_snapshots(run_dir: Path, steps: list[int]) -> dict[float, Path]:
    """{step: checkpoint} at each of `steps` that the run of `step_command` wrote."""
    found = {n: run_dir / "checkpoints" / "steps" / f"step_{n:06d}.ckpt" for n in steps}
    return {n: p for n, p in found.items() if p.exists()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", default="1,2,5")
    p.add_argument("--steps", default="", help="step budgets (e.g. 2100,2800) instead of --minutes, for our levers only")
    p.add_argument("--levers", default="default,bf16,v,edm,lognormal,min_snr5,diffusers,diffusers_bf16")
    p.add_argument("--base", nargs="*", default=[], help="train.py overrides under every lever of ours")
    p.add_argument("--lever", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                   help="a lever of your own: a name and its train.py overrides (repeatable); a trainer.max_steps=N among them "
                        "ends the run at N steps or the time budget, whichever comes first")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    p.add_argument("--threads", type=int, default=1, help="threads of each training run")
    p.add_argument("--n", type=int, default=2000, help="samples per score")
    p.add_argument("--fid-at", default="", help="also score the first k samples (e.g. 500,1000) and extrapolate")
    p.add_argument("--nfe", default="20,50", help="network evaluations per sample")
    p.add_argument("--seeds", default="0", help="independent draws of --n samples per score (their mean FID is reported)")
    p.add_argument("--sampler", default="dpmsolver++", help="our sampler")
    p.add_argument("--spacing", default=None, help="our sampler's timestep spacing (uniform, trailing, karras; default: the sampler's own)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--bf16-sampling", action="store_true", help="sample ours and theirs under bf16 autocast (faster on a bf16 CPU)")
    p.add_argument("--out-dir", default="outputs/bench/quality_per_minute", help="the runs")
    p.add_argument("--out", default=None, help="the JSON of the scores (default: <out-dir>/results.json)")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--diffusers-worker", metavar="RUN_DIR", help=argparse.SUPPRESS)
    p.add_argument("--bf16-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    minutes = sorted(int(m) for m in args.minutes.split(","))
    if args.diffusers_worker:
        train_diffusers(Path(args.diffusers_worker), minutes[-1], args.bf16_worker)
        return
    custom = {name: overrides for name, *overrides in args.lever}
    levers = [*(args.levers.split(",") if args.levers else []), *custom]
    unknown = [lever for lever in levers if lever not in LEVERS and lever not in DIFFUSERS and lever not in custom]
    if unknown:
        raise SystemExit(f"unknown lever {unknown[0]!r}; known: {', '.join([*LEVERS, *DIFFUSERS])}")
    steps = sorted(int(n) for n in args.steps.split(",") if n)
    if steps and any(lever in DIFFUSERS for lever in levers):
        raise SystemExit("--steps budgets our levers only; the diffusers loop runs for --minutes")
    out_dir = Path(args.out_dir)
    if not args.skip_training:
        train_all(levers, minutes[-1], out_dir, args.base, args.jobs, args.threads, custom, steps)
    seeds = [int(v) for v in args.seeds.split(",")]
    fid_at = sorted({int(k) for k in args.fid_at.split(",") if k} | {args.n}) if args.fid_at else [args.n]
    evaluator = SampleEvaluator(digits_split("val")[0], floor_real=digits_split("train")[0], metrics=("fid",))
    # FID_inf is compared with the FID of the whole floor set: what a model that reproduces those images
    # exactly scores with infinitely many samples (bench/fid_floor.py checks this on bootstrap draws)
    floor_set_fid = evaluator.floors(evaluator.n_floor_set)["fid_floor"]
    rows = []
    for lever in levers:
        found = step_snapshots(out_dir / lever, steps) if steps else snapshots(lever, out_dir / lever, minutes)
        for at, path in sorted(found.items()):  # minutes, or steps with --steps
            for nfe in (int(v) for v in args.nfe.split(",")):
                draws = []
                for seed in seeds:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_sampling):
                        if lever in DIFFUSERS:
                            x, step = sample_diffusers(path, args.n, nfe, seed, args.batch_size, DIFFUSERS_ALGORITHM.get(args.sampler, "dpmsolver++"))
                        else:
                            x, step = sample_ours(path, args.n, nfe, args.sampler, seed, args.batch_size, args.spacing)
                    draws.append({k: evaluator(x[:k].float()) for k in fid_at})
                fids = [d[args.n]["fid"] for d in draws]
                row = {"lever": lever, "minutes": None if steps else at, "step": step, "nfe": nfe, "n": args.n, "seeds": seeds,
                       "fid": statistics.mean(fids), "fid_draws": fids, "fid_floor": draws[0][args.n]["fid_floor"]}  # fmt: skip
                row["ratio"] = row["fid"] / row["fid_floor"]
                if len(fid_at) > 1:
                    row["fid_at"] = {k: statistics.mean(d[k]["fid"] for d in draws) for k in fid_at}
                    row["fid_inf_draws"] = [fid_infinity({k: s["fid"] for k, s in d.items()}) for d in draws]
                    row["fid_inf"] = statistics.mean(row["fid_inf_draws"])
                    row["fid_floor_set"] = floor_set_fid
                    row["ratio_inf"] = row["fid_inf"] / floor_set_fid
                rows.append(row)
                extra = f"  FID_inf {row['fid_inf']:6.2f} / {floor_set_fid:5.2f} = {row['ratio_inf']:4.2f}x" if "fid_inf" in row else ""
                spread = f" (sd {statistics.stdev(fids):4.2f} over {len(fids)} draws)" if len(fids) > 1 else ""
                when = "" if steps else f"{at:5.2f} min  "
                print(f"{lever:15s} {when}step {step:5d}  NFE {nfe:3d}:  FID {row['fid']:6.2f}{spread} / floor "
                      f"{row['fid_floor']:5.2f} = {row['ratio']:4.2f}x{extra}", flush=True)  # fmt: skip
    out = Path(args.out) if args.out else out_dir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
