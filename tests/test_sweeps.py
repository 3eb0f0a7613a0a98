"""Hydra multirun: one run dir per job, one finished W&B run per job, and the sweep's summary of every job."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, _env, run_script, train, wandb_records

from ddpm.report import summarize


def test_multirun_two_schedules_two_wandb_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", "debug=fast", "schedule=linear,cosine", "logger=wandb", "tags=[nightly,digits]", f"hydra.sweep.dir={sweep}")
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
        # grouped by the sweep (its dir's name, being outside outputs/multirun), typed, tagged; the id kept in the run dir
        (header,) = [r.run for r in wandb_records(run / f"run-{run.name.rsplit('-', 1)[-1]}.wandb") if r.HasField("run")]
        assert (header.run_group, header.job_type, list(header.tags)) == (sweep.name, "train", ["nightly", "digits"])
        assert (job / "wandb" / "group").read_text().strip() == sweep.name
        assert (job / "wandb" / "run_id").read_text().strip() == run.name.rsplit("-", 1)[-1]
        assert list((run / "files" / "media" / "images").glob("samples_*.png"))
        tables = sorted((run / "files" / "media" / "table").glob("sample_table_*.table.json"))
        assert tables, list((run / "files" / "media").iterdir())
        rows = [row for t in tables for row in json.loads(t.read_text())["data"]]  # one table per grid: steps 4 and 8
        assert all(json.loads(t.read_text())["columns"] == ["step", "sampler", "steps", "guidance_scale", "label", "image"] for t in tables)
        assert len(rows) == 2 * 16 and {tuple(r[:5]) for r in rows} == {(s, "dpmsolver++sde", 5, 1.0, None) for s in (4, 8)}
        # the job finished its own run (wandb.finish at the end of train()), before the next job began
        assert f"finishing run ddpm/{run.name.rsplit('-', 1)[-1]}" in (run / "logs" / "debug.log").read_text()
    assert len(run_ids) == 2


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_summary_with_a_failed_job(tmp_path: Path) -> None:
    """A 3-job sweep whose middle job has a bad data folder: that job fails (one line, its dir removed), the others
    train, the sweep exits 2, and summary.csv / summary.md hold all three rows with the varying overrides as
    columns, each job's status, steps and final losses; `python -m ddpm.report` rebuilds the same table."""
    sweep = tmp_path / "sweep"
    nowhere = tmp_path / "nowhere"
    proc = run_script("train.py", "-m", "debug=fast", "schedule=linear,cosine", "data=digits,folder",
                      f"data.root={nowhere}", f"hydra.sweep.dir={sweep}", check=False)  # fmt: skip
    # jobs: 0 linear/digits, 1 linear/folder (fails), 2 cosine/digits, 3 cosine/folder (fails)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "job 1 of the sweep failed" in errors[0] and "no such folder" in errors[0], proc.stderr[-2000:]
    assert "job 3 failed" in proc.stderr and not (sweep / "1").exists() and not (sweep / "3").exists()
    rows = read_csv(sweep / "summary.csv")
    assert [r["job"] for r in rows] == ["0", "2", "1", "3"]
    by_job = {r["job"]: r for r in rows}
    assert {j: by_job[j]["status"] for j in by_job} == {"0": "finished", "2": "finished", "1": "failed", "3": "failed"}
    assert {j: (by_job[j]["schedule"], by_job[j]["data"]) for j in by_job} == {
        "0": ("linear", "digits"), "1": ("linear", "folder"), "2": ("cosine", "digits"), "3": ("cosine", "folder")}
    assert "data.root" not in rows[0]  # the same in every job: not a column
    for j in ("0", "2"):
        assert by_job[j]["step"] == "8" and float(by_job[j]["train/loss"]) > 0 and float(by_job[j]["val/loss"]) > 0
        record = json.loads((sweep / j / "run.json").read_text())
        assert record["status"] == "finished" and record["step"] == 8
        assert [p[0] for p in record["history"]["val/loss"]] == [4, 8]  # validated every 4 steps
        assert record["last"]["train/loss"] == float(by_job[j]["train/loss"])
    assert "no such folder" in by_job["1"]["error"]
    md = (sweep / "summary.md").read_text().splitlines()
    assert len(md) == 2 + 4 and md[0].startswith("| job | run_dir | data | schedule | status")
    # the report command rebuilds the table from the folder alone
    before = (sweep / "summary.csv").read_text()
    (sweep / "summary.csv").unlink()
    out = subprocess.run([sys.executable, "-m", "ddpm.report", str(sweep), "--plot", "val/loss"], cwd=ROOT, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert (sweep / "summary.csv").read_text() == before
    assert (sweep / "val_loss.png").stat().st_size > 1000


def test_report_of_a_folder_of_runs(tmp_path: Path) -> None:
    """Two single runs in one folder; one killed mid-run (its record says running, no process holds it): stopped.
    The best val/* value is the lowest, with its step; a folder without records is refused in one line."""
    runs = tmp_path / "runs"
    train(runs / "a", "schedule=linear")
    train(runs / "b", "schedule=cosine")
    record = json.loads((runs / "b" / "run.json").read_text())
    record.update(status="running", history=record["history"] | {"val/fid": [[4, 30.0], [8, 35.0]]})
    (runs / "b" / "run.json").write_text(json.dumps(record))
    rows = {r["job"]: r for r in summarize(runs)}
    assert rows["a"]["status"] == "finished" and rows["b"]["status"] == "stopped"
    assert rows["b"]["val/fid"] == 35.0 and rows["b"]["val/fid best"] == 30.0 and rows["b"]["val/fid best step"] == 4
    assert rows["a"]["schedule"] == "linear" and rows["b"]["schedule"] == "cosine"
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, "-m", "ddpm.report", str(empty)], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr


def test_resume_continues_the_same_wandb_run(tmp_path: Path) -> None:
    """resume=true logs to the W&B run that the run dir's first part started (its id, kept in wandb/run_id)."""
    run_dir = tmp_path / "run"
    train(run_dir, "logger=wandb")
    train(run_dir, "logger=wandb", "resume=true", "trainer.max_steps=12")
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    ids = {r.name.rsplit("-", 1)[-1] for r in runs}
    assert ids == {(run_dir / "wandb" / "run_id").read_text().strip()}
    record = json.loads((run_dir / "run.json").read_text())
    assert record["step"] == 12 and record["status"] == "finished" and [p[0] for p in record["history"]["val/loss"]] == [4, 8, 12]


def one_wandb_run(wandb_dir: Path) -> list:
    """The records of the one offline W&B run in `wandb_dir`."""
    (run,) = wandb_dir.glob("offline-run-*")
    return wandb_records(run / f"run-{run.name.rsplit('-', 1)[-1]}.wandb")


def test_checkpoint_artifacts_and_a_sample_run_in_the_training_group(tmp_path: Path) -> None:
    """logger.log_model=true (W&B online, here kept offline by WANDB_MODE for `wandb sync`) logs the run's
    checkpoints as `model` artifacts at the end; `sample.py ... metrics=[fid] wandb=true` logs its grid and scores
    as a run of job_type eval in the training run's group, with the training run's tags and id."""
    run_dir = tmp_path / "run"
    train(run_dir, "logger=wandb", "logger.offline=false", "logger.log_model=true", "tags=[lm]")
    train_id = (run_dir / "wandb" / "run_id").read_text().strip()
    records = one_wandb_run(run_dir / "wandb")
    artifacts = [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == "model"]
    assert {json.loads(a.metadata)["original_filename"] for a in artifacts} == {"last.ckpt", "step_000008.ckpt"}
    assert all(a.name == f"model-{train_id}" and [c.path for c in a.manifest.contents] == ["model.ckpt"] for a in artifacts)
    out = tmp_path / "samples"
    proc = run_script("sample.py", f"ckpt={run_dir}", "n=32", "metrics=[fid]", "wandb=true", f"out_dir={out}")
    records = one_wandb_run(out / "wandb")
    (header,) = [r.run for r in records if r.HasField("run")]
    assert (header.run_group, header.job_type, list(header.tags)) == ("run", "eval", ["lm"])
    config = {u.key: json.loads(u.value_json) for u in header.config.update}
    assert config["train_run_id"] == train_id and config["step"] == 8 and config["n"] == 32
    logged = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for r in records if r.HasField("history") for i in r.history.item}
    scores = json.loads((out / "metrics.json").read_text())
    assert logged["sample/fid"] == scores["fid"] and logged["sample/fid_floor"] == scores["fid_floor"] and logged["trainer/global_step"] == 8
    assert logged["samples/_type"] == "image-file" and len(list((out / "wandb").glob("offline-run-*/files/media/images/samples_*.png"))) == 1
    assert "in group run" in proc.stdout


def test_optuna_search_returns_the_optimized_metric(tmp_path: Path) -> None:
    """hparams_search=digits_optuna: 3 debug=fast trials, one of them refused (lr -1: a failed trial, not a crashed
    study, which exits 0); Optuna's best value is the lowest final val/loss among the finished trials, and the
    summary lists all 3 with the drawn values as columns."""
    import yaml

    sweep = tmp_path / "study"
    # tests/configs/hparams_search/one_bad_lr.yaml: digits_optuna, 3 trials, lr drawn from {-1, 0.001}
    proc = run_script("train.py", "hparams_search=one_bad_lr", f"hydra.searchpath=[file://{ROOT / 'tests' / 'configs'}]",
                      "debug=fast", f"hydra.sweep.dir={sweep}")  # fmt: skip
    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 3, proc.stderr[-3000:]
    statuses = sorted(r["status"] for r in rows)
    finished = [r for r in rows if r["status"] == "finished"]
    assert statuses.count("failed") == sum(r["module.lr"] == "-1" for r in rows) and finished, rows
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == min(float(r["val/loss"]) for r in finished)
    assert "Traceback" not in proc.stderr
