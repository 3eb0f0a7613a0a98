"""Weights from and to diffusers, without a network: randomly initialised UNet2DModels saved with save_pretrained
(the ddpm-cifar10-32 layout, and smaller ones crossing the options) give the outputs of our converted UNet to
1e-5, both directions; sample.py samples a diffusers folder; train.py starts from converted weights; configs our
UNet cannot express are refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_script, train
from ddpm.convert import main as convert
from ddpm.diffusers_io import read_folder, write_folder
from ddpm.errors import ConfigError

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e .[diffusers]; make install does)")

CIFAR10 = dict(  # google/ddpm-cifar10-32's config.json
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, act_fn="silu",
)  # fmt: skip
SMALL = dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"), norm_num_groups=8,
    attention_head_dim=None,
)  # fmt: skip
LAYOUTS = {
    "ddpm-cifar10-32": (CIFAR10, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
    "small-8-heads-cosine-v": (SMALL | {"block_out_channels": (32, 32), "attention_head_dim": 4},
                               {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}),
    "small-conditional-learned": (SMALL | {"out_channels": 2, "num_class_embeds": 11, "flip_sin_to_cos": True, "freq_shift": 0},
                                  {"beta_schedule": "linear", "variance_type": "learned_range"}),
}  # fmt: skip


def diffusers_folder(folder: Path, unet: dict, scheduler: dict, seed: int = 0, safetensors: bool = True) -> "diffusers.UNet2DModel":
    """A random UNet2DModel (weights perturbed off diffusers' init, so every layer matters) and a DDPMScheduler, saved."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**unet).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=safetensors)
    diffusers.DDPMScheduler(num_train_timesteps=1000, **scheduler).save_pretrained(folder)
    return model


def outputs(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, diffusers.UNet2DModel):
            return model(x, t, class_labels=y).sample
        return model(x, t, y=y)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_diffusers_folder_converts_both_ways(layout: str, tmp_path: Path) -> None:
    unet, scheduler = LAYOUTS[layout]
    theirs = diffusers_folder(tmp_path / "theirs", unet, scheduler)
    module = read_folder(tmp_path / "theirs")
    size, channels = unet["sample_size"], unet["in_channels"]
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 987])
    y = torch.tensor([2, 10]) if unet.get("num_class_embeds") else None
    expected = outputs(theirs, x, t, y)
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(outputs(module.unet, x, t, y), expected, rtol=1e-5, atol=1e-5)
    objective = {"epsilon": "eps", "v_prediction": "v"}[scheduler.get("prediction_type", "epsilon")]
    assert module.hparams.objective == objective and module.hparams.timesteps == 1000
    torch.testing.assert_close(module.diffusion.betas.double(), torch.as_tensor(diffusers.DDPMScheduler.from_pretrained(tmp_path / "theirs").betas).double(),
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    # and back: our module as a folder that diffusers loads
    write_folder(module, tmp_path / "back")
    again = diffusers.UNet2DModel.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(outputs(again, x, t, y), expected, rtol=1e-5, atol=1e-5)
    back = json.loads((tmp_path / "back" / "scheduler_config.json").read_text())
    assert back["beta_schedule"] == scheduler["beta_schedule"] and back["prediction_type"] == scheduler.get("prediction_type", "epsilon")


def test_bin_weights_are_read_without_unpickling_objects(tmp_path: Path) -> None:
    theirs = diffusers_folder(tmp_path / "bin", SMALL, {}, safetensors=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 500])
    torch.testing.assert_close(outputs(read_folder(tmp_path / "bin").unet, x, t, None), outputs(theirs, x, t, None), rtol=1e-5, atol=1e-5)
    torch.save({"weights": Path("anything")}, tmp_path / "bin" / "diffusion_pytorch_model.bin")  # a pickled object, not a tensor
    with pytest.raises(ConfigError, match="not readable as weights"):
        read_folder(tmp_path / "bin")


@pytest.mark.parametrize(("where", "edit", "named"), [
    ("config", {"act_fn": "gelu"}, 'act_fn="gelu"'),
    ("config", {"up_block_types": ["UpBlock2D", "UpBlock2D"]}, "up_block_types"),
    ("config", {"block_out_channels": [16, 24]}, "block_out_channels"),
    ("scheduler", {"beta_schedule": "scaled_linear"}, 'beta_schedule="scaled_linear"'),
    ("scheduler", {"beta_end": 0.03}, "beta_end=0.03"),
])  # fmt: skip
def test_configs_it_cannot_express_are_refused_by_key(where: str, edit: dict, named: str, tmp_path: Path) -> None:
    diffusers_folder(tmp_path, SMALL, {})
    path = tmp_path / ("config.json" if where == "config" else "scheduler_config.json")
    path.write_text(json.dumps(json.loads(path.read_text()) | edit))
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        read_folder(tmp_path)


def test_sample_py_samples_a_diffusers_folder(tmp_path: Path) -> None:
    diffusers_folder(tmp_path / "model", SMALL, {})
    run_script("sample.py", f"ckpt={tmp_path / 'model'}", f"out_dir={tmp_path / 'out'}", "n=4", "steps=5")
    x = np.load(tmp_path / "out" / "samples.npz")["samples"]
    assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all()


def test_convert_then_fine_tune_and_export_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """python -m ddpm.convert import writes a checkpoint that train.py's init_weights starts from (a model that is
    not the configured one is refused, naming the overrides that make it so); export turns the run back into a
    folder diffusers loads, with the run's EMA weights."""
    diffusers_folder(tmp_path / "model", SMALL | {"norm_eps": 1e-6}, {"beta_schedule": "squaredcos_cap_v2"})

    assert convert(["import", str(tmp_path / "model"), str(tmp_path / "model.ckpt")]) == 0  # python -m ddpm.convert, in process
    assert convert(["import", str(tmp_path / "model"), str(tmp_path / "model.ckpt")]) == 2
    assert "not overwritten" in capsys.readouterr().err
    refused = train(tmp_path / "refused", f"init_weights={tmp_path / 'model.ckpt'}", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    error = [line for line in refused.stderr.splitlines() if line.startswith("error:")][0]
    assert error.endswith("add model.attention_resolutions=[8] model.norm_eps=1e-06 schedule.timesteps=1000"), error  # debug=fast: model=tiny
    train(tmp_path / "tuned", f"init_weights={tmp_path / 'model.ckpt'}", "model=tiny", "model.attention_resolutions=[8]",
          "model.norm_eps=1e-6", "schedule.timesteps=1000")  # fmt: skip
    assert convert(["export", str(tmp_path / "tuned"), str(tmp_path / "exported")]) == 0
    exported = diffusers.UNet2DModel.from_pretrained(tmp_path / "exported").eval()
    from ddpm.checkpoints import load_module

    ours = load_module(tmp_path / "tuned" / "checkpoints" / "last.ckpt").module
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 900])
    torch.testing.assert_close(outputs(exported, x, t, None), outputs(ours.unet, x, t, None), rtol=1e-5, atol=1e-5)
