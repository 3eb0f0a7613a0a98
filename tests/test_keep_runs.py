"""What a user keeps is never overwritten: a new run into a dir that holds a run is refused (or moved aside with
overwrite=true), a resumed run appends to its CSV metrics, and a failing write of run.json never ends training."""
from __future__ import annotations

import csv
import errno
import json
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import FAST, ROOT, run_script, train
from ddpm import callbacks
from ddpm.callbacks import RunRecord
from ddpm.config import keep_earlier_run
from ddpm.errors import ConfigError
from ddpm.loggers import AppendingCSVLogger
from ddpm.schema import check_train


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (relative path -> bytes): the file list and their contents, not their times."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a refused run (exit status 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return line


def rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_a_fresh_run_into_a_finished_run_is_refused_and_leaves_it_byte_identical(trained_run: Path) -> None:
    before = snapshot(trained_run)
    line = one_error(train(trained_run, check=False))
    assert line.startswith(f"error: {trained_run} holds a run (checkpoints/, run.json, .hydra/, ...); continue it with resume=true"), line
    assert f"overwrite=true (the earlier run is moved to {trained_run}.<time>, never deleted)" in line
    assert snapshot(trained_run) == before


def test_overwrite_moves_the_earlier_run_aside_intact_and_trains_afresh(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = snapshot(run_dir)
    proc = train(run_dir, "overwrite=true", "trainer.max_steps=4")
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert aside.name[len("run."):].replace("-", "").isdigit()  # run.<YYYYmmdd-HHMMSS>
    assert f"overwrite=true: the earlier run in {run_dir} is now in {aside}" in proc.stderr
    assert snapshot(aside) == before
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert json.loads((run_dir / "run.json").read_text())["step"] == 4


def test_a_sweep_into_an_earlier_sweep_is_refused_before_hydra_writes(trained_run: Path, tmp_path: Path) -> None:
    """Hydra writes each job's .hydra/ before any callback of the job runs, so the sweep is refused as a whole."""
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(trained_run, sweep_dir / "0")
    before = snapshot(sweep_dir)
    proc = run_script("train.py", "-m", *FAST, f"hydra.sweep.dir={sweep_dir}", "seed=0,1", check=False)
    line = one_error(proc)
    assert line.startswith(f"error: {sweep_dir} holds the runs of an earlier sweep (0/); continue them with resume=true"), line
    assert snapshot(sweep_dir) == before


def test_keep_earlier_run_moves_only_a_folder_that_holds_a_run(tmp_path: Path, monkeypatch) -> None:
    """A folder the user made, or one holding only a stale lock file, is no run: the run goes ahead there. A sweep dir
    holds runs when a job dir does; overwrite=true moves the whole sweep dir, and a taken name gets a suffix."""
    made = tmp_path / "made"
    (made / ".run.lock").parent.mkdir()
    (made / ".run.lock").write_text("{}")
    keep_earlier_run(made, resume=False, overwrite=True)
    keep_earlier_run(tmp_path / "absent", resume=False, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made"]

    sweep = tmp_path / "sweep"
    (sweep / "1" / "checkpoints").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("x")
    with pytest.raises(ConfigError, match=r"sweep holds the runs of an earlier sweep \(1/\)"):
        keep_earlier_run(sweep, resume=False, overwrite=False, sweep=True)
    keep_earlier_run(sweep, resume=True, overwrite=False, sweep=True)
    monkeypatch.setattr(time, "strftime", lambda form: "20261205-101500")  # two moves within one second
    for _ in range(2):
        (sweep / "1" / "checkpoints").mkdir(parents=True, exist_ok=True)
        keep_earlier_run(sweep, resume=False, overwrite=True, sweep=True)
    assert not sweep.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("sweep.")) == ["sweep.20261205-101500", "sweep.20261205-101500-2"]
    assert (tmp_path / "sweep.20261205-101500-2" / "1" / "checkpoints").is_dir()


@pytest.mark.parametrize("overrides, message", [
    (["overwrite=true", "resume=true"], "overwrite=true starts afresh (the earlier run moved aside) and resume=true continues"),
    (["overwrite=yes please"], "overwrite='yes please' is invalid: expected true or false"),
])  # fmt: skip
def test_check_train_refuses_overwrite_with_resume_and_non_bools(overrides: list[str], message: str) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(ConfigError) as raised:
        check_train(cfg)
    assert message in str(raised.value)


def test_a_resumed_csv_run_keeps_every_earlier_row(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, "trainer.max_steps=4")
    first_header, first = rows(run_dir / "logs" / "metrics.csv")
    assert first and {r["step"] for r in first} >= {"0", "3"}
    proc = train(run_dir, "resume=true")
    assert "will be deleted" not in proc.stderr + proc.stdout  # Lightning's warning before it deletes metrics.csv
    header, after = rows(run_dir / "logs" / "metrics.csv")
    assert set(header) >= set(first_header)
    assert [{k: r[k] for k in first_header} for r in after[: len(first)]] == first
    assert all(r[k] == "" for r in after[: len(first)] for k in set(header) - set(first_header))
    assert {r["step"] for r in after[len(first) :]} >= {"4", "7"}


def test_appending_csv_logger_widens_the_header_and_keeps_the_rows(tmp_path: Path) -> None:
    """A second logger on the same folder (a resumed run) appends; a key new in it rewrites the header, rows kept."""
    first = AppendingCSVLogger(tmp_path, name="logs", version="")
    first.log_metrics({"a": 1.0}, step=0)
    first.finalize("success")
    second = AppendingCSVLogger(tmp_path, name="logs", version="")
    second.log_metrics({"a": 2.0}, step=1)
    second.log_metrics({"a": 3.0, "b": 4.0}, step=2)
    second.finalize("success")
    header, kept = rows(tmp_path / "logs" / "metrics.csv")
    assert header == ["a", "b", "step"]
    assert kept == [{"a": "1.0", "b": "", "step": "0"}, {"a": "2.0", "b": "", "step": "1"}, {"a": "3.0", "b": "4.0", "step": "2"}]


def test_run_record_warns_once_on_a_full_disk_and_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    """The hooks RunRecord uses, on a trainer reduced to what they read; the writer fails with ENOSPC for two steps."""
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, log_every_n_steps=1, sanity_checking=False, callback_metrics={})
    record = RunRecord(tmp_path)
    record.on_train_start(trainer, None)
    saved = (tmp_path / "run.json").read_bytes()
    written = callbacks.write_text_atomic

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(callbacks, "write_text_atomic", full)
    for step in (1, 2):
        trainer.global_step, trainer.callback_metrics = step, {"train/loss": torch.tensor(float(step))}
        record.on_train_batch_end(trainer, None, None, None, step)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"warning: cannot write {tmp_path / 'run.json'} (No space left on device); training goes on, the next write will retry"]
    assert (tmp_path / "run.json").read_bytes() == saved  # the earlier record, whole

    monkeypatch.setattr(callbacks, "write_text_atomic", written)
    trainer.global_step, trainer.callback_metrics = 3, {"train/loss": torch.tensor(3.0)}
    record.on_train_end(trainer, None)
    kept = json.loads((tmp_path / "run.json").read_text())
    assert kept["status"] == "finished" and kept["step"] == 3
    assert kept["history"]["train/loss"] == [[1, 1.0], [2, 2.0], [3, 3.0]]
    assert capsys.readouterr().err == ""


def test_run_record_resumed_over_a_damaged_record_warns_and_starts_anew(tmp_path: Path, capsys) -> None:
    """A resumed run whose run.json is not a record (cut short, edited by hand) warns in one line and writes a new one."""
    (tmp_path / "run.json").write_text('{"status": "running", "step": ')
    trainer = SimpleNamespace(is_global_zero=True, global_step=4, log_every_n_steps=1, sanity_checking=False, callback_metrics={})
    RunRecord(tmp_path).on_train_start(trainer, None)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {tmp_path / 'run.json'}") and lines[0].endswith("; starting a new record")
    kept = json.loads((tmp_path / "run.json").read_text())
    assert kept["status"] == "running" and kept["step"] == 4 and kept["history"] == {}
