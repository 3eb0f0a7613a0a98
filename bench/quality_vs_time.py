"""Sample quality against CPU training time: digits-FID (with its floor), classifier scores and bits/dim.

    python bench/quality_vs_time.py                          # linear and cosine, 10 minutes each
    python bench/quality_vs_time.py --minutes 2,5 --schedules cosine --extra hardware=bf16

For each schedule it trains the digits demo config (`python train.py`, plus `--extra` overrides) for the
largest of `--minutes`, keeping a checkpoint every minute (a time-based ModelCheckpoint), then scores
the EMA weights at each listed minute with DDPM over all T steps, DDIM 50 and DDIM 20: digits-FID of
`--n` samples against the val split (floor: n real train digits), confidence, coverage, and held-out
bits/dim (stratified estimate over `--bpd-timesteps` terms). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ddpm.data import digits_split
from ddpm.metrics import SampleEvaluator, heldout_bits_per_dim
from ddpm.checkpoints import load_module

SAMPLERS = [("ddpm", None), ("ddim", 50), ("ddim", 20)]


def train_command(run_dir: Path, minutes: int, overrides: list[str]) -> list[str]:
    """`python train.py` for `minutes` with `overrides`, checkpointing every minute into <run_dir>/checkpoints/timed/."""
    return [
        sys.executable, "train.py", f"hydra.run.dir={run_dir}",
        f"trainer.max_time=00:00:{minutes:02d}:00", "trainer.max_steps=-1",
        "+callbacks.timed._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.timed.dirpath={run_dir}/checkpoints/timed", "+callbacks.timed.filename='minute_{step:06d}'",
        "+callbacks.timed.auto_insert_metric_name=false", "+callbacks.timed.save_top_k=-1",
        "+callbacks.timed.train_time_interval._target_=datetime.timedelta", "+callbacks.timed.train_time_interval.minutes=1",
        *overrides,
    ]  # fmt: skip


def train(schedule: str, minutes: int, run_dir: Path, extra: list[str]) -> None:
    """One training run of `minutes` on `schedule`, checkpointing every minute."""
    cmd = train_command(run_dir, minutes, [f"schedule={schedule}", "logger=csv", *extra])
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def timed_checkpoints(run_dir: Path) -> list[Path]:
    """The per-minute checkpoints in the order they were written (minute 1, 2, ...); the last minute is
    last.ckpt, written when max_time stops training (the timed callback does not fire at that moment)."""
    timed = sorted((run_dir / "checkpoints" / "timed").glob("minute*.ckpt"), key=lambda p: p.stat().st_mtime)
    return [*timed, run_dir / "checkpoints" / "last.ckpt"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", default="2,5,10")
    p.add_argument("--schedules", default="linear,cosine")
    p.add_argument("--n", type=int, default=1000, help="samples per score")
    p.add_argument("--bpd-timesteps", type=int, default=100)
    p.add_argument("--out-dir", default="outputs/bench/quality_vs_time")
    p.add_argument("--skip-training", action="store_true", help="score the checkpoints of an earlier run")
    p.add_argument("--extra", nargs="*", default=[], help="more train.py overrides")
    args = p.parse_args()
    minutes = [int(m) for m in args.minutes.split(",")]
    val, _ = digits_split("val")
    train_images, _ = digits_split("train")
    evaluator = SampleEvaluator(val, floor_real=train_images)
    rows = []
    for schedule in args.schedules.split(","):
        run_dir = Path(args.out_dir) / schedule
        if not args.skip_training:
            train(schedule, max(minutes), run_dir, args.extra)
        checkpoints = timed_checkpoints(run_dir)
        for minute in minutes:
            if minute > len(checkpoints):
                print(f"{schedule}: no checkpoint for minute {minute} ({len(checkpoints)} written)")
                continue
            loaded = load_module(checkpoints[minute - 1])
            module = loaded.module
            bpd = heldout_bits_per_dim(module.diffusion, module.unet, val, num_timesteps=args.bpd_timesteps, generator=torch.Generator().manual_seed(0))
            for sampler, steps in SAMPLERS:
                t0 = time.perf_counter()
                g = torch.Generator().manual_seed(0)
                x = torch.cat([module.sample(min(500, args.n - i), sampler, steps, generator=g) for i in range(0, args.n, 500)])
                scores = evaluator(x)
                row = {"schedule": schedule, "minutes": minute, "step": loaded.global_step, "sampler": sampler,
                       "steps": steps or module.diffusion.num_timesteps, "bpd": bpd, "sample_seconds": round(time.perf_counter() - t0, 1), **scores}  # fmt: skip
                rows.append(row)
                print(f"{schedule:7s} {minute:3d} min (step {row['step']:5d})  {sampler} {row['steps']:4d}:  "
                      f"FID {row['fid']:6.2f} / floor {row['fid_floor']:5.2f} = {row['fid'] / row['fid_floor']:4.2f}x  "
                      f"conf {row['confidence']:.3f}  cov {row['coverage']:.3f}  bpd {bpd:.3f}", flush=True)
    out = Path(args.out_dir) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
