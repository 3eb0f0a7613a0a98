"""sample.py from a checkpoint alone: samples.npz and grid.png, seeded, EMA or live weights (bad input: test_bad_inputs.py)."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import ROOT, _env, run_script
from ddpm.errors import ConfigError
from ddpm.schema import check_sample


def sample(out_dir: Path, ckpt: Path, *overrides: str, check: bool = True):
    return run_script("sample.py", f"ckpt={ckpt}", f"out_dir={out_dir}", "steps=5", *overrides, check=check)


def test_sample_writes_npz_and_grid(ckpt: Path, tmp_path: Path) -> None:
    proc = sample(tmp_path / "a", ckpt.parent.parent, "n=5", "batch_size=2")  # a run dir works as ckpt=
    x = np.load(tmp_path / "a" / "samples.npz")["samples"]
    assert x.dtype == np.float32 and x.shape == (5, 1, 8, 8)
    assert x.min() >= -1.0 and x.max() <= 1.0 and np.isfinite(x).all()
    assert (tmp_path / "a" / "grid.png").is_file()
    assert str(tmp_path / "a" / "samples.npz") in proc.stdout and str(tmp_path / "a" / "grid.png") in proc.stdout


def test_same_seed_same_samples(ckpt: Path, tmp_path: Path) -> None:
    runs = {name: overrides for name, overrides in
            {"s0": ["seed=0"], "s0_again": ["seed=0"], "s1": ["seed=1"], "live": ["seed=0", "use_ema=false"]}.items()}
    x = {}
    for name, overrides in runs.items():
        sample(tmp_path / name, ckpt, "n=4", "batch_size=2", *overrides)
        x[name] = np.load(tmp_path / name / "samples.npz")["samples"]
    assert np.array_equal(x["s0"], x["s0_again"])
    assert not np.allclose(x["s0"], x["s1"])
    assert not np.array_equal(x["s0"], x["live"])  # EMA and live weights differ


def test_sampler_options_reach_the_sampler(ckpt: Path, tmp_path: Path) -> None:
    """+sampler_options.s_tmax=0 turns SDE-DPM-Solver++ into DPM-Solver++ exactly (no step takes noise); the default
    S_tmax injects noise, so its samples differ."""
    x = {}
    for name, overrides in {"ode": ["sampler=dpmsolver++"], "sde0": ["sampler=dpmsolver++sde", "+sampler_options.s_tmax=0"],
                            "sde": ["sampler=dpmsolver++sde"]}.items():  # fmt: skip
        sample(tmp_path / name, ckpt, "n=4", *overrides)
        x[name] = np.load(tmp_path / name / "samples.npz")["samples"]
    assert np.array_equal(x["ode"], x["sde0"])
    assert not np.allclose(x["ode"], x["sde"])


def test_ddpm_sampler_full_chain(ckpt: Path, tmp_path: Path) -> None:
    sample(tmp_path / "d", ckpt, "n=2", "sampler=ddpm", "steps=null")
    assert np.load(tmp_path / "d" / "samples.npz")["samples"].shape == (2, 1, 8, 8)


def test_metrics_json(ckpt: Path, tmp_path: Path) -> None:
    """metrics=[fid,bpd] scores the samples against the run's val split and writes metrics.json beside samples.npz."""
    out = tmp_path / "m"
    proc = sample(out, ckpt.parent.parent, "n=16", "metrics=[fid,bpd]", "metrics_bpd_timesteps=10")
    m = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "fid_floor", "bpd"):
        assert math.isfinite(m[key]), key
    assert m["bpd"] > 0 and m["fid"] > m["fid_floor"] > 0  # 8 training steps: far from the data
    assert m["n"] == m["n_samples"] == 16 and m["n_reference"] == 359 and m["bpd_n"] == 359 and m["bpd_timesteps"] == 10
    assert m["sampler"] == "dpmsolver++sde" and m["steps"] == 5 and m["ckpt"] == str(ckpt) and "kid" not in m
    assert m["spacing"] == "karras" and m["network_evaluations"] == 5
    assert (out / "samples.npz").is_file() and "fid_floor" not in proc.stderr and "fid" in proc.stdout  # the table


def test_npz_for_guided_diffusion_and_scoring_a_file(ckpt: Path, tmp_path: Path) -> None:
    """samples.npz also holds arr_0, the same images as uint8 NHWC (guided-diffusion's evaluator format); samples=
    scores a file without sampling: this project's file scores exactly as when it was drawn, an arr_0-only file
    (quantised to 8 bits) within 2%, and nothing but the scores and a grid is written."""
    drawn = tmp_path / "drawn"
    sample(drawn, ckpt, "n=32", "metrics=[fid,precision,recall]")
    f = np.load(drawn / "samples.npz")
    x, arr_0 = f["samples"], f["arr_0"]
    assert arr_0.dtype == np.uint8 and arr_0.shape == (32, 8, 8, 1)
    assert np.array_equal(arr_0, np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1))
    m = json.loads((drawn / "metrics.json").read_text())
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and 0 < m["precision_floor"] <= 1
    np.savez(tmp_path / "guided.npz", arr_0=arr_0)
    for name, path, rel in (("ours", drawn / "samples.npz", 1e-9), ("guided", tmp_path / "guided.npz", 0.02)):
        out = tmp_path / name
        proc = sample(out, ckpt, f"samples={path}", "metrics=[fid,precision,recall]")
        scored = json.loads((out / "metrics.json").read_text())
        assert scored["fid"] == pytest.approx(m["fid"], rel=rel) and scored["samples"] == str(path) and "sampler" not in scored
        assert scored["n"] == 32 and scored["precision_floor"] == m["precision_floor"]
        assert sorted(p.name for p in out.iterdir()) == ["grid.png", "metrics.json", "sample.log"] and "network evaluations" not in proc.stdout


@pytest.mark.parametrize("sampler,evaluations", [("heun", 9), ("dpmsolver++", 5)])
def test_the_log_and_metrics_json_state_the_network_evaluations(ckpt: Path, tmp_path: Path, sampler: str, evaluations: int) -> None:
    """steps=5 on the checkpoint's T = 100: heun makes 2 * 5 - 1 evaluations over 5 distinct karras timesteps."""
    proc = sample(tmp_path / sampler, ckpt, "n=2", f"sampler={sampler}", "metrics=[bpd]", "metrics_bpd_timesteps=2")
    m = json.loads((tmp_path / sampler / "metrics.json").read_text())
    assert m["network_evaluations"] == evaluations and m["spacing"] == "karras"
    assert f"{sampler} 5 steps (karras spacing" in proc.stdout and f"{evaluations} network evaluations per sample" in proc.stdout


def test_metrics_without_run_dir_fall_back_to_digits(ckpt: Path, tmp_path: Path) -> None:
    """A checkpoint outside its run dir has no saved config; a 1x8x8 model is then scored against the digits split."""
    alone = tmp_path / "alone.ckpt"
    shutil.copy(ckpt, alone)
    sample(tmp_path / "m", alone, "n=8", "metrics=[kid]")
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert math.isfinite(m["kid"]) and m["n_reference"] == 359 and "fid" not in m


def test_conditional_learned_variance_run_samples_labels(tmp_path: Path) -> None:
    """A class-conditional net with label dropout and learned_range variance trains, and sample.py writes
    its labels (0..9 repeated) next to the samples, with classifier-free guidance."""
    from conftest import train

    run_dir = tmp_path / "run"
    # linear schedule and uniform t: after 4 steps the labels already move the bound (the bits/dim check below)
    train(run_dir, "model.num_classes=10", "module.cond_drop_prob=0.2", "module.variance=learned_range", "trainer.max_steps=4",
          "schedule=linear", "module.timestep_sampling=uniform")
    sample(tmp_path / "out", run_dir, "n=12", "batch_size=5", "guidance_scale=2.0")
    out = np.load(tmp_path / "out" / "samples.npz")
    assert out["samples"].shape == (12, 1, 8, 8) and out["labels"].tolist() == [i % 10 for i in range(12)]
    sample(tmp_path / "threes", run_dir, "n=4", "class_label=3", "guidance_scale=3")
    assert np.load(tmp_path / "threes" / "samples.npz")["labels"].tolist() == [3, 3, 3, 3]
    sample(tmp_path / "pair", run_dir, "n=5", "class_label=[1,7]")
    assert np.load(tmp_path / "pair" / "samples.npz")["labels"].tolist() == [1, 7, 1, 7, 1]
    bad = sample(tmp_path / "bad", run_dir, "n=2", "class_label=10", check=False)
    assert bad.returncode == 2 and "class_label=10" in bad.stderr and "Traceback" not in bad.stderr

    # bits/dim of a conditional model is scored on the held-out images' own labels, not on the null label
    sample(tmp_path / "bpd", run_dir, "n=2", "metrics=[bpd]", "metrics_bpd_timesteps=3", "batch_size=64")
    reported = json.loads((tmp_path / "bpd" / "metrics.json").read_text())["bpd"]
    from ddpm.data import digits_split
    from ddpm.metrics import heldout_bits_per_dim
    from ddpm.checkpoints import load_module

    module = load_module(run_dir / "checkpoints" / "last.ckpt").module
    images, labels = digits_split("val")
    scores = {
        name: heldout_bits_per_dim(module.diffusion, module.unet, images, batch_size=64, num_timesteps=3,
                                   generator=torch.Generator().manual_seed(0), labels=y)
        for name, y in {"labels": labels.long(), "null": None}.items()
    }  # fmt: skip
    assert reported == pytest.approx(scores["labels"], rel=1e-5) and abs(scores["labels"] - scores["null"]) > 1e-4


@pytest.mark.parametrize(
    "override, named",
    [
        ("guidance_scale=-0.5", "guidance_scale=-0.5 is invalid: expected a number >= 0"),
        ("spacing=log", "spacing='log' is invalid: expected null or uniform | trailing | karras"),
        ("class_label=-1", "class_label=-1 is invalid: expected null, an integer >= 0 or a non-empty list of them"),
        ("class_label=[]", "class_label=[] is invalid"),
        ("batch_size=0", "batch_size=0 is invalid: expected an integer >= 1"),
        ("metrics_bpd_timesteps=0", "metrics_bpd_timesteps=0 is invalid"),
        ("extractor=resnet", "extractor='resnet' is invalid: expected digits or inception"),
        ("+sampler_options.s_churn=1", "sampler_options.s_churn=1 is invalid: expected an option of sampler dpmsolver++sde: s_tmax (default inf)"),
    ],
)
def test_check_sample_names_the_key(override: str, named: str, tmp_path: Path) -> None:
    """sample.py's options are checked before the checkpoint loads (the Validate callback runs check_sample)."""
    ckpt = tmp_path / "x.ckpt"
    with zipfile.ZipFile(ckpt, "w") as z:  # passes the file pre-check: a complete zip archive
        z.writestr("data.pkl", b"")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={ckpt}", override])
    with pytest.raises(ConfigError) as e:
        check_sample(cfg)
    assert str(e.value).startswith(named), str(e.value)


# ---- editing: SDEdit, inpainting, interpolation ----------------------------------------------------


def real_digits(n: int) -> np.ndarray:
    """n val digits as uint8 (n, 8, 8, 1), guided-diffusion's layout."""
    from ddpm.data import digits_split
    from ddpm.images import to_uint8

    return to_uint8(digits_split("val")[0][:n])


def test_sdedit_strength_zero_returns_the_images_and_n_follows_them(ckpt: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "in.npz", arr_0=real_digits(6))
    sample(tmp_path / "zero", ckpt, f"init={tmp_path / 'in.npz'}", "strength=0", "n=64")
    out = np.load(tmp_path / "zero" / "samples.npz")["arr_0"]
    assert out.shape == (6, 8, 8, 1) and np.array_equal(out, real_digits(6))
    proc = sample(tmp_path / "half", ckpt, f"init={tmp_path / 'in.npz'}", "strength=0.5")
    assert "SDEdit: 6 image(s)" in proc.stdout and "strength 0.5" in proc.stdout
    evaluations = int(re.search(r"(\d+) network evaluations", proc.stdout).group(1))
    assert 0 < evaluations < 5  # only the 5 timesteps' share below t = 0.5 T
    edited = np.load(tmp_path / "half" / "samples.npz")["arr_0"]
    assert edited.shape == (6, 8, 8, 1) and not np.array_equal(edited, real_digits(6))


def test_inpainting_from_a_folder_keeps_the_left_half(ckpt: Path, tmp_path: Path) -> None:
    """mask=right fills the right half of each image of a folder (read in name order) and keeps the left exactly
    (here with RePaint's resampling; every sampler is crossed with inpainting in tests/test_editing.py)."""
    from PIL import Image

    folder = tmp_path / "digits"
    folder.mkdir()
    digits = real_digits(3)
    for i, d in enumerate(digits):
        Image.fromarray(d[..., 0], mode="L").save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    proc = sample(tmp_path / "out", ckpt, f"init={folder}", "mask=right", "sampler=ddpm", "resample=3")
    assert "inpainting (mask=right, resample=3): 3 image(s)" in proc.stdout and "13 network evaluations" in proc.stdout
    out = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert out.shape == (3, 8, 8, 1)
    assert np.array_equal(out[:, :, :4], digits[:, :, :4]) and not np.array_equal(out[:, :, 4:], digits[:, :, 4:])


def test_interpolation_rows_start_and_end_at_plain_samples(ckpt: Path, tmp_path: Path) -> None:
    """interpolate=5 n=2: 10 samples, a row of 5 frames per pair of noises; row i runs from plain sample i of
    seed 0 to plain sample i of seed 1 (the same starting noises)."""
    plain = {}
    for seed in (0, 1):
        sample(tmp_path / f"plain{seed}", ckpt, "n=2", "sampler=ddim", f"seed={seed}")
        plain[seed] = np.load(tmp_path / f"plain{seed}" / "samples.npz")["samples"]
    sample(tmp_path / "lerp", ckpt, "n=2", "sampler=ddim", "interpolate=5")
    frames = np.load(tmp_path / "lerp" / "samples.npz")["samples"]
    assert frames.shape == (10, 1, 8, 8)
    np.testing.assert_allclose(frames[[0, 5]], plain[0], atol=1e-4)
    np.testing.assert_allclose(frames[[4, 9]], plain[1], atol=1e-4)
    assert not np.allclose(frames[2], frames[0], atol=1e-2) and not np.allclose(frames[2], frames[4], atol=1e-2)


def test_two_processes_draw_what_one_draws(ckpt: Path, tmp_path: Path) -> None:
    """torchrun --nproc-per-node=2 (gloo on the CPU): each rank draws its chunks with their own seeds, rank 0
    writes one npz, equal to one process's for the same seed (5 chunks of 2: uneven shares)."""
    import socket

    sample(tmp_path / "one", ckpt, "n=9", "batch_size=2", "sampler=dpmsolver++sde")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}", str(ROOT / "sample.py"),
         f"ckpt={ckpt}", f"out_dir={tmp_path / 'two'}", "steps=5", "n=9", "batch_size=2", "sampler=dpmsolver++sde"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = np.load(tmp_path / "one" / "samples.npz")["samples"]
    two = np.load(tmp_path / "two" / "samples.npz")["samples"]
    assert two.shape == (9, 1, 8, 8) and np.array_equal(one, two)


def test_interpolation_between_images_by_ddim_inversion(ckpt: Path, tmp_path: Path) -> None:
    """Two images, interpolate=3: their DDIM encodings decode back to them (the end frames; the error is first
    order in the step: with this 8-step model's network 0.13, 0.07 and 0.04 mean absolute error on [-1, 1] at
    25, 50 and all 100 steps), and the middle frame lies between."""
    np.savez(tmp_path / "pair.npz", arr_0=real_digits(2))
    sample(tmp_path / "out", ckpt, f"init={tmp_path / 'pair.npz'}", "sampler=ddim", "steps=100", "interpolate=3")
    frames = np.load(tmp_path / "out" / "samples.npz")["samples"]
    images = real_digits(2).transpose(0, 3, 1, 2) / 127.5 - 1
    assert frames.shape == (3, 1, 8, 8)
    errors = [float(np.abs(frames[0] - images[0]).mean()), float(np.abs(frames[2] - images[1]).mean())]
    assert max(errors) < 0.06, errors
    assert np.abs(frames[1] - images[0]).mean() > errors[0] and np.abs(frames[1] - images[1]).mean() > errors[1]


def test_edit_inputs_read_images_and_masks(tmp_path: Path) -> None:
    """init= reads one image file as the run's data is preprocessed (a larger RGB image to the model's 8x8 gray);
    mask presets generate the named half or the central box; a mask image is white where generated (resized by
    nearest neighbour) and an .npy mask of 0 and 1 is taken as it is; anything else is one ConfigError."""
    from PIL import Image

    from ddpm.edit_inputs import build_mask, read_init

    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "white.png")
    x = read_init(str(tmp_path / "white.png"), (1, 8, 8))
    assert x.shape == (1, 1, 8, 8) and torch.equal(x, torch.ones_like(x))
    shape = (1, 8, 8)
    right, bottom, center = (build_mask(m, shape)[0, 0] for m in ("right", "bottom", "center"))
    assert right[:, 4:].eq(1).all() and right[:, :4].eq(0).all() and bottom[4:].eq(1).all() and bottom[:4].eq(0).all()
    assert center.sum() == 16 and center[2:6, 2:6].eq(1).all()
    image = np.zeros((16, 16), np.uint8)
    image[:, 8:] = 255  # white right half at twice the size
    Image.fromarray(image, mode="L").save(tmp_path / "mask.png")
    assert torch.equal(build_mask(str(tmp_path / "mask.png"), shape), build_mask("right", shape))
    np.save(tmp_path / "mask.npy", np.eye(8))
    assert torch.equal(build_mask(str(tmp_path / "mask.npy"), shape)[0, 0], torch.eye(8))
    np.save(tmp_path / "bad.npy", np.full((8, 8), 0.5))
    for spec, named in (("middle", "not a preset"), (str(tmp_path / "bad.npy"), "of 0 and 1")):
        with pytest.raises(ConfigError, match=named):
            build_mask(spec, shape)
