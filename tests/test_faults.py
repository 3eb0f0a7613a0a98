"""Fault tolerance of train.py (subprocesses, CPU, debug=fast: checkpoints every 4 steps): kill -9 and resume,
SIGTERM / Ctrl-C, a nan loss, truncated checkpoints, atomic writes.

Faults are injected and observed by the test-only callbacks in tests/fault_hooks.py, added with Hydra overrides.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from conftest import FAST, ROOT, _env, train
from ddpm.checkpoints import AtomicCheckpointIO, resume_checkpoint
from ddpm.errors import ConfigError
from ddpm.runlock import LOCK_NAME

EVERY = 4  # callbacks.checkpoint.every_n_train_steps in conf/debug/fast.yaml
RECORD_STEP = "+callbacks.record_step._target_=fault_hooks.RecordStep"


@pytest.fixture(autouse=True)
def hooks_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py subprocesses can import tests/fault_hooks.py."""
    paths = [str(ROOT / "tests"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for item in obj for t in tensors(item)] if isinstance(obj, (list, tuple)) else []


def start_training(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A long debug=fast run in the background that records the step it has reached; (process, run dir, record)."""
    run_dir, reached = tmp_path / "run", tmp_path / "reached"
    overrides = [*FAST, f"hydra.run.dir={run_dir}", "trainer.max_steps=1000", RECORD_STEP, f"+callbacks.record_step.path={reached}"]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=_env(tmp_path), stdout=out, stderr=err)
    return proc, run_dir, reached


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], tmp_path: Path, timeout: float = 120) -> None:
    """Poll until ready() while the process runs; fail with its stderr if it ends first or takes too long."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"train.py ended or stalled (rc {proc.poll()}):\n{(tmp_path / 'stderr').read_text()[-3000:]}")
        time.sleep(0.02)


def step_reached(record: Path) -> int:
    """The step fault_hooks.RecordStep last wrote (it replaces the file atomically); 0 before its first write."""
    try:
        text = record.read_text()
    except FileNotFoundError:
        return 0
    return int(text) if text.strip() else 0


def test_kill_9_loses_at_most_one_interval_and_resume_restores_ema(tmp_path: Path) -> None:
    proc, run_dir, reached = start_training(tmp_path)
    wait_for(proc, lambda: step_reached(reached) >= EVERY + 2, tmp_path)  # past the first checkpoint, mid-interval
    proc.kill()
    proc.wait()
    killed_at = step_reached(reached)
    ckpts = {p: load(p) for p in (run_dir / "checkpoints").glob("*.ckpt")}  # every file loads: writes are atomic
    saved = max(c["global_step"] for c in ckpts.values())
    assert 0 <= killed_at - saved <= EVERY, (killed_at, saved)

    ema_at_start = tmp_path / "ema_at_start.pt"
    hooks = ["+callbacks.save_ema._target_=fault_hooks.SaveEMAAtStart", f"+callbacks.save_ema.path={ema_at_start}"]
    assert str(proc.pid) in (run_dir / LOCK_NAME).read_text()  # the killed run's lock record stays behind
    resumed_run = train(run_dir, "resume=true", f"trainer.max_steps={saved + 2}", *hooks)
    assert f"taking over the lock of pid {proc.pid} on host" in resumed_run.stderr  # the kernel released its flock
    assert not (run_dir / LOCK_NAME).exists()
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == saved + 2
    resumed = load(ema_at_start)
    assert resumed["global_step"] == saved
    killed = next(c for c in ckpts.values() if c["global_step"] == saved)
    assert set(resumed["state_dict"]) == set(killed["state_dict"])
    for key, value in killed["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_step_reached_and_exits(signum: signal.Signals, tmp_path: Path) -> None:
    """SIGTERM, or Ctrl-C (SIGINT), ends the current step, writes last.ckpt (with the EMA) at it, and exits
    128 + signum within 20 s with one line naming the checkpoint and no traceback."""
    proc, run_dir, reached = start_training(tmp_path)
    wait_for(proc, lambda: step_reached(reached) >= EVERY + 1, tmp_path)
    proc.send_signal(signum)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"train.py did not exit within 20 s of {signum.name}")
    assert proc.returncode == 128 + signum
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    step = step_reached(reached)
    assert [line for line in stderr.splitlines() if line.startswith("stopped by")] == [
        f"stopped by {signum.name} at step {step}: state in {last}; continue with resume=true"
    ]
    ckpt = load(last)
    assert ckpt["global_step"] == step > EVERY
    assert not (run_dir / LOCK_NAME).exists()  # the run dir's lock is released
    assert {"state_dict", "current_model_state", "averaging_state"} <= set(ckpt)  # EMA and live weights


@pytest.mark.parametrize("check_every_n_steps", [1, 100])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(check_every_n_steps: int, tmp_path: Path) -> None:
    """A nan loss at step 6 stops the run (exit 3, one line naming step 6); last.ckpt stays the step-4 state,
    all finite. With checks every 100 steps the nan reaches the weights, and the save at step 8 is refused."""
    run_dir = tmp_path / "run"
    proc = train(
        run_dir, "+callbacks.inject_nan._target_=fault_hooks.InjectNaN", "+callbacks.inject_nan.at_step=6",
        f"callbacks.nonfinite_guard.check_every_n_steps={check_every_n_steps}", check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss (nan) at step 6" in errors[0], proc.stderr[-3000:]
    ckpt_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step_000004.ckpt"]
    last, good = load(ckpt_dir / "last.ckpt"), load(ckpt_dir / "step_000004.ckpt")
    assert last["global_step"] == 4
    weights = [last[k] for k in ("state_dict", "current_model_state", "averaging_state", "optimizer_states")]
    assert all(torch.isfinite(t).all() for t in tensors(weights) if t.is_floating_point())
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(v, good[key][k]) for k, v in last[key].items()), key


def test_resume_skips_truncated_checkpoints(tmp_path: Path) -> None:
    """With step_4, step_8 and last (8) on disk and the two newest truncated, resume=true warns about each and
    continues from step_4: to max_steps=6 it ends at 6 (from step 8 it could not)."""
    run_dir = tmp_path / "run"
    train(run_dir, "callbacks.checkpoint.save_top_k=-1")
    ckpt_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step_000004.ckpt", "step_000008.ckpt"]
    for name in ("step_000008.ckpt", "last.ckpt"):
        path = ckpt_dir / name
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    proc = train(run_dir, "resume=true", "trainer.max_steps=6")
    out = proc.stdout + proc.stderr
    for name in ("step_000008.ckpt", "last.ckpt"):
        assert f"skipping unreadable checkpoint {ckpt_dir / name}" in out, name
    assert f"Restoring states from the checkpoint path at {ckpt_dir / 'step_000004.ckpt'}" in out
    assert load(ckpt_dir / "last.ckpt")["global_step"] == 6


def test_resume_without_readable_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    """Only unreadable files: a ConfigError naming the key and the folder (train.py: one `error:` line, exit 2)."""
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match=f"resume=true: no readable checkpoint in {ckpt_dir}"):
        resume_checkpoint(tmp_path / "run", key="resume=true")
    with pytest.raises(ConfigError, match="ckpt_path=.*last.ckpt: not a readable checkpoint"):
        resume_checkpoint(ckpt_dir / "last.ckpt", key="ckpt_path")


class Unpicklable:
    def __reduce__(self) -> Any:
        raise RuntimeError("disk full")  # stands in for any failure in the middle of a save


def test_atomic_save_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """A save that fails midway leaves the previous file as it was and no temporary file behind
    (torch.save straight into the path would already have truncated it)."""
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3), "extra": Unpicklable()}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert load(path)["global_step"] == 1
