"""train.py end to end (subprocesses, CPU, model=tiny): run dirs, checkpoints, resume, EMA, bf16, folders, DDP."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_script, train
from ddpm.callbacks import EMA
from ddpm.hardware import auto_channels_last, auto_precision, native_bf16
from ddpm.images import make_grid
from ddpm.checkpoints import load_module
from ddpm.module import DiffusionModule


def metrics(run_dir: Path) -> dict[str, list[float]]:
    """Every value of every metric in the csv logger's metrics.csv."""
    out: dict[str, list[float]] = {}
    with open(run_dir / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None) and key not in ("epoch", "step"):
                    out.setdefault(key, []).append(float(value))
    return out


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def check_run(run_dir: Path, steps: int = 8) -> dict:
    """The run dir holds the composed config, last.ckpt at `steps`, sample PNGs, and finite logged losses."""
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == steps
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png"))[-1] == f"step_{steps:06d}.png"
    m = metrics(run_dir)
    for key in ("train/loss", "val/loss", "train/loss_q1", "lr"):
        assert m.get(key) and all(math.isfinite(v) for v in m[key]), key
    # a later quarter of [0, T) is logged when training drew a t in it (log-normal t rarely reaches the last)
    assert all(math.isfinite(v) for q in (2, 3, 4) for v in m.get(f"train/loss_q{q}", [])), m.keys()
    return ckpt


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_train_writes_run_dir(schedule: str, trained_run: Path, tmp_path: Path) -> None:
    run_dir = trained_run if schedule == "linear" else tmp_path / "run"
    if schedule != "linear":  # uniform t: every quarter of [0, T) is trained and logged
        out = train(run_dir, f"schedule={schedule}", "threads=auto", "module.timestep_sampling=uniform", "module.sample_spacing=trailing").stdout
        assert f"run dir: {run_dir}" in out and "last sample grid:" in out
        precision = auto_precision("cpu", 1, native_bf16())[0]  # bf16-mixed on a CPU with native bf16
        assert f"hardware: cpu, 1 thread (threads=auto, OMP_NUM_THREADS=1), precision=auto: {precision}" in out  # the tests' environment
        assert "channels_last=auto: " + ("NHWC" if auto_channels_last("cpu", precision) else "NCHW") in out
        tree = out[: out.index("run dir:")]  # the composed config, resolved, printed as a tree first
        assert tree.lstrip().startswith("config") and "name: cosine" in tree and "timestep_sampling: uniform" in tree
        assert tree.index("data") < tree.index("model") < tree.index("module") < tree.index("trainer")
    ckpt = check_run(run_dir)
    assert ckpt["hyper_parameters"]["schedule"] == schedule
    m = metrics(run_dir)
    assert m["train/loss"][-1] < m["train/loss"][0]  # 8 steps at lr 1e-3 already lower the loss
    if schedule != "linear":  # loss is largest where x_t is least noisy for eps-prediction: q1 (small t) above q4
        assert m["train/loss_q1"][-1] > m["train/loss_q4"][-1]
        # module.sample_spacing reaches the grid: it is the trailing-spaced sample, not the sampler's default (karras)
        hp = ckpt["hyper_parameters"]
        assert hp["sample_spacing"] == "trailing" and hp["sample_sampler"] == "dpmsolver++sde"
        grid = np.asarray(Image.open(run_dir / "samples" / "step_000008.png"))
        module = load_module(run_dir / "checkpoints" / "last.ckpt").module
        bf16 = auto_precision("cpu", 1, native_bf16())[0] == "bf16-mixed"
        for spacing, same in (("trailing", True), (None, False)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                images = module.sample(hp["sample_n"], hp["sample_sampler"], hp["sample_steps"], seed=hp["sample_seed"], spacing=spacing)
            assert np.array_equal(np.asarray(make_grid(images)), grid) == same, spacing


def test_ema_weights(ckpt: Path, trained_run: Path) -> None:
    """EMA and live weights differ after training; neither holds the schedule constants (they follow from the
    hyperparameters); the grid written at the end is the EMA model's fixed-seed sample, drawn under the precision
    the run trained in (bf16 autocast where `precision: auto` chose it)."""
    c = load(ckpt)
    ema, live = c["state_dict"], c["current_model_state"]
    assert set(ema) == set(live)
    assert not [k for k in ema if k.startswith("diffusion.")]
    params = [k for k in ema if k.startswith("unet.")]
    assert any(not torch.equal(ema[k], live[k]) for k in params)

    # the checkpoint alone rebuilds the model, with the EMA weights
    rebuilt = DiffusionModule.load_from_checkpoint(ckpt, map_location="cpu").state_dict()
    assert all(torch.equal(v, rebuilt[k]) for k, v in ema.items())

    grid = np.asarray(Image.open(trained_run / "samples" / "step_000008.png"))
    hp = c["hyper_parameters"]
    bf16 = auto_precision("cpu", 1, native_bf16())[0] == "bf16-mixed"  # the tests' environment: one thread
    for use_ema, same in ((True, True), (False, False)):
        module = load_module(ckpt, use_ema=use_ema).module
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            images = module.sample(hp["sample_n"], hp["sample_sampler"], hp["sample_steps"], seed=hp["sample_seed"], spacing=hp["sample_spacing"])
        assert np.array_equal(np.asarray(make_grid(images)), grid) == same


def test_resume_counts_on_and_restores_ema(tmp_path: Path) -> None:
    """Stop at k = 4, resume to 5: global_step counts on, and the EMA continues from the checkpoint's
    EMA (EMA_5 = lerp(EMA_4, live_5, 1 - decay)), not from a copy of the live weights."""
    run_dir = tmp_path / "run"
    train(run_dir, "trainer.max_steps=4")
    first = load(run_dir / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 4
    train(run_dir, "resume=true", "trainer.max_steps=5")
    second = load(run_dir / "checkpoints" / "last.ckpt")
    assert second["global_step"] == 5
    ema_decay = EMA(decay=0.999, warmup=True).decay_at(4)  # conf/callbacks/default.yaml
    for k, ema4 in first["state_dict"].items():
        if k.startswith("unet."):
            expected = torch.lerp(ema4, second["current_model_state"][k], 1 - ema_decay)
            torch.testing.assert_close(second["state_dict"][k], expected, rtol=1e-5, atol=1e-6)
    # and the live weights continued too: one more optimizer step moved them
    k = "unet.conv_in.weight"
    assert not torch.equal(first["current_model_state"][k], second["current_model_state"][k])


def test_resume_without_checkpoint_fails_cleanly(tmp_path: Path) -> None:
    proc = train(tmp_path / "empty", "resume=true", check=False)
    assert proc.returncode == 2
    assert "resume=true" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "empty").exists()  # no half-made run dir


def test_bf16_trains_on_cpu(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, "hardware=bf16", "hardware.accelerator=cpu")
    check_run(run_dir)
    assert "bf16-mixed" in (run_dir / ".hydra" / "config.yaml").read_text()


def test_folder_of_mixed_images_trains(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        pixels = rng.integers(0, 256, (12 + i, 10 + i, 4), dtype=np.uint8)
        mode = ("RGB", "L", "RGBA", "P")[i % 4]
        img = Image.fromarray(pixels, "RGBA").convert(mode)
        img.save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    run_dir = tmp_path / "run"
    proc = train(run_dir, "data=folder", f"data.root={folder}", "data.resolution=8", "data.num_workers=0", "data.batch_size=4")
    assert "skipped 1 file" in proc.stderr + proc.stdout
    c = check_run(run_dir)
    assert c["hyper_parameters"]["unet"]["in_channels"] == 3


def test_eval_every_n_steps_logs_val_fid(tmp_path: Path) -> None:
    """module.eval_every_n_steps scores EMA samples against the val split during training: val/fid and its floor."""
    run_dir = tmp_path / "run"
    train(run_dir, "module.eval_every_n_steps=4", "module.eval_n=16", "module.sample_every_n_steps=0")
    m = metrics(run_dir)
    for key in ("val/fid", "val/fid_floor"):
        assert len(m.get(key, [])) == 2 and all(math.isfinite(v) for v in m[key]), key  # steps 4 and 8
    assert all(fid > floor for fid, floor in zip(m["val/fid"], m["val/fid_floor"]))
    assert load(run_dir / "checkpoints" / "last.ckpt")["hyper_parameters"]["eval_metrics"] == ["fid"]


def test_eval_extractor_unavailable_fails_before_training(tmp_path: Path) -> None:
    """Without torch-fidelity (CI) or its weights, eval_extractor=inception stops before the loggers write."""
    proc = train(tmp_path / "run", "module.eval_every_n_steps=4", "module.eval_extractor=inception", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "module.eval_extractor=inception" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # no half-made run dir


def test_ddp_two_cpu_processes_write_one_run_dir(tmp_path: Path) -> None:
    """Plain DDP re-launches train.py for rank 1; under Hydra it must reuse rank 0's (timestamped) run dir."""
    run_script(
        "train.py", *["debug=fast", "hardware=ddp", "hardware.accelerator=cpu", "hardware.devices=2", "data.batch_size=32"],
        cwd=tmp_path,
    )  # fmt: skip
    run_dirs = [p for p in (tmp_path / "outputs" / "runs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step_000008.ckpt"]
    assert len(list((run_dir / "samples").glob("step_000008.png"))) == 1
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert not (ROOT / "outputs" / "runs" / run_dir.parent.name / run_dir.name).exists()


def test_ddp_keeps_best_checkpoint_by_val_fid(tmp_path: Path) -> None:
    """callbacks=best_fid under DDP (2 CPU processes): every rank evaluates and holds val/fid in the same step, so the
    checkpoint monitoring it saves on both; training ends on step 7, between evaluations, so a last evaluation ranks
    the final state. best.ckpt is the evaluated step with the lowest logged FID, and holds that FID."""
    run_dir = tmp_path / "run"
    train(
        run_dir, "hardware=ddp", "hardware.accelerator=cpu", "hardware.devices=2", "data.batch_size=32", "callbacks=best_fid",
        "trainer.max_steps=7", "module.eval_every_n_steps=2", "module.eval_n=16",
    )  # fmt: skip
    with open(run_dir / "logs" / "metrics.csv") as f:
        # the loggers get an evaluation at the logger step of its optimizer step k: k - 1
        fid = {int(row["step"]) + 1: float(row["val/fid"]) for row in csv.DictReader(f) if row.get("val/fid")}
    assert sorted(fid) == [2, 4, 6, 7], fid  # every 2 steps, and at the end
    best = load(run_dir / "checkpoints" / "best.ckpt")
    assert best["global_step"] == min(fid, key=fid.get)
    scores = [s["best_model_score"] for k, s in best["callbacks"].items() if "'monitor': 'val/fid'" in k]
    assert len(scores) == 1 and float(scores[0]) == pytest.approx(min(fid.values()), rel=1e-6)
    assert not list((run_dir / "checkpoints").glob("best-v*.ckpt"))
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 7


def test_monitored_val_fid_without_evaluation_is_one_line(tmp_path: Path) -> None:
    """A checkpoint ranked by val/fid needs the evaluation on its save steps: refused before anything runs, with one
    line (train.py), or when the trainer is set up (Evaluation.setup) for checkpoints saving between evaluations."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ddpm.errors import ConfigError
    from ddpm.sample_callbacks import Evaluation, check_monitored_checkpoints

    proc = train(tmp_path / "run", "callbacks=best_fid", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "callbacks.best.monitor=val/fid" in lines[0] and "module.eval_every_n_steps=N" in lines[0]
    assert not (tmp_path / "run").exists()

    def check(every: int, metric: str = "val/fid", **saves) -> None:
        check_monitored_checkpoints({"evaluation": Evaluation(every_n_steps=every), "best": ModelCheckpoint(monitor=metric, **saves)})

    check(2, every_n_train_steps=4)
    check(0, "val/loss", every_n_train_steps=3)  # validation's, not the evaluation's
    for every, metric, saves, says in (
        (2, "val/fid", dict(every_n_train_steps=3), "callbacks.best.every_n_train_steps to a multiple of 2"),
        (2, "val/fid", dict(every_n_epochs=1), "callbacks.best.every_n_train_steps to a multiple of 2"),
        (2, "val/kid", dict(every_n_train_steps=2), "add kid to module.eval_metrics"),
        (0, "val/fid_floor", dict(every_n_train_steps=2), "set module.eval_every_n_steps=N"),
    ):
        with pytest.raises(ConfigError, match=says):
            check(every, metric, **saves)
