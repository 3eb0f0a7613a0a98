"""sample.py keeps what it was handed: whole-or-absent files, no silent replace, a lock on out_dir, no deleting a
folder the user made, n checked against the metrics before sampling, and every torchrun rank stopping together."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import ROOT, _env, run_script
from ddpm.atomic import partial_path
from ddpm.errors import ConfigError
from ddpm.runlock import LOCK_NAME
from ddpm.schema import check_sample

# sample.py in a subprocess whose npz writer stalls halfway through the archive (the kill lands mid-write)
STALLED_WRITER = """
import io, runpy, sys, time
import numpy as np
real = np.savez
def stalled(file, *args, **kwargs):
    buffer = io.BytesIO()
    real(buffer, *args, **kwargs)
    file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    file.flush()
    print("stalled", flush=True)
    time.sleep(300)
np.savez = stalled
sys.argv = sys.argv[1:]  # [sample.py, overrides...]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def sample(out_dir: Path, ckpt: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_script("sample.py", f"ckpt={ckpt}", f"out_dir={out_dir}", "steps=2", *overrides, check=check)


def refused(proc: subprocess.CompletedProcess, *named: str) -> str:
    """The one `error:` line of a refused run (exit status 2, no traceback), after checking it names `named`."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(word in lines[0] for word in named), lines[0]
    return lines[0]


def test_a_kill_while_samples_npz_is_written_leaves_the_previous_file(ckpt: Path, tmp_path: Path) -> None:
    """kill -9 halfway through writing samples.npz (overwrite=true): the final name still holds the previous bytes;
    only the hidden .samples.npz.partial is left beside it (the next write replaces it: tests/test_atomic.py)."""
    out = tmp_path / "out"
    out.mkdir()
    np.savez(out / "samples.npz", samples=np.zeros((2, 1, 8, 8), np.float32))
    before = (out / "samples.npz").read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED_WRITER, str(ROOT / "sample.py"), f"ckpt={ckpt}", f"out_dir={out}", "steps=2", "n=3", "overwrite=true"],
        cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output = []
        for line in proc.stdout:  # the run's log, then the writer's word that it stalls
            output.append(line)
            if line.strip() == "stalled":
                break
        else:
            pytest.fail("".join(output)[-3000:])
        assert partial_path(out / "samples.npz").stat().st_size > 0  # the write is under way
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (out / "samples.npz").read_bytes() == before
    assert {p.name for p in out.iterdir()} <= {"samples.npz", ".samples.npz.partial", "sample.log", LOCK_NAME}


def test_an_earlier_sampling_is_replaced_only_with_overwrite(ckpt: Path, tmp_path: Path) -> None:
    """An out_dir holding samples.npz is refused in one line before anything loads (bytes unchanged); scoring its
    own samples.npz there is refused while an earlier grid.png lies beside it; overwrite=true replaces them."""
    out = tmp_path / "out"
    out.mkdir()
    np.savez(out / "samples.npz", samples=np.zeros((4, 1, 8, 8), np.float32))
    (out / "grid.png").write_bytes(b"earlier grid")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = refused(sample(out, ckpt, "n=3", check=False), f"out_dir={out}", "samples.npz, grid.png", "overwrite=true", "out_dir=")
    assert "of an earlier sampling" in line
    line = refused(sample(out, ckpt, f"samples={out / 'samples.npz'}", "metrics=[fid]", check=False), "grid.png", "overwrite=true")
    assert "samples.npz" not in line.split("holds")[1]  # scoring reads samples.npz; only the grid would be replaced
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    sample(out, ckpt, "n=3", "overwrite=true")
    assert np.load(out / "samples.npz")["samples"].shape == (3, 1, 8, 8) and (out / "grid.png").read_bytes() != b"earlier grid"


def test_an_out_dir_in_use_is_refused(ckpt: Path, tmp_path: Path) -> None:
    """sample.py takes train.py's lock on its out_dir: aimed at a dir another live process holds, it is refused in one
    line and writes nothing there."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ddpm import runlock; runlock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(out)],
        cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(sample(out, ckpt, "n=2", check=False), str(out), "in use", f"pid {holder.pid}")
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    finally:
        holder.terminate()
        holder.wait(timeout=30)


def test_a_failed_run_removes_only_the_folder_it_made(ckpt: Path, tmp_path: Path) -> None:
    """A run that fails after Hydra started (class_label on an unconditional model) removes the out_dir it created,
    and the folders it created above it, but never an empty folder the user made for it."""
    mine = tmp_path / "mine"
    mine.mkdir()
    refused(sample(mine, ckpt, "n=2", "class_label=3", check=False), "class_label=3")
    assert mine.is_dir() and not (mine / "samples.npz").exists() and not (mine / LOCK_NAME).exists()
    made = tmp_path / "new" / "deeper"
    refused(sample(made, ckpt, "n=2", "class_label=3", check=False), "class_label=3")
    assert not (tmp_path / "new").exists()


def test_n_too_few_for_the_metrics_is_refused_before_sampling(ckpt: Path, tmp_path: Path) -> None:
    """n=1 with metrics=[fid] ends in one line naming what the metrics need, before Hydra makes out_dir."""
    out = tmp_path / "out"
    refused(sample(out, ckpt, "n=1", "metrics=[fid]", check=False), "n=1 makes 1 sample", "fid 2")
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["n=1", "metrics=[kid,bpd]"], "n=1 makes 1 sample, too few for metrics=['kid', 'bpd']: they need at least 2 (kid 2)"),
        (["n=3", "metrics=[fid,recall]"], "n=3 makes 3 samples, too few for metrics=['fid', 'recall']: they need at least 4 (fid 2, recall 4)"),
        (["n=1", "interpolate=3", "sampler=ddim", "metrics=[precision]"], "n=1 with interpolate=3 makes 3 samples"),
        (["n=1", "metrics=[bpd]"], None),  # bits/dim scores held-out data
        (["n=4", "metrics=[precision,recall,confidence]"], None),
    ],
)
def test_check_sample_counts_the_samples_each_metric_needs(overrides: list[str], named: str | None, tmp_path: Path) -> None:
    ckpt = tmp_path / "x.ckpt"
    with zipfile.ZipFile(ckpt, "w") as z:
        z.writestr("data.pkl", b"")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={ckpt}", *overrides])
    if named is None:
        check_sample(cfg)
        return
    with pytest.raises(ConfigError) as e:
        check_sample(cfg)
    assert str(e.value).startswith(named), str(e.value)


def test_a_failure_only_rank_0_sees_ends_every_rank_at_once(ckpt: Path, tmp_path: Path) -> None:
    """torchrun --nproc-per-node=2: the run dir's data has no held-out split (data.val_fraction=0), which only rank
    0 finds when it builds the FID reference; every rank stops within seconds with the same one line (rank 1 does
    not draw and then wait in the gather for the process group's 30-minute timeout)."""
    run = tmp_path / "run"
    shutil.copytree(ckpt.parent.parent / ".hydra", run / ".hydra")
    (run / "checkpoints").mkdir()
    shutil.copy(ckpt, run / "checkpoints" / "last.ckpt")
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    config["data"]["val_fraction"] = 0.0
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node=2", f"--master-port={port}", str(ROOT / "sample.py"),
         f"ckpt={run}", f"out_dir={tmp_path / 'out'}", "steps=2", "n=4", "batch_size=1", "metrics=[fid]", "device=cpu"],
        cwd=ROOT, env=_env(tmp_path) | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - started
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert proc.returncode != 0 and took < 60, (took, proc.stderr[-3000:])
    assert len(errors) == 1 and "data.val_fraction" in errors.pop(), proc.stderr[-3000:]
    assert not (tmp_path / "out" / "samples.npz").exists()
