"""One process per run dir (ddpm.runlock): a second train.py aimed at a run dir in use is refused in one line,
exit status 2, writing nothing; a lock whose holder died is taken over with a warning; ranks other than 0 and the
jobs of one sweep never block each other."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import FAST, ROOT, _env, run_script
from ddpm import runlock
from ddpm.runlock import LOCK_NAME, RunInUse

HOLD = "import sys, time; from ddpm import runlock; runlock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)"


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refusals(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def holder(tmp_path: Path):
    """A helper process that locks a run dir with runlock.acquire, as train.py's Validate callback does; (process, dir)."""
    run_dir = tmp_path / "run"

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        return proc

    procs = []
    yield lambda: procs.append(start()) or procs[-1], run_dir
    for proc in procs:
        proc.kill()
        proc.wait()


def test_second_train_py_into_a_running_run_dir_is_refused(tmp_path: Path) -> None:
    """A real train.py holds its run dir (stopped with SIGSTOP mid-training, so its files stay still); a second
    train.py aimed at the dir exits 2 with one line naming the holder's pid and host, and writes nothing; the first
    run then finishes normally and releases the lock."""
    run_dir, reached = tmp_path / "run", tmp_path / "reached"
    hooks = ["+callbacks.record_step._target_=fault_hooks.RecordStep", f"+callbacks.record_step.path={reached}"]
    paths = [str(ROOT / "tests"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(_env(tmp_path), PYTHONPATH=os.pathsep.join(paths))  # train.py imports tests/fault_hooks.py
    with open(tmp_path / "stderr", "w") as err:
        first = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *FAST, f"hydra.run.dir={run_dir}", "trainer.max_steps=6", *hooks],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not reached.exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        before = snapshot(run_dir)
        assert run_dir / LOCK_NAME in before
        second = run_script("train.py", *FAST, f"hydra.run.dir={run_dir}", check=False)
        (line,) = refusals(second)
        assert line.startswith(f"error: {run_dir} is in use by pid {first.pid} on host {os.uname().nodename} since "), line
        assert line.endswith("wait for it to end, or choose another name=/hydra.run.dir="), line
        assert snapshot(run_dir) == before
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0, (tmp_path / "stderr").read_text()[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / LOCK_NAME).exists()  # released at the end


def test_resume_and_runs_inside_a_running_run_are_refused(holder, tmp_path: Path) -> None:
    """resume=true on a run still going is refused (with how to stop it), and so is a run dir inside it."""
    start, run_dir = holder
    proc = start()
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"stands in for the running run's files")
    before = snapshot(run_dir)
    cases = [("resume=true",), (f"hydra.run.dir={run_dir / 'sub'}",)]
    with ThreadPoolExecutor(2) as pool:
        resume, inside = pool.map(lambda extra: run_script("train.py", *FAST, f"hydra.run.dir={run_dir}", *extra, check=False), cases)
    (line,) = refusals(resume)
    assert f"error: {run_dir} is in use by pid {proc.pid} on host " in line, line
    assert line.endswith(f"stop it (kill -TERM {proc.pid} saves last.ckpt) and then resume"), line
    (line,) = refusals(inside)
    assert f"error: {run_dir / 'sub'} lies inside {run_dir}, which is in use by pid {proc.pid}" in line, line
    assert snapshot(run_dir) == before and not (run_dir / "sub").exists()


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(holder, capsys: pytest.CaptureFixture) -> None:
    """kill -9 leaves the record behind, and the kernel releases the flock: the next taker warns once, naming it."""
    start, run_dir = holder
    proc = start()
    proc.kill()
    proc.wait()
    assert str(proc.pid) in (run_dir / LOCK_NAME).read_text()
    assert runlock.acquire(run_dir)
    try:
        warning = capsys.readouterr().err.strip()
        assert warning.startswith(f"warning: {run_dir}: taking over the lock of pid {proc.pid} on host ")
        assert warning.endswith("which is no longer running") and "\n" not in warning
        assert f'"pid": {os.getpid()}' in (run_dir / LOCK_NAME).read_text()
    finally:
        runlock.release(run_dir)
    assert not (run_dir / LOCK_NAME).exists()
    assert runlock.acquire(run_dir)  # a clean release leaves nothing to warn about
    runlock.release(run_dir)
    assert capsys.readouterr().err == ""


def test_a_live_lock_refuses_in_process_too(holder) -> None:
    start, run_dir = holder
    proc = start()
    with pytest.raises(RunInUse, match=f"is in use by pid {proc.pid}"):
        runlock.acquire(run_dir)
    with pytest.raises(RunInUse, match=f"^{run_dir} is in use by pid {proc.pid}"):
        runlock.check_free(run_dir, below=True)  # probing writes nothing
    with pytest.raises(RunInUse, match=f"holds {run_dir}, which is in use by pid {proc.pid}"):
        runlock.check_free(run_dir.parent, below=True)  # a sweep aimed at the folder above a live run
    assert runlock.held_by_another(run_dir)


def test_other_ranks_share_the_lock_and_sweep_jobs_do_not_block_each_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = tmp_path / "sweep"
    assert runlock.acquire(sweep)
    try:
        assert runlock.acquire(sweep / "0") and runlock.acquire(sweep / "1")  # each job its own dir, below the sweep's
        runlock.check_free(sweep / "0")  # the locks above are this process's own
        assert not runlock.acquire(sweep)  # a job whose dir is the sweep dir: counted, not refused
        runlock.release(sweep)
        assert (sweep / LOCK_NAME).exists()
        for name, value in [("LOCAL_RANK", "1"), ("RANK", "3"), ("SLURM_PROCID", "1")]:
            with monkeypatch.context() as m:
                m.setenv(name, value)
                assert not runlock.is_global_rank_zero()
                assert not runlock.acquire(tmp_path / "rank") and not (tmp_path / "rank").exists()
    finally:
        for job in ("0", "1", ""):
            runlock.release(sweep / job)
    assert not list(sweep.rglob(LOCK_NAME))
