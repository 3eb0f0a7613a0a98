"""Every option of every config group composes (Hydra compose API) and instantiates; the presets hold their promises."""
from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from ddpm import hardware
from ddpm.config import user_error_message  # importing ddpm.config registers the ${or:...} resolver and the schemas
from conftest import ROOT
from ddpm.module import DiffusionModule
from ddpm.errors import ConfigError
from ddpm.diffusion import Objective, Spacing, TimestepSampling, Variance
from ddpm.samplers import SAMPLERS
from ddpm.schema import LrDecay, Optimizer, check_train, check_trainer, precisions

CONF = ROOT / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in sorted(CONF.iterdir()) if g.is_dir()}


def compose_train(overrides: list[str], run_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    return cfg


def instantiate_all(cfg: DictConfig) -> DiffusionModule:
    """Build what train.py builds (the data only as an object: no files are read), with the hardware's auto settings
    settled as train.py settles them."""
    hardware.settle(cfg)
    hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [hydra.utils.instantiate(cfg.logger)] if cfg.get("logger") and cfg.logger.get("_target_") else []
    trainer_cfg = cfg.trainer
    if cfg.hardware.accelerator == "gpu":  # no GPU here: build the same Trainer on the CPU
        trainer_cfg = dict(cfg.trainer, accelerator="cpu", precision="32-true", devices=1 if cfg.hardware.devices == -1 else cfg.hardware.devices)
        if not isinstance(cfg.trainer.strategy, str):  # FSDPStrategy refuses the CPU; tests/test_scale.py builds it alone
            trainer_cfg["strategy"] = "auto"
    hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    return module


def test_groups_exist() -> None:
    assert GROUPS["schedule"] == ["cosine", "linear"]
    assert GROUPS["model"] == ["base", "ddpm_cifar10", "small", "tiny"]
    assert GROUPS["data"] == ["cifar10", "digits", "folder"]
    assert GROUPS["hardware"] == ["bf16", "cpu", "ddp", "ddp_amp", "fsdp", "gpu", "gpu_amp"]
    assert GROUPS["logger"] == ["csv", "none", "wandb"]
    assert {"digits_demo", "cifar10_ddpm"} <= set(GROUPS["experiment"])


# model presets that need more than 8x8 digits are composed at the resolution they are made for
NEEDS_32PX = {"model": {"base", "ddpm_cifar10"}, "experiment": {"cifar10_ddpm"}}
CASES = [(group, option) for group, options in GROUPS.items() for option in options]


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if option in NEEDS_32PX.get(group, ()):
        overrides += ["data.resolution=32", "data.channels=3"]
    if group == "data" and option == "folder":
        overrides += [f"data.root={tmp_path}"]
    cfg = compose_train(overrides, tmp_path)
    check_train(cfg)  # the value checks accept every shipped option (data files: check_train_run, at run time)
    module = instantiate_all(cfg)
    # geometry comes from one place: the data's resolution and channels
    assert module.image_shape == (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    if group == "schedule":
        assert module.hparams.schedule == option and module.diffusion.num_timesteps == cfg.schedule.timesteps


def test_ddpm_cifar10_is_the_papers_model(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=cifar10_ddpm"], tmp_path)
    assert (cfg.data.dataset, cfg.data.resolution, cfg.data.batch_size) == ("cifar10", 32, 128)
    assert (cfg.module.lr, cfg.module.warmup_steps, cfg.trainer.max_steps) == (2e-4, 5000, 800_000)
    assert (cfg.module.timestep_sampling, cfg.module.lr_decay, cfg.module.objective) == ("uniform", "none", "eps")
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.callbacks.ema.decay == 0.9999
    hardware.settle(cfg)
    module = hydra.utils.instantiate(cfg.module)
    n = module.unet.num_params()
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n
    assert module.unet.image_size == 32 and cfg.model.dropout == 0.1


def test_cli_group_choice_wins_over_experiment(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=cifar10_ddpm", "model=base", "schedule=cosine"], tmp_path)
    assert cfg.model.channel_mult == [1, 2, 2] and cfg.schedule.name == "cosine"


def test_timesteps_and_resolution_overrides(tmp_path: Path) -> None:
    cfg = compose_train(["schedule=cosine", "schedule.timesteps=250", "data.resolution=16"], tmp_path)
    hardware.settle(cfg)
    module = hydra.utils.instantiate(cfg.module)
    assert module.diffusion.num_timesteps == 250 and module.image_shape == (1, 16, 16)


def test_sample_config_composes() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("sample", overrides=["ckpt=x.ckpt"])
    assert {"ckpt", "sampler", "steps", "eta", "n", "batch_size", "seed", "use_ema", "device", "out_dir"} <= set(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=1.5", "data.batch_size=1.5 is invalid: expected an integer"),
        ("model.channel_mult=[1,x]", "model.channel_mult=[1,x] is invalid: expected an integer at model.channel_mult[1]"),
        ("schedule.timesteps=abc", "schedule.timesteps=abc is invalid: expected an integer"),
        ("model.dropout=high", "model.dropout=high is invalid: expected a number"),
        ("data.hflip=maybe", "data.hflip=maybe is invalid: expected true or false"),
    ],
)
def test_group_schemas_reject_wrong_types_at_compose(override: str, message: str, tmp_path: Path) -> None:
    """The schema of each group (ddpm.schema, group `schema` in the ConfigStore) types its keys while Hydra composes;
    what the user reads is one line with the key, the value and the type."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose_train([override], tmp_path)
    assert user_error_message(e.value) == message


def test_schemas_convert_values(tmp_path: Path) -> None:
    """Typed keys convert what the command line gives: an integer where a float is expected, quoted numbers."""
    cfg = compose_train(["model.dropout=0", "data.batch_size='16'"], tmp_path)
    assert isinstance(cfg.model.dropout, float) and cfg.data.batch_size == 16


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["module.warmup_steps=-1"], "module.warmup_steps=-1"),
        (["module.variance=wide"], "module.variance='wide'"),
        (["module.sample_steps=101", "schedule.timesteps=100"], "module.sample_steps=101"),
        (["model.dropout=1.0"], "model.dropout=1.0"),
        (["model.image_size=10", "model.channel_mult=[1,2,2]"], "model.image_size=10"),  # named where it was set
        (["data.channels=3", "model.in_channels=0"], "model.in_channels=0"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval=0"),
        (["hardware.devices=[]"], "hardware.devices=[]"),
        (["trainer.precision=8"], "trainer.precision=8"),
        (["resume=maybe"], "resume='maybe'"),
        (["schedule.name=sigmoid"], "schedule.name='sigmoid'"),
        (["hardware.precision=bf17"], "hardware.precision='bf17'"),
        (["seed=-1"], "seed=-1"),
        (["module.lr_decay=step"], "module.lr_decay='step'"),
        (["threads=0"], "threads=0"),
        (["module.objective=score"], "module.objective='score'"),
        (["module.timestep_sampling=beta"], "module.timestep_sampling='beta'"),
        (["module.sample_spacing=log"], "module.sample_spacing='log'"),
        (["module.sigma_data=0"], "module.sigma_data=0"),
        (["module.channels_last=yes"], "module.channels_last='yes'"),
    ],
)
def test_check_train_names_the_key(overrides: list[str], named: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        check_train(compose_train(overrides, tmp_path))
    assert str(e.value).startswith(named + " is invalid: expected "), str(e.value)


def test_precisions_are_lightnings_own() -> None:
    """The validator's precisions are the ones Lightning's Trainer converts (transformer-engine's aside), so the
    two cannot drift; the message of a bad one lists the full names."""
    from lightning.fabric.connector import _convert_precision_to_unified_args

    accepted = precisions()
    assert accepted[0] == "auto" and {"32-true", "bf16-mixed", "16-mixed", "64-true", "bf16"} <= set(accepted)
    for p in accepted[1:]:
        assert _convert_precision_to_unified_args(p) in accepted
    for bad in ("transformer-engine", "bf17", "8"):
        with pytest.raises(ConfigError) as e:
            check_trainer({"precision": bad})
        assert str(e.value) == f"hardware.precision={bad!r} is invalid: expected " + " | ".join(
            p for p in accepted if p == "auto" or "-" in p
        )


def _listed_choices(yaml_file: Path, key: str) -> set[str]:
    """The choices a config file's comment lists for `key` (`key: value  # a (note) | b | c: more`), first word of each."""
    line = next(line for line in yaml_file.read_text().splitlines() if line.strip().startswith(f"{key}:"))
    comment = line.split("#", 1)[1].split(":", 1)[0]
    return {re.match(r"[\w+.-]+", part.strip()).group() for part in comment.split(" | ")}


@pytest.mark.parametrize(
    ("yaml_file", "key", "choices"),
    [
        ("train.yaml", "sample_sampler", lambda: set(SAMPLERS)),
        ("train.yaml", "sample_spacing", lambda: set(get_args(Spacing))),
        ("sample.yaml", "sampler", lambda: set(SAMPLERS)),
        ("sample.yaml", "spacing", lambda: set(get_args(Spacing))),
        ("train.yaml", "objective", lambda: set(get_args(Objective))),
        ("train.yaml", "timestep_sampling", lambda: set(get_args(TimestepSampling))),
        ("train.yaml", "variance", lambda: set(get_args(Variance))),
        ("train.yaml", "optimizer", lambda: set(get_args(Optimizer))),
        ("train.yaml", "lr_decay", lambda: set(get_args(LrDecay))),
    ],
)
def test_config_comments_list_the_registered_choices(yaml_file: str, key: str, choices) -> None:
    """A config comment's list of choices is the registry's or the Literal's, so a new option cannot be left out."""
    assert _listed_choices(CONF / yaml_file, key) == choices()


def test_lr_decay_without_max_steps_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="module.lr_decay=cosine decays to 0 at trainer.max_steps, which is -1"):
        check_train(compose_train(["module.lr_decay=cosine", "trainer.max_steps=-1", "trainer.max_time=00:00:05:00"], tmp_path))


def test_unknown_key_in_a_yaml_file_is_named_with_its_file(tmp_path: Path) -> None:
    """A typo inside a group's YAML (here a user's experiment overlay) is caught by the group's schema and reported
    with the key, a suggestion and the file."""
    from hydra.errors import ConfigCompositionException

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\ndata:\n  batch_szie: 8\n")
    with pytest.raises(ConfigCompositionException) as e:
        compose_train([f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo"], tmp_path)
    assert user_error_message(e.value).startswith("data.batch_szie: no such key (did you mean data.batch_size?) (in experiment/typo.yaml)")
