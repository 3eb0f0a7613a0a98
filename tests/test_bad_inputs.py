"""Bad configs, data and checkpoints end in one clear line: exit status 2, the key or file named, no traceback,
no run dir left behind (docs/reliability.md).

The table runs every case as a subprocess of train.py, sample.py or `python -m ddpm.report`, several at a time
(one fixture starts them all), and each parametrized test reads its own result. Most cases stop while Hydra
composes or in the Validate callback, before Lightning is imported: a second or two each. The readers behind the
cases are tested in process, case by case, in tests/test_bad_input_units.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, ROOT, _env, huge_png, run_script


@dataclass(frozen=True)
class Case:
    """`script` with `args` ({tmp}: a scratch folder, {ckpt}: a trained checkpoint) must fail naming all of `named`."""

    id: str
    script: str
    args: tuple[str, ...]
    named: tuple[str, ...]


def train(id: str, *args: str, named: tuple[str, ...]) -> Case:
    return Case(id, "train.py", (*FAST, *args), named)


def sample(id: str, *args: str, named: tuple[str, ...]) -> Case:
    return Case(id, "sample.py", ("steps=5", *args), named)


def report(id: str, *args: str, named: tuple[str, ...]) -> Case:
    return Case(id, "ddpm.report", args, named)


PIXEL_LIMIT = f"Pillow's limit of {Image.MAX_IMAGE_PIXELS:,}"


CASES = [
    # the config: options, keys, syntax (Hydra, while composing)
    train("unknown_option", "model=huge", named=("model=huge", "no such option", "available: base, ddpm_cifar10, small, tiny")),
    train("unknown_key", "module.lrr=1", named=("module.lrr", "no such key", "did you mean module.lr?")),
    train("bad_syntax", "model.channel_mult=[1,2", named=("model.channel_mult=[1,2", "key=value")),
    # wrong types (schemas while composing, or the Validate callback before the run dir exists)
    train("type_trainer", "trainer.max_steps=abc", named=("trainer.max_steps='abc'", "expected an integer")),
    train("type_seed", "seed=x", named=("seed='x'", "expected an integer")),
    train("type_batch_size", "data.batch_size=1.5", named=("data.batch_size=1.5", "expected an integer")),
    # out of range, and rules across keys
    train("timesteps", "schedule.timesteps=0", named=("schedule.timesteps=0", "expected an integer >= 1")),
    train("lr", "module.lr=0", named=("module.lr=0", "expected a number > 0")),
    train("batch_size", "data.batch_size=0", named=("data.batch_size=0", "expected an integer >= 1")),
    train("levels", "data.resolution=10", "model.channel_mult=[1,2,2]", named=("data.resolution=10", "a multiple of 4")),
    train("norm_groups", "model.norm_groups=5", named=("model.norm_groups=5", "divisor of model.base_channels=16")),
    train("attention", "model.attention_resolutions=[3]", named=("model.attention_resolutions=[3]", "subset of [8, 4]")),
    train("root_required", "data=folder", named=("data.root is required",)),
    train("ckpt_path", "ckpt_path={tmp}/none.ckpt", named=("ckpt_path={tmp}/none.ckpt", "no such file")),
    train("init_weights_missing", "init_weights={tmp}/none.ckpt", named=("init_weights={tmp}/none.ckpt", "no such file, run dir or diffusers folder")),
    train("init_weights_resume", "init_weights={ckpt}", "resume=true", named=("init_weights=", "resume=true", "use one or the other")),
    train("init_weights_model", "init_weights={ckpt}", "model.base_channels=32", named=("init_weights=", "model.base_channels=16")),
    # data
    train("folder_missing", "data=folder", "data.root={tmp}/missing", named=("data.root={tmp}/missing", "no such folder")),
    train("folder_junk", "data=folder", "data.root={tmp}/junk", named=("data.root={tmp}/junk", "2 file(s) skipped")),
    train("cifar10_batches", "data=cifar10", "data.root={tmp}/empty", named=("data.root={tmp}/empty", "cifar-10-batches-py/{{data_batch_1,")),
    # checkpoints
    sample("ckpt_missing", "ckpt={tmp}/none.ckpt", named=("ckpt={tmp}/none.ckpt", "no such file")),
    sample("ckpt_required", named=("ckpt is required",)),
    sample("ckpt_not_torch", "ckpt={tmp}/notes.ckpt", named=("ckpt={tmp}/notes.ckpt", "not a PyTorch file")),
    sample("ckpt_truncated", "ckpt={tmp}/cut.ckpt", named=("ckpt={tmp}/cut.ckpt", "truncated")),
    sample("ckpt_newer", "ckpt={tmp}/newer.ckpt", named=("ckpt={tmp}/newer.ckpt", "incompatible version", "unknown hyperparameter(s) attention_type")),
    sample("ckpt_older", "ckpt={tmp}/older.ckpt", named=("ckpt={tmp}/older.ckpt", "incompatible version", "missing unet")),
    sample("ckpt_weights", "ckpt={tmp}/weights.ckpt", named=("ckpt={tmp}/weights.ckpt", "weights do not match")),
    # diffusers model folders whose config.json cannot be a UNet: the file and the key named
    sample("diffusers_config", "ckpt={tmp}/diffusers_layers", named=("{tmp}/diffusers_layers/config.json", "layers_per_block=-1", "an integer >= 1")),
    train("diffusers_init_weights", "init_weights={tmp}/diffusers_list", named=("{tmp}/diffusers_list/config.json", "holds a JSON list", "object")),
    # sampling options
    sample("n", "ckpt={ckpt}", "n=0", named=("n=0", "expected an integer >= 1")),
    sample("steps_zero", "ckpt={ckpt}", "steps=0", named=("steps=0",)),
    sample("steps_above_T", "ckpt={ckpt}", "steps=1000", named=("steps=1000", "[1, 100] (the checkpoint's T)")),
    sample("eta", "ckpt={ckpt}", "eta=2", named=("eta=2", "[0, 1]")),
    sample("sampler", "ckpt={ckpt}", "sampler=euler", named=("sampler='euler'", "ddim")),
    sample("metrics", "ckpt={ckpt}", "metrics=[fid,fud]", named=("metrics=", "fud")),
    # a samples file to score
    sample("samples_no_metrics", "ckpt={ckpt}", "samples={tmp}/rgb.npz", named=("samples={tmp}/rgb.npz", "metrics=[")),
    sample("samples_missing", "ckpt={ckpt}", "samples={tmp}/none.npz", "metrics=[fid]", named=("samples={tmp}/none.npz", "no such file")),
    sample("samples_not_npz", "ckpt={ckpt}", "samples={tmp}/notes.ckpt", "metrics=[fid]", named=("samples={tmp}/notes.ckpt", "cannot be scored")),
    sample("samples_keys", "ckpt={ckpt}", "samples={tmp}/keys.npz", "metrics=[fid]", named=("holds ['images']", "`arr_0` (uint8 NHWC)")),
    sample("samples_shape", "ckpt={ckpt}", "samples={tmp}/rgb.npz", "metrics=[fid]", named=("(3, 32, 32) images", "makes (1, 8, 8)")),
    sample("samples_truncated", "ckpt={ckpt}", "samples={tmp}/cut.npz", "metrics=[fid]", named=("samples={tmp}/cut.npz", "not a readable npz", "cut short")),
    sample("samples_nan", "ckpt={ckpt}", "samples={tmp}/nan.npz", "metrics=[fid]", named=("samples={tmp}/nan.npz", "2 NaN or infinite value(s)", "finite")),
    # editing images
    sample("mask_without_init", "ckpt={ckpt}", "mask=right", named=("mask=right", "init=PATH")),
    sample("strength_range", "ckpt={ckpt}", "init={tmp}/rgb.npz", "strength=1.5", named=("strength=1.5", "[0, 1]")),
    sample("resample_sampler", "ckpt={ckpt}", "init={tmp}/rgb.npz", "mask=left", "resample=4", named=("resample=4", "sampler=ddpm")),
    sample("resample_option", "ckpt={ckpt}", "sampler=ddpm", "+sampler_options.resample=3", named=("sampler_options.resample=3", "resample=3")),
    sample("interpolate_stochastic", "ckpt={ckpt}", "interpolate=4", named=("interpolate=4", "deterministic sampler", "heun")),
    sample("init_missing", "ckpt={ckpt}", "init={tmp}/none.png", named=("init={tmp}/none.png", "no such file or folder")),
    sample("init_shape", "ckpt={ckpt}", "init={tmp}/rgb.npz", named=("init={tmp}/rgb.npz", "(3, 32, 32) images")),
    sample("init_empty_folder", "ckpt={ckpt}", "init={tmp}/empty", named=("init={tmp}/empty", "no readable image")),
    sample("init_pixel_limit", "ckpt={ckpt}", "init={tmp}/huge.png", named=("init={tmp}/huge.png", PIXEL_LIMIT)),
    sample("mask_unknown", "ckpt={ckpt}", "init={tmp}/digits.npz", "mask=middle", named=("mask=middle", "left | right | top | bottom | center")),
    sample("interpolate_odd", "ckpt={ckpt}", "init={tmp}/digits.npz", "sampler=ddim", "interpolate=3", named=("init=", "even number", "holds 3")),
    # a run's record read by the report (a folder that is one run; in a sweep the row says so instead)
    report("report_run_json", "{tmp}/bad_record", named=("{tmp}/bad_record/run.json", "step=-3", "an integer >= 0")),
]


def make_inputs(tmp: Path, ckpt: Path) -> None:
    """The broken files the cases name: folders of no usable images, checkpoints cut, foreign or from other versions,
    npz files cut or holding NaN, images over Pillow's pixel limit, diffusers folders and a run record that cannot be read."""
    from ddpm.checkpoints import load_module
    from ddpm.diffusers_io import write_folder

    (tmp / "empty").mkdir()
    junk = tmp / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(junk / "cut.png")
    (junk / "cut.png").write_bytes((junk / "cut.png").read_bytes()[:40])
    (tmp / "notes.ckpt").write_text("not a checkpoint")
    np.savez(tmp / "rgb.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    np.savez(tmp / "keys.npz", images=np.zeros((4, 1, 8, 8), np.float32))
    np.savez(tmp / "digits.npz", arr_0=np.zeros((3, 8, 8, 1), np.uint8))
    (tmp / "cut.ckpt").write_bytes(ckpt.read_bytes()[:4096])
    np.savez(tmp / "whole.npz", samples=np.zeros((4, 1, 8, 8), np.float32))
    (tmp / "cut.npz").write_bytes((tmp / "whole.npz").read_bytes()[:-30])  # a copy cut short: its zip directory lost
    nan = np.zeros((4, 1, 8, 8), np.float32)
    nan[0, 0, 0, 0], nan[1, 0, 0, 0] = np.nan, np.inf
    np.savez(tmp / "nan.npz", samples=nan)
    huge_png(tmp / "huge.png", 12000)  # over MAX_IMAGE_PIXELS, under twice it: Pillow itself only warns, then decodes
    for name, edit in {"layers": lambda c: c | {"layers_per_block": -1}, "list": lambda c: [c]}.items():
        folder = write_folder(load_module(ckpt).module, tmp / f"diffusers_{name}")
        (folder / "config.json").write_text(json.dumps(edit(json.loads((folder / "config.json").read_text()))))
    (tmp / "bad_record").mkdir()
    (tmp / "bad_record" / "run.json").write_text(json.dumps({"status": "finished", "step": -3}))
    edits = {
        "newer": lambda c: c["hyper_parameters"].update(attention_type="flash"),
        "older": lambda c: c["hyper_parameters"].pop("unet"),
        "weights": lambda c: c["state_dict"].pop(next(iter(c["state_dict"]))),
    }
    for name, edit in edits.items():
        edited = torch.load(ckpt, weights_only=True)
        edit(edited)
        torch.save(edited, tmp / f"{name}.ckpt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Run every case (three at a time), each in its own working folder; id -> (process, working folder)."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    make_inputs(tmp, ckpt)

    def run(case: Case) -> tuple[subprocess.CompletedProcess, Path]:
        cwd = tmp / "cwd" / case.id
        cwd.mkdir(parents=True)
        args = [a.format(tmp=tmp, ckpt=ckpt) for a in case.args]
        if case.script == "sample.py":
            args.append(f"out_dir={cwd / 'out'}")
        if case.script.startswith("ddpm."):  # a module's command line
            command = [sys.executable, "-m", case.script, *args]
            return subprocess.run(command, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=120), cwd
        return run_script(case.script, *args, cwd=cwd, check=False, timeout=120), cwd

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip((c.id for c in CASES), pool.map(run, CASES)))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly(case: Case, results: dict, ckpt: Path) -> None:
    proc, cwd = results[case.id]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert "Traceback" not in output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    tmp = cwd.parent.parent
    for named in case.named:
        assert named.format(tmp=tmp, ckpt=ckpt) in errors[0], errors[0]
    left = [p for p in cwd.rglob("*") if p.is_file()]  # Hydra's run dirs (outputs/...) or sample.py's out_dir
    assert not left, left


def test_tracebacks_on_request(tmp_path: Path) -> None:
    """HYDRA_FULL_ERROR=1 shows the traceback of the same bad input (for debugging the checks themselves)."""
    env = dict(os.environ, HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST, "model=huge"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "model/huge" in proc.stderr


@pytest.mark.parametrize("overrides, named", [(("module.lr=-1",), "module.lr=-1"), (("data=folder", "data.root=nowhere"), "data.root=nowhere")])
def test_bad_value_leaves_an_existing_run_untouched(overrides: tuple[str, ...], named: str, trained_run: Path, tmp_path: Path) -> None:
    """A bad override aimed at an existing run (say with resume=true) is refused before Hydra rewrites its saved
    config: .hydra/ and the checkpoints are byte for byte what they were (a missing data folder is found then too)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_script("train.py", *FAST, f"hydra.run.dir={run}", "resume=true", *overrides, check=False)
    assert proc.returncode == 2 and named in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_failed_run_removes_only_its_own_dir(tmp_path: Path) -> None:
    """A run that fails at start-up removes the run dir Hydra made, never the (empty) folder of the user's above it."""
    mine = tmp_path / "mine"
    mine.mkdir()
    proc = run_script("train.py", *FAST, f"hydra.run.dir={mine / 'run'}", "data=folder", f"data.root={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode == 2 and "no such folder" in proc.stderr
    assert mine.is_dir() and not (mine / "run").exists()
