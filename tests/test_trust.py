"""Nothing a user is handed runs code: a run dir's config, a CIFAR-10 batch and a checkpoint are read as data
(docs/reliability.md).

Each hostile file would create a marker file if it were executed; each is refused in one `error:` line (exit 2, no
traceback) and the marker never appears.
"""
from __future__ import annotations

import io
import os
import pickle
import shlex
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, run_script
from ddpm.checkpoints import AtomicCheckpointIO, REQUIRED_KEYS
from ddpm.data import DataError, _read_cifar10_batch
from ddpm.errors import ConfigError
from ddpm.evaluation import run_dir_datamodule
from test_data import fake_cifar10


class Payload:
    """Unpickled, runs a shell command that creates `marker`: what a hostile pickle does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def assert_refused(proc: subprocess.CompletedProcess, *named: str) -> None:
    """Exit status 2 and one `error:` line naming each of `named`, no traceback."""
    output = proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, output[-3000:]
    assert len(errors) == 1 and all(n in errors[0] for n in named), output[-3000:]
    assert "Traceback" not in output


def test_payload_runs_when_unpickled(tmp_path: Path) -> None:
    """The control: the payload every test below refuses does create its marker when plainly unpickled."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# ---- a run dir's config -------------------------------------------------------------------------------------------


def hostile_run(trained_run: Path, run: Path, data: dict) -> Path:
    """A copy of `trained_run` at `run` whose .hydra/config.yaml has `data` as its data node."""
    shutil.copytree(trained_run, run)
    config = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(config)
    cfg.data = data
    OmegaConf.save(cfg, config)
    return run


def test_run_dir_config_rebuilds_the_trained_datamodule(trained_run: Path) -> None:
    """The run's own config rebuilds the datamodule it trained on: the same values, read without instantiating."""
    config = trained_run / ".hydra" / "config.yaml"
    expected = OmegaConf.to_container(OmegaConf.load(config).data, resolve=True)
    assert expected.pop("_target_") == "ddpm.data.ImageDataModule"
    assert dict(run_dir_datamodule(config).hparams) == expected


@pytest.mark.parametrize(
    "edit, named",
    [
        ({"_target_": "builtins.open", "_args_": ["{marker}", "w"]}, "data._target_='builtins.open'"),  # Hydra would call it
        ({"_target_": "os.system", "_args_": ["touch {marker}"]}, "data._target_='os.system'"),
        ({"unknown": 1}, "data.unknown is not a parameter of ddpm.data.ImageDataModule"),
        ({"_args_": ["x"]}, "data._args_ is not a parameter"),
        ({"root": {"_target_": "builtins.open", "_args_": ["{marker}", "w"]}}, "data.root={'_target_': 'builtins.open'"),
        ({"root": "${oc.env:NO_SUCH_VARIABLE_HERE}"}, "data.root=${oc.env:NO_SUCH_VARIABLE_HERE} does not resolve"),
    ],
    ids=["open", "os_system", "unknown_key", "args", "nested_target", "interpolation"],
)
def test_run_dir_config_refuses_what_is_not_plain_data(trained_run: Path, tmp_path: Path, edit: dict, named: str) -> None:
    marker = tmp_path / "marker"
    config = tmp_path / "config.yaml"
    cfg = OmegaConf.load(trained_run / ".hydra" / "config.yaml")
    cfg.data = OmegaConf.merge(cfg.data, OmegaConf.create(_with_marker(edit, marker)))
    OmegaConf.save(cfg, config)
    with pytest.raises(ConfigError) as e:
        run_dir_datamodule(config)
    message = str(e.value)
    assert message.startswith(f"{config}: ") and named in message and "\n" not in message, message
    assert not marker.exists()


def _with_marker(value, marker: Path):
    """`value` with "{marker}" in its strings replaced by the marker's path."""
    if isinstance(value, dict):
        return {k: _with_marker(v, marker) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_marker(v, marker) for v in value]
    return value.replace("{marker}", str(marker)) if isinstance(value, str) else value


# ---- CIFAR-10 batches ---------------------------------------------------------------------------------------------


def hostile_cifar10(root: Path, marker: Path) -> Path:
    """A CIFAR-10 folder whose data_batch_1 is a pickle that runs code when loaded."""
    fake_cifar10(root)
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Payload(marker), b"labels": [0]}, f)
    return root


def test_cifar10_reader_refuses_a_pickled_payload(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    batch = hostile_cifar10(tmp_path / "data", marker) / "cifar-10-batches-py" / "data_batch_1"
    with pytest.raises(DataError) as e:
        _read_cifar10_batch(batch)
    message = str(e.value)
    assert message.startswith(f"{batch}: not a CIFAR-10 python batch") and "posix.system" in message and "\n" not in message
    assert not marker.exists()


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as cPickle did for the official CIFAR-10 batches."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def test_cifar10_reader_reads_python2_numpy1_batches(tmp_path: Path) -> None:
    """The official batches' format: protocol 2 from Python 2, numpy 1's module names (numpy.core.multiarray)."""
    rng = np.random.default_rng(0)
    data, labels = rng.integers(0, 256, (4, 3072), dtype=np.uint8), [3, 1, 4, 1]
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump({b"batch_label": b"training batch 1 of 5", b"labels": labels, b"data": data})
    blob = buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in blob and b"_codecs" not in blob
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    images, read_labels = _read_cifar10_batch(path)
    assert torch.equal(images, torch.from_numpy(data.reshape(4, 3, 32, 32))) and read_labels.tolist() == labels


# ---- checkpoints --------------------------------------------------------------------------------------------------


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a Lightning checkpoint whose hyper_parameters run code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 8, "loops": {}, "hyper_parameters": Payload(marker)}, path)
    return path


def test_checkpoint_io_loads_only_weights(ckpt: Path, tmp_path: Path) -> None:
    """AtomicCheckpointIO (Lightning's load on fit/resume) reads our checkpoints, and refuses a pickled payload even
    when a caller asks for weights_only=False."""
    checkpoint_io = AtomicCheckpointIO()
    assert all(key in checkpoint_io.load_checkpoint(ckpt) for key in REQUIRED_KEYS)
    marker = tmp_path / "marker"
    path = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    for asked in (None, False):
        with pytest.raises(pickle.UnpicklingError, match="posix.system"):
            checkpoint_io.load_checkpoint(path, weights_only=asked)
    assert not marker.exists()


# ---- the entry points, end to end --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """`script` with `args` ({tmp}: the folder of the hostile inputs) is refused naming all of `named`; its input
    would create {tmp}/marker_<id> if it ran."""

    id: str
    script: str
    args: tuple[str, ...]
    named: tuple[str, ...]


CASES = [
    Case("run_dir_config", "sample.py", ("ckpt={tmp}/run_dir_config", "out_dir={tmp}/out/run_dir_config", "steps=5", "n=8", "metrics=[fid]"),
         ("{tmp}/run_dir_config/.hydra/config.yaml", "data._target_='os.system'", "is not ddpm.data.ImageDataModule")),
    Case("cifar10", "train.py", (*FAST, "hydra.run.dir={tmp}/out/cifar10", "data=cifar10", "data.root={tmp}/cifar10"),
         ("{tmp}/cifar10/cifar-10-batches-py/data_batch_1", "posix.system")),
    Case("sample_ckpt", "sample.py", ("ckpt={tmp}/sample_ckpt.ckpt", "out_dir={tmp}/out/sample_ckpt", "steps=5", "n=4"),
         ("ckpt={tmp}/sample_ckpt.ckpt", "not a readable checkpoint", "never loaded", "GLOBAL posix.system")),
    Case("train_ckpt_path", "train.py", (*FAST, "hydra.run.dir={tmp}/out/train_ckpt_path", "ckpt_path={tmp}/train_ckpt_path.ckpt"),
         ("ckpt_path={tmp}/train_ckpt_path.ckpt", "not a readable checkpoint", "never loaded", "GLOBAL posix.system")),
    Case("train_resume", "train.py", (*FAST, "hydra.run.dir={tmp}/train_resume", "resume=true"),
         ("resume=true", "no readable checkpoint in {tmp}/train_resume/checkpoints")),
]  # fmt: skip


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory, trained_run: Path) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Make every hostile input, then run every case (three at a time): (their folder, id -> process)."""
    tmp = tmp_path_factory.mktemp("trust")
    hostile_run(trained_run, tmp / "run_dir_config", {"_target_": "os.system", "_args_": [f"touch {tmp / 'marker_run_dir_config'}"]})
    hostile_cifar10(tmp / "cifar10", tmp / "marker_cifar10")
    for name in ("sample_ckpt", "train_ckpt_path"):
        hostile_checkpoint(tmp / f"{name}.ckpt", tmp / f"marker_{name}")
    hostile_checkpoint(tmp / "train_resume" / "checkpoints" / "last.ckpt", tmp / "marker_train_resume")

    def run(case: Case) -> subprocess.CompletedProcess:
        return run_script(case.script, *(a.format(tmp=tmp) for a in case.args), check=False, timeout=120)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return tmp, dict(zip((c.id for c in CASES), pool.map(run, CASES)))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_entry_points_refuse_what_would_run_code(case: Case, refused: tuple) -> None:
    """A run dir config naming os.system (sample.py metrics=[fid]), a CIFAR-10 batch and checkpoints holding a pickled
    payload (sample.py ckpt=, train.py ckpt_path= and resume=true): one line each, and nothing runs."""
    tmp, results = refused
    assert_refused(results[case.id], *(n.format(tmp=tmp) for n in case.named))
    assert not (tmp / f"marker_{case.id}").exists()
