"""Shared fixtures: run train.py / sample.py in subprocesses with outputs in tmp_path, and one trained run per session.

Subprocesses get OMP_NUM_THREADS=1 (tiny models on a shared 2-core machine run fastest on one thread
per process) and W&B offline with no account.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FAST = ["debug=fast"]  # model=tiny, T=100, 8 steps, grids and checkpoints every 4 steps, csv logger


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    env.update(WANDB_CACHE_DIR=str(tmp / ".wandb_cache"), WANDB_CONFIG_DIR=str(tmp / ".wandb_config"), WANDB_DATA_DIR=str(tmp / ".wandb_data"))
    env.pop("WANDB_DIR", None)
    return env


def run_script(script: str, *overrides: str, cwd: Path | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """python <script> <overrides> from the repo root (or `cwd`); with check, fail showing the output tail."""
    cwd = cwd or ROOT
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd, env=_env(Path(cwd)), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if check and proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(overrides)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train(run_dir: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    """A fast training run (debug=fast) into `run_dir`."""
    return run_script("train.py", *FAST, f"hydra.run.dir={run_dir}", *overrides, **kwargs)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One debug=fast run (linear schedule, 8 steps, EMA), shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(run_dir, "schedule=linear")
    return run_dir


@pytest.fixture(scope="session")
def ckpt(trained_run: Path) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Reference-feature caches (ddpm.metrics) go to a temporary XDG_CACHE_HOME, inherited by subprocesses,
    so tests never read or write the user's ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = previous


def wandb_records(path: Path) -> list:
    """The protobuf records (wandb.proto.wandb_internal_pb2.Record) of an offline W&B run's .wandb file: a 7-byte
    `:W&B` header, then LevelDB's log format, 32 KiB blocks of chunks [crc32c 4][length 2, little-endian][type 1],
    type 1 a whole record, 2/3/4 its first/middle/last part; a block's tail under 7 bytes is padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", path
    records, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # padding to the block's end
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def perturbed(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """The model in eval mode with noise added to every parameter. The paper's init zeroes the last
    conv of each residual block, the attention outputs and the final conv, so at init the output is
    identically 0 and would hide any dependence on x, t or y; after this every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def huge_png(path: Path, side: int) -> Path:
    """A 1 x 1 PNG whose header claims side x side pixels (its CRC fixed): Pillow reads the size, never the pixels."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", side, side)  # IHDR's width and height, after the signature, length and type
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
    path.write_bytes(bytes(data))
    return path
