"""The readers behind the one-line refusals of tests/test_bad_inputs.py, in process: every malformed file raises the
error its caller turns into one line (ValueError from ddpm.images, ConfigError from ddpm.diffusers_io and
ddpm.report), naming the file and the key, and never another exception (docs/reliability.md)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import report
from ddpm.diffusers_io import process_kwargs, read_folder, unet_kwargs
from ddpm.edit_inputs import build_mask, read_init
from ddpm.errors import ConfigError
from ddpm.images import open_image, read_npz
from ddpm.unet import check_geometry
from conftest import huge_png

# ---- samples files (ddpm.images.read_npz): sample.py's samples= and init= ---------------------------------------


def saved_npz(path: Path, compressed: bool) -> np.ndarray:
    samples = np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 1, 8, 8)
    (np.savez_compressed if compressed else np.savez)(path, samples=samples, labels=np.arange(4))
    return samples


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_every_cut_or_flipped_byte_of_an_npz_is_refused_or_harmless(compressed: bool, tmp_path: Path) -> None:
    """Each prefix of an npz (a copy cut short) raises ValueError; each file with one byte flipped raises ValueError
    or reads the very images saved (a byte no reader checks, such as a timestamp; or the labels' name, which leaves
    no labels): never another exception."""
    whole = tmp_path / "whole.npz"
    samples = saved_npz(whole, compressed)
    data = whole.read_bytes()
    bad = tmp_path / "bad.npz"
    for end in range(len(data)):
        bad.write_bytes(data[:end])
        with pytest.raises(ValueError, match="not a readable npz"):
            read_npz(bad)
    harmless = 0
    for i in range(len(data)):
        bad.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
        try:
            images, labels = read_npz(bad)
        except ValueError:
            continue
        assert torch.equal(images, torch.from_numpy(samples)) and (labels is None or labels.tolist() == [0, 1, 2, 3]), i
        harmless += 1
    assert harmless < len(data) // 4  # the check is not vacuous: most bytes matter


def test_init_names_a_cut_npz(tmp_path: Path) -> None:
    """init= reads an npz by read_npz too: a copy cut short is refused in one line naming init=."""
    saved_npz(tmp_path / "whole.npz", compressed=False)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:-30])
    with pytest.raises(ConfigError, match=rf"^init={tmp_path / 'cut.npz'} cannot be read: not a readable npz: cut short"):
        read_init(str(tmp_path / "cut.npz"), (1, 8, 8))
    assert read_init(str(tmp_path / "whole.npz"), (1, 8, 8)).shape == (4, 1, 8, 8)


def test_a_whole_npz_reads_back_exactly(tmp_path: Path) -> None:
    samples = saved_npz(tmp_path / "s.npz", compressed=False)
    pixels = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    np.savez(tmp_path / "g.npz", arr_0=pixels, arr_1=np.array([3, 5]))
    images, labels = read_npz(tmp_path / "s.npz")
    assert torch.equal(images, torch.from_numpy(samples)) and labels.tolist() == [0, 1, 2, 3]
    images, labels = read_npz(tmp_path / "g.npz")
    assert torch.equal(((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1), torch.from_numpy(pixels))
    assert labels.tolist() == [3, 5]


@pytest.mark.parametrize("value, named", [(np.nan, "1 NaN or infinite value(s)"), (np.inf, "1 NaN or infinite"), (-np.inf, "1 NaN or infinite")])
def test_nan_or_inf_in_samples_is_refused(value: float, named: str, tmp_path: Path) -> None:
    """NaN passes a range check (every comparison with it is false): it is refused before the range is read."""
    samples = np.zeros((2, 1, 8, 8), np.float32)
    samples[1, 0, 3, 4] = value
    np.savez(tmp_path / "s.npz", samples=samples)
    with pytest.raises(ValueError, match="finite floats in") as e:
        read_npz(tmp_path / "s.npz")
    assert named in str(e.value)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "write, named",
    [
        (lambda p: p.write_bytes(npy_bytes(np.zeros(3))), "one .npy array float64 (3,)"),
        (lambda p: p.write_text("not an npz"), "not a readable npz"),
        (lambda p: np.savez(p, samples=np.array([object()], dtype=object)), "not a readable npz"),  # pickled: never loaded
        (lambda p: np.savez(p, images=np.zeros(3)), "holds ['images']"),
        (lambda p: np.savez(p, samples=np.zeros((2, 8, 8), np.float32)), "expected float (N, C, H, W)"),
        (lambda p: np.savez(p, samples=np.full((1, 1, 2, 2), 3.0, np.float32)), "expected [-1, 1]"),
        (lambda p: np.savez(p, arr_0=np.zeros((1, 8, 8, 1), np.float32)), "expected uint8 (N, H, W, C)"),
    ],
    ids=["npy", "text", "pickled", "keys", "ndim", "range", "arr_0_dtype"],
)  # fmt: skip
def test_other_files_are_refused_with_the_reason(write, named: str, tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    write(path)
    with pytest.raises(ValueError) as e:
        read_npz(path)
    assert named in str(e.value)


# ---- images over Pillow's pixel limit (ddpm.images.open_image): init= and mask= ------------------------------


@pytest.mark.parametrize("size, refused", [((8, 8), False), ((9, 8), True), ((12, 12), True)], ids=["at", "warned", "error"])
def test_images_over_the_pixel_limit_are_refused_before_decoding(size: tuple, refused: bool, tmp_path: Path, monkeypatch) -> None:
    """With the limit at 64 pixels: 8 x 8 opens; 9 x 8 (over it: Pillow only warns) and 12 x 12 (over twice it:
    Pillow raises) are refused alike, naming the limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)
    Image.new("L", size).save(tmp_path / "x.png")
    if not refused:
        with open_image(tmp_path / "x.png") as im:
            assert im.size == size
        return
    with pytest.raises(ValueError, match="more pixels than Pillow's limit of 64 "):
        open_image(tmp_path / "x.png")


def test_a_header_claiming_huge_dimensions_is_refused_at_the_real_limit(tmp_path: Path) -> None:
    for side in (12000, 14000):  # over Image.MAX_IMAGE_PIXELS; over twice it
        with pytest.raises(ValueError, match=f"Pillow's limit of {Image.MAX_IMAGE_PIXELS:,}"):
            open_image(huge_png(tmp_path / f"{side}.png", side))


def test_init_and_mask_name_the_image_over_the_limit(tmp_path: Path) -> None:
    """init= as a file or a folder (the image named, not skipped as a non-image would be), and mask=."""
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "a.png")
    huge_png(folder / "b.png", 12000)
    with pytest.raises(ConfigError, match=rf"^init={folder}: b\.png: it has more pixels than Pillow's limit"):
        read_init(str(folder), (1, 8, 8))
    with pytest.raises(ConfigError, match=rf"^init={folder / 'b.png'} cannot be read: it has more pixels"):
        read_init(str(folder / "b.png"), (1, 8, 8))
    with pytest.raises(ConfigError, match=rf"^mask={folder / 'b.png'} cannot be read: it has more pixels"):
        build_mask(str(folder / "b.png"), (1, 8, 8))
    assert read_init(str(folder / "a.png"), (1, 8, 8)).shape == (1, 1, 8, 8)


# ---- diffusers configs (ddpm.diffusers_io): sample.py ckpt= and train.py init_weights= -------------------------

SMALL = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32], "layers_per_block": 1,
         "down_block_types": ["AttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
         "norm_num_groups": 8, "attention_head_dim": None}  # fmt: skip


@pytest.mark.parametrize(
    "edit, named",
    [
        ({"block_out_channels": [-16, -32]}, "block_out_channels=[-16, -32] cannot be expressed by this UNet; expected a non-empty list of integers >= 1"),
        ({"block_out_channels": []}, "block_out_channels=[] cannot"),
        ({"block_out_channels": "abc"}, 'block_out_channels="abc" cannot'),
        ({"sample_size": 0}, "sample_size=0 is invalid; expected an integer >= 1"),
        ({"sample_size": 6.0}, "sample_size=6.0 is invalid"),
        ({"sample_size": 5}, "sample_size=5 cannot be expressed by this UNet; expected a multiple of 2"),
        ({"layers_per_block": -1}, "layers_per_block=-1 is invalid; expected an integer >= 1"),
        ({"layers_per_block": None}, "layers_per_block=null is invalid"),
        ({"in_channels": "three"}, 'in_channels="three" is invalid; expected an integer >= 1'),
        ({"out_channels": 0}, "out_channels=0 is invalid"),
        ({"norm_num_groups": 5}, "norm_num_groups=5 cannot be expressed by this UNet; expected a divisor of block_out_channels[0]=16"),
        ({"dropout": "0.1"}, 'dropout="0.1" is invalid; expected a number in [0, 1)'),
        ({"dropout": 1.5}, "dropout=1.5 cannot be expressed by this UNet; expected a number in [0, 1)"),
        ({"norm_eps": 0}, "norm_eps=0 cannot be expressed by this UNet; expected a number > 0"),
        ({"attention_head_dim": 0}, "attention_head_dim=0 is invalid; expected null or an integer >= 1"),
        ({"num_class_embeds": 1}, "num_class_embeds=1 is invalid; expected null or an integer >= 2"),
        ({"flip_sin_to_cos": "no"}, 'flip_sin_to_cos="no" is invalid; expected true or false'),
        ({"down_block_types": 2}, "down_block_types=2 cannot"),
    ],
)  # fmt: skip
def test_impossible_unet_configs_are_refused_naming_file_and_key(edit: dict, named: str) -> None:
    kwargs = unet_kwargs(SMALL, "m/config.json")  # the unedited config is a UNet
    check_geometry(**{k: v for k, v in kwargs.items() if k != "embed_cos_first"})
    with pytest.raises(ConfigError) as e:
        unet_kwargs(SMALL | edit, "m/config.json")
    assert str(e.value).startswith(f"m/config.json: {named}"), str(e.value)


@pytest.mark.parametrize(
    "edit, named",
    [
        ({"num_train_timesteps": "1000"}, 'num_train_timesteps="1000" is invalid; expected an integer >= 1'),
        ({"num_train_timesteps": 0}, "num_train_timesteps=0 is invalid"),
        ({"beta_start": "a"}, 'beta_start="a" is invalid; expected a number'),
        ({"beta_schedule": ["linear"]}, 'beta_schedule=["linear"] is not one of'),
        ({"prediction_type": {}}, "prediction_type={} is not supported"),
    ],
)  # fmt: skip
def test_impossible_scheduler_configs_are_refused_naming_file_and_key(edit: dict, named: str) -> None:
    assert process_kwargs({"beta_schedule": "linear", "num_train_timesteps": 1000}, "m/s.json")["timesteps"] == 1000
    with pytest.raises(ConfigError) as e:
        process_kwargs({"beta_schedule": "linear"} | edit, "m/s.json")
    assert str(e.value).startswith(f"m/s.json: {named}"), str(e.value)


@pytest.mark.parametrize("text, named", [("[1, 2]", "holds a JSON list; expected an object"), ('"x"', "holds a JSON str"), ("{", "not readable JSON")])
def test_a_config_json_that_is_not_an_object_is_refused(text: str, named: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'config.json'}: {named}"):
        read_folder(tmp_path)


# ---- run records (ddpm.report): python -m ddpm.report -------------------------------------------------------------

RECORD = {"status": "finished", "error": None, "step": 8, "wall_s": 1.5, "last": {"train/loss": 0.5, "val/loss": 0.4},
          "history": {"train/loss": [[4, 0.6], [8, 0.5]], "val/loss": [[4, 0.45], [8, 0.4]]}}  # fmt: skip


@pytest.mark.parametrize(
    "text, named",
    [
        ('{"status": "fini', "not readable JSON"),  # a record cut short
        ("[1]", "holds a JSON list; expected a run record"),
        (json.dumps({"step": 8}), 'no "status"'),
        (json.dumps({"status": "finished"}), 'no "step"'),
        (json.dumps(RECORD | {"status": 3}), "status=3 is invalid; expected a string"),
        (json.dumps(RECORD | {"step": "8"}), 'step="8" is invalid; expected an integer >= 0'),
        (json.dumps(RECORD | {"step": -1}), "step=-1 is invalid"),
        (json.dumps(RECORD | {"wall_s": "abc"}), 'wall_s="abc" is invalid; expected a number'),
        (json.dumps(RECORD | {"error": 5}), "error=5 is invalid"),
        (json.dumps(RECORD | {"last": [1]}), "last=[1] is invalid; expected an object of metric name: a number"),
        (json.dumps(RECORD | {"last": {"val/loss": "x"}}), 'last.val/loss="x" is invalid; expected a number'),
        (json.dumps(RECORD | {"history": {"val/loss": [[4]]}}), "history.val/loss=[[4]] is invalid; expected a list of [step, value] pairs"),
        (json.dumps(RECORD | {"history": {"val/loss": [["4", 0.4]]}}), "history.val/loss="),
    ],
)  # fmt: skip
def test_a_malformed_run_record_is_refused_naming_file_and_key(text: str, named: str, tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(RECORD))
    assert report.read_record(path) == RECORD
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        report.read_record(path)
    assert str(e.value).startswith(f"{path}: {named}"), str(e.value)


def sweep(tmp_path: Path) -> Path:
    """Jobs 0 (a good record), 1 (a record of the wrong shape) and 2 (a failed job whose .jobs file is damaged)."""
    root = tmp_path / "sweep"
    for job, record in (("0", json.dumps(RECORD)), ("1", json.dumps(RECORD | {"step": "x"}))):
        (root / job).mkdir(parents=True)
        (root / job / "run.json").write_text(record)
    (root / ".jobs").mkdir()
    (root / ".jobs" / "2.json").write_text('{"num": 2, "run_dir"')
    return root


def test_a_sweep_keeps_a_row_for_each_unreadable_file(tmp_path: Path) -> None:
    """A sweep's summary keeps every job: the unreadable ones as status "unreadable" with the reason as their error."""
    root = sweep(tmp_path)
    rows = {r["job"]: r for r in report.summarize(root)}
    assert rows["0"]["status"] == "finished" and rows["0"]["step"] == 8 and rows["0"]["val/loss"] == 0.4 and rows["0"]["wall_min"] == 0.03
    assert rows["1"]["status"] == "unreadable" and rows["1"]["error"].startswith(f"{root / '1' / 'run.json'}: step=\"x\" is invalid")
    assert rows["2"]["status"] == "unreadable" and rows["2"]["error"].startswith(f"{root / '.jobs' / '2.json'}: not readable JSON")


def test_report_command_line_warns_for_a_sweep_and_refuses_a_single_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`python -m ddpm.report <sweep>`: one warning line per unreadable file, the summary written, exit 0;
    `python -m ddpm.report <run dir>` with an unreadable record: one error line naming it, exit 2, nothing written."""
    root = sweep(tmp_path)
    report.main([str(root)])
    err = capsys.readouterr().err
    assert [line.split(":")[0] for line in err.splitlines()] == ["warning", "warning"]
    assert "status unreadable" in err and (root / "summary.csv").is_file()
    with pytest.raises(SystemExit) as e:
        report.main([str(root / "1")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {root / '1' / 'run.json'}: step=\"x\" is invalid; expected an integer >= 0"]
    assert not (root / "1" / "summary.csv").exists()
