"""Hydra multirun: one run dir per job, and with logger=wandb (offline) one finished W&B run per job."""
from __future__ import annotations

from pathlib import Path

from conftest import run_script


def test_multirun_two_schedules_two_wandb_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", "debug=fast", "schedule=linear,cosine", "logger=wandb", f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    run_ids = set()
    for job, schedule in zip(jobs, ["linear", "cosine"]):
        assert f"name: {schedule}" in (job / ".hydra" / "config.yaml").read_text()
        assert (job / "checkpoints" / "last.ckpt").is_file()
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs  # exactly one W&B run per job, none leaking into the next job
        run = runs[0]
        run_ids.add(run.name.rsplit("-", 1)[-1])
        # W&B offline, no account, no network: metrics in the run's log, sample grids as media files
        log = (run / f"run-{run.name.rsplit('-', 1)[-1]}.wandb").read_bytes()
        for key in (b"train/loss", b"val/loss", b"train/loss_q1", b"lr"):
            assert key in log, key
        assert list((run / "files" / "media" / "images").glob("samples_*.png"))
        # the job finished its own run (wandb.finish at the end of train()), before the next job began
        assert f"finishing run ddpm/{run.name.rsplit('-', 1)[-1]}" in (run / "logs" / "debug.log").read_text()
    assert len(run_ids) == 2
