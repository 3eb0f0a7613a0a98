"""Config schemas and value checks: a bad config is refused before a run starts, in one line that names the key.

Two layers (docs/reliability.md):
- types: dataclass schemas of the config groups (`schedule`, `model`, `data`) and of sample.py's options, stored in
  Hydra's ConfigStore (group `schema`) and named in the defaults lists of conf/train.yaml and conf/sample.yaml, so
  OmegaConf rejects `data.batch_size=1.5` or `n=abc` while Hydra composes;
- values: `check_train(cfg)` and `check_sample(cfg)`, ranges and rules across keys (`module.lr` > 0, `eta` in
  [0, 1], the image size against the UNet's levels, widths against `model.norm_groups`, ...), run by the `Validate`
  Hydra callback before Hydra writes the run dir. DiffusionModule and ImageDataModule run the same `check_module` /
  `check_data` on their arguments, so a notebook user gets the same messages.

The train config's top level, `module` and `trainer` stay open dicts (Lightning takes any Trainer argument, and
experiment files may add keys); their values are checked here by hand.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, get_args

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ddpm.errors import ConfigError


# ---- types: schemas of the config groups, checked by OmegaConf at compose time ------------------------------


@dataclass
class ScheduleSchema:
    """conf/schedule/*.yaml: a beta schedule (ddpm.schedules) and T."""

    name: str = MISSING
    timesteps: int = MISSING


@dataclass
class ModelSchema:
    """conf/model/*.yaml: the arguments of ddpm.UNet (image_size and in_channels follow `data`)."""

    image_size: int = MISSING
    in_channels: int = MISSING
    out_channels: Optional[int] = None
    base_channels: int = MISSING
    channel_mult: List[int] = MISSING
    num_res_blocks: int = MISSING
    attention_resolutions: List[int] = field(default_factory=list)
    dropout: float = 0.0
    norm_groups: int = 32
    num_classes: Optional[int] = None
    num_heads: int = 1
    use_checkpoint: bool = False
    norm_eps: float = 1e-5
    embed_cos_first: bool = True
    embed_freq_shift: int = 0
    downsample_padding: int = 1


@dataclass
class DataSchema:
    """conf/data/*.yaml: the arguments of ddpm.data.ImageDataModule."""

    _target_: str = "ddpm.data.ImageDataModule"
    dataset: str = MISSING
    root: Optional[str] = MISSING  # a default here would hide folder.yaml's `???`
    resolution: int = MISSING
    channels: int = MISSING
    hflip: bool = False
    batch_size: int = MISSING
    num_workers: int = 0
    val_fraction: float = 0.2
    split_seed: int = 0
    pin_memory: Optional[bool] = None


@dataclass
class SampleSchema:
    """conf/sample.yaml: sample.py's options (defaults live in the YAML)."""

    ckpt: str = MISSING
    sampler: str = MISSING
    steps: Optional[int] = MISSING
    spacing: Optional[str] = None
    eta: float = 0.0
    sampler_options: Dict[str, Any] = field(default_factory=dict)
    class_label: Any = None  # null, an int or a list of ints
    guidance_scale: float = 1.0
    n: int = MISSING
    batch_size: int = MISSING
    seed: int = 0
    use_ema: bool = True
    device: str = "auto"
    out_dir: Optional[str] = None
    metrics: List[str] = field(default_factory=list)
    metrics_bpd_timesteps: Optional[int] = None
    extractor: str = "digits"
    inception_weights: Optional[str] = None
    wandb: bool = False
    samples: Optional[str] = None
    init: Optional[str] = None
    strength: Optional[float] = None
    mask: Optional[str] = None
    resample: int = 1
    interpolate: Optional[int] = None
    overwrite: bool = False


_store = ConfigStore.instance()
for _name, _node in {"schedule": ScheduleSchema, "model": ModelSchema, "data": DataSchema, "sample": SampleSchema}.items():
    _store.store(group="schema", name=_name, node=_node)


# ---- values ---------------------------------------------------------------------------------------------------


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _null_or(literal: Any) -> tuple[Callable[[Any], bool], str]:
    """The rule of a key that takes null or one of a Literal's values (a sampler's timestep spacing)."""
    return (lambda v: v is None or v in get_args(literal), "null or " + " | ".join(get_args(literal)))


def check(key: str, value: Any, ok: Callable[[], bool] | bool, accepted: str | Callable[[], str]) -> None:
    """Raise ConfigError `<key>=<value> is invalid: expected <accepted>` unless ok (a TypeError inside ok() counts as
    no); `accepted` may be a function, called only for the message."""
    try:
        good = bool(ok() if callable(ok) else ok)
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{key}={_show(value)} is invalid: expected {accepted() if callable(accepted) else accepted}")


def _show(value: Any) -> str:
    """A value as a user types it: strings quoted, None as null, booleans lower-case."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, str) else str(value)


LrDecay = Literal["none", "cosine", "linear"]  # DiffusionModule's lr_decay
Optimizer = Literal["adam", "adamw"]  # DiffusionModule's optimizer


def check_module(args: Mapping[str, Any]) -> None:
    """The DiffusionModule arguments (ddpm.module) that a config sets, by their config keys (`module.lr`, ...).

    `timesteps` and `schedule` are reported as `schedule.timesteps` / `schedule.name`, where users set them.
    """
    from ddpm.diffusion import Objective, Spacing, TimestepSampling, Variance  # torch: loaded when a module is checked
    from ddpm.metrics import EXTRACTORS
    from ddpm.samplers import SAMPLERS
    from ddpm.schedules import SCHEDULES

    a = dict(args)
    T = a.get("timesteps", 1000)
    check("schedule.timesteps", T, lambda: is_int(T) and T >= 1, "an integer >= 1")
    rules: dict[str, tuple[Callable[[Any], bool], str]] = {
        "optimizer": (lambda v: v in get_args(Optimizer), " or ".join(get_args(Optimizer))),
        "schedule": (lambda v: v in SCHEDULES, " or ".join(sorted(SCHEDULES))),
        "objective": (lambda v: v in get_args(Objective), " or ".join(get_args(Objective))),
        "variance": (lambda v: v in get_args(Variance), " or ".join(get_args(Variance))),
        "min_snr_gamma": (lambda v: v is None or (_is_number(v) and v > 0), "null or a number > 0"),
        "vlb_weight": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "sigma_data": (lambda v: _is_number(v) and v > 0, "a number > 0"),
        "timestep_sampling": (lambda v: v in get_args(TimestepSampling), " or ".join(get_args(TimestepSampling))),
        "lognormal_mean": (_is_number, "a number"),
        "lognormal_std": (lambda v: _is_number(v) and v > 0, "a number > 0"),
        "cond_drop_prob": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
        "betas": (lambda v: len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
        "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "warmup_steps": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        "lr_decay": (lambda v: v in get_args(LrDecay), " or ".join(get_args(LrDecay))),
        "sample_every_n_steps": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        "sample_n": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "sample_sampler": (lambda v: v in SAMPLERS, " or ".join(sorted(SAMPLERS))),
        "sample_steps": (lambda v: v is None or (is_int(v) and 1 <= v <= T), f"null or an integer in [1, {T}] (schedule.timesteps)"),
        "sample_spacing": _null_or(Spacing),
        "sample_seed": (is_int, "an integer"),
        "eval_every_n_steps": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        "eval_n": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
        "eval_extractor": (lambda v: v in EXTRACTORS, " or ".join(sorted(EXTRACTORS))),
        "eval_bpd_timesteps": (lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1 (capped at schedule.timesteps)"),
        "channels_last": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
    }
    for name, (ok, accepted) in rules.items():
        if name in a:
            key = "schedule.name" if name == "schedule" else f"module.{name}"
            check(key, a[name], lambda: ok(a[name]), accepted)


def check_model(unet: Mapping[str, Any], image_key: str = "data.resolution", channels_key: str = "data.channels") -> None:
    """UNet arguments that cannot build or run, by config key: the UNet's own rule (ddpm.unet.check_geometry) on
    the config's values and the UNet's defaults for the rest; `image_size` and `in_channels` shown as the keys that
    set them."""
    from ddpm.unet import GeometryError, check_geometry, unet_arguments

    full = unet_arguments(OmegaConf.to_container(unet, resolve=True) if OmegaConf.is_config(unet) else unet)
    args = {k: full[k] for k in inspect.signature(check_geometry).parameters if k != "names"}
    keys = {"image_size": image_key, "in_channels": channels_key}
    try:
        check_geometry(**args, names=lambda arg: keys.get(arg, f"model.{arg}"))
    except GeometryError as e:
        raise ConfigError(f"{e.arg}={_show(e.value)} is invalid: expected {e.accepted}") from None


def check_data(args: Mapping[str, Any]) -> None:
    """ImageDataModule arguments by config key (`data.batch_size`, ...); the dataset name is checked against the registry there."""
    rules: dict[str, tuple[Callable[[Any], bool], str]] = {
        "resolution": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "channels": (lambda v: v in (1, 3) and is_int(v), "1 or 3"),
        "batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "num_workers": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        "val_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "split_seed": (is_int, "an integer"),
    }
    for name, (ok, accepted) in rules.items():
        if name in args:
            check(f"data.{name}", args[name], lambda: ok(args[name]), accepted)


@functools.cache
def precisions() -> tuple[str, ...]:
    """train.py's "auto" (ddpm.hardware.auto_precision), then the precisions Lightning's Trainer accepts, read
    from its own type (full names first, then its short names 64, 32, 16 and bf16).

    Lightning's transformer-engine precisions are left out: they need NVIDIA's layers, which the UNet has not.
    The type is private to Lightning; pyproject.toml pins the range it was read from.
    """
    from lightning.fabric.connector import _PRECISION_INPUT

    names = [str(value) for literal in get_args(_PRECISION_INPUT) for value in get_args(literal)]
    full = [n for n in names if "-" in n and not n.startswith("transformer-engine")]
    return ("auto", *dict.fromkeys(full + [n for n in names if "-" not in n]))


_MAX_TIME = re.compile(r"^\d+:\d{1,2}:\d{1,2}:\d{1,2}$")


def _devices_ok(v: Any) -> bool:
    if isinstance(v, str):
        return v == "auto" or bool(re.fullmatch(r"-1|\d+|(\d+,)*\d+,?", v))
    if is_int(v):
        return v == -1 or v >= 1
    return len(v) > 0 and all(is_int(d) and d >= 0 for d in v)


def check_trainer(trainer: Mapping[str, Any], precision_key: str = "hardware.precision") -> None:
    """The lightning.Trainer arguments that the configs set (any others pass to Lightning unchecked)."""
    rules: dict[str, tuple[Callable[[Any], bool], str | Callable[[], str]]] = {
        "max_steps": (lambda v: is_int(v) and (v == -1 or v >= 1), "an integer >= 1, or -1 for no limit"),
        "max_epochs": (lambda v: v is None or (is_int(v) and v >= -1), "null, -1 or an integer >= 1"),
        "max_time": (lambda v: v is None or isinstance(v, Mapping) or bool(_MAX_TIME.match(str(v))), "null or DD:HH:MM:SS (00:00:05:00 is five minutes)"),
        "val_check_interval": (lambda v: v is None or (is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1), "an integer >= 1 (steps) or a fraction of an epoch in (0, 1]"),
        "check_val_every_n_epoch": (lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
        "limit_val_batches": (lambda v: (is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1), "an integer >= 0 or a fraction in [0, 1]"),
        "limit_train_batches": (lambda v: (is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1), "an integer >= 1 or a fraction in (0, 1]"),
        "num_sanity_val_steps": (lambda v: is_int(v) and v >= -1, "an integer >= 0, or -1 for all"),
        "log_every_n_steps": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "accumulate_grad_batches": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "gradient_clip_val": (lambda v: v is None or (_is_number(v) and v >= 0), "null or a number >= 0"),
        "num_nodes": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "devices": (_devices_ok, "auto, -1 (all), a count >= 1, or a list of device indices such as [0,1]"),
        # "auto" needs no Lightning import (train.py's error paths stay fast); the full names in the message
        "precision": (lambda v: str(v) == "auto" or str(v) in precisions(), lambda: " | ".join(p for p in precisions() if p == "auto" or "-" in p)),
    }
    for name, (ok, accepted) in rules.items():
        if name in trainer:
            key = precision_key if name == "precision" else f"hardware.{name}" if name in ("num_nodes", "devices") else f"trainer.{name}"
            check(key, trainer[name], lambda: ok(trainer[name]), accepted)


def _origin(node: DictConfig, key: str, default: str) -> str:
    """The key a user sets for node[key]: the target of a plain `${a.b}` interpolation, else `default`."""
    raw = OmegaConf.to_container(node, resolve=False).get(key)
    match = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
    return match.group(1) if match else default


def _check_required(cfg: DictConfig, hints: Mapping[str, str]) -> None:
    """ConfigError for the first `???` value left in cfg (outside `hydra`), with a hint of what to set."""

    def walk(node: Any, prefix: str) -> Iterator[str]:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            key = f"{prefix}.{k}" if prefix else str(k)
            if v == MISSING:
                yield key
            yield from walk(v, key)

    plain = OmegaConf.to_container(cfg, resolve=False)  # `???` stays a string; nothing is resolved
    for key in walk({k: v for k, v in plain.items() if k != "hydra"}, ""):
        raise ConfigError(f"{key} is required: {hints.get(key, f'add {key}=... to the command')}")


def check_train(cfg: DictConfig) -> None:
    """Every value of a composed train config that can be checked without data or Lightning; ConfigError on the first bad one.

    Values are read one by one (a DictConfig, not a resolved copy): `${hydra:...}` paths are not resolvable yet.
    """
    _check_required(cfg, {"data.root": "data.root=PATH, the folder of images (or of cifar-10-batches-py)"})
    check("seed", cfg.seed, lambda: is_int(cfg.seed) and 0 <= cfg.seed < 2**32, "an integer in [0, 2**32)")
    check("resume", cfg.resume, isinstance(cfg.resume, bool), "true or false")
    overwrite = cfg.get("overwrite", False)
    check("overwrite", overwrite, isinstance(overwrite, bool), "true or false")
    if overwrite and cfg.resume:
        raise ConfigError("overwrite=true starts afresh (the earlier run moved aside) and resume=true continues the earlier run: use one or the other")
    threads = cfg.get("threads", "auto")
    check("threads", threads, threads == "auto" or (is_int(threads) and threads >= 1), "auto or an integer >= 1")
    for key in ("name", "ckpt_path", "init_weights"):
        check(key, cfg.get(key), cfg.get(key) is None or isinstance(cfg.get(key), str), "null or a string")
    if cfg.ckpt_path and not Path(cfg.ckpt_path).expanduser().exists():  # which checkpoint in it: train.py decides
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such file or run dir")
    if cfg.get("init_weights"):
        if not Path(cfg.init_weights).expanduser().exists():
            raise ConfigError(f"init_weights={cfg.init_weights}: no such file, run dir or diffusers folder")
        if cfg.ckpt_path or cfg.resume:
            raise ConfigError(f"init_weights={cfg.init_weights} starts a new run from weights; ckpt_path= and resume=true continue one: use one or the other")
    check_data(cfg.data)
    check_module({k: cfg.module[k] for k in cfg.module if not k.startswith("_") and k != "unet"})
    model = cfg.model if _origin(cfg.module, "unet", "") == "model" else cfg.module.unet
    check_model(model, _origin(model, "image_size", "model.image_size"), _origin(model, "in_channels", "model.in_channels"))
    check_trainer(cfg.trainer, _origin(cfg.trainer, "precision", "trainer.precision"))
    check_lr_decay(cfg.module.get("lr_decay", "none"), cfg.trainer.max_steps)
    check_optimized_metric(cfg.get("optimized_metric", "val/loss"), cfg.module)


def check_optimized_metric(metric: Any, module: Mapping[str, Any]) -> None:
    """What train() returns must be logged by the run: train/loss, val/loss, or val/<m> of an evaluation metric."""
    evaluated = [f"val/{m}" for m in module.get("eval_metrics") or []] if module.get("eval_every_n_steps") else []
    known = ["val/loss", "train/loss", *evaluated]
    hint = "" if evaluated else "; val/fid and the other evaluation metrics need module.eval_every_n_steps > 0"
    check("optimized_metric", metric, metric in known, f"one this run logs: {' | '.join(known)}{hint}")


def check_lr_decay(decay: str, max_steps: Any) -> None:
    """A decaying learning rate needs the step it reaches 0 at: trainer.max_steps."""
    if decay != "none" and not (is_int(max_steps) and max_steps >= 1):
        raise ConfigError(f"module.lr_decay={decay} decays to 0 at trainer.max_steps, which is {max_steps}; "
                          "set trainer.max_steps=<steps>, or module.lr_decay=none for a max_time budget")  # fmt: skip


def check_sample(cfg: DictConfig) -> None:
    """sample.py's options that need no checkpoint (`steps` against T and `class_label` against the classes wait for it)."""
    from ddpm.diffusion import Spacing
    from ddpm.metrics import EXTRACTORS
    from ddpm.samplers import SAMPLERS, STOCHASTIC, sampler_options

    _check_required(cfg, {"ckpt": "ckpt=PATH, a checkpoint file or a run dir (outputs/runs/<name>)"})
    check("ckpt", cfg.ckpt, isinstance(cfg.ckpt, str), "a checkpoint file or a run dir")
    rules: dict[str, tuple[Callable[[Any], bool], str]] = {
        "n": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "sampler": (lambda v: v in SAMPLERS, " or ".join(sorted(SAMPLERS))),
        "steps": (lambda v: v is None or (is_int(v) and v >= 1), "null (all T) or an integer >= 1"),
        "spacing": _null_or(Spacing),
        "eta": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "guidance_scale": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "class_label": (lambda v: v is None or (is_int(v) and v >= 0) or (len(v) > 0 and all(is_int(k) and k >= 0 for k in v)), "null, an integer >= 0 or a non-empty list of them"),
        "seed": (is_int, "an integer"),
        "extractor": (lambda v: v in EXTRACTORS, " or ".join(sorted(EXTRACTORS))),
        "metrics_bpd_timesteps": (lambda v: v is None or (is_int(v) and v >= 1), "null (all T) or an integer >= 1"),
        "strength": (lambda v: v is None or (_is_number(v) and 0 <= v <= 1), "null or a number in [0, 1]"),
        "resample": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "interpolate": (lambda v: v is None or (is_int(v) and v >= 2), "null or an integer >= 2 (frames per pair)"),
    }
    for name, (ok, accepted) in rules.items():
        if name in cfg:
            check(name, cfg[name], lambda: ok(cfg[name]), accepted)
    known = sampler_options(cfg.sampler)
    for name, value in (cfg.get("sampler_options") or {}).items():
        accepted = ", ".join(f"{k} (default {v})" for k, v in known.items()) or "none"
        check(f"sampler_options.{name}", value, name in known, f"an option of sampler {cfg.sampler}: {accepted}")
        if isinstance(known[name], (int, float)):
            check(f"sampler_options.{name}", value, _is_number(value), f"a number (default {known[name]})")
    _check_editing(cfg, sorted(SAMPLERS), STOCHASTIC)
    if not cfg.get("init") and not cfg.get("samples"):  # else n follows the images, counted when they are read
        K = cfg.get("interpolate")
        check_metric_samples(cfg.get("metrics") or [], cfg.n * (K or 1), f"n={cfg.n}" + (f" with interpolate={K}" if K else ""))


def check_metric_samples(metrics: list[str], n: int, given: str) -> None:
    """Refuse n samples too few for a chosen metric, before any is drawn (a ConfigError naming what set n, `given`:
    `n=1`, `init=dir/`): the sample metrics score at least 2 (ddpm.metrics.SampleEvaluator), precision and recall
    more than the k of their k-NN balls (ddpm.metrics.knn_radii); bpd scores held-out data, not the samples."""
    from ddpm.metrics import PR_NEIGHBOURS, SampleMetric

    needs = {m: PR_NEIGHBOURS + 1 if m in ("precision", "recall") else 2 for m in metrics if m in get_args(SampleMetric)}
    if needs and n < max(needs.values()):
        least = max(needs.values())
        which = ", ".join(f"{m} {k}" for m, k in needs.items())
        raise ConfigError(f"{given} makes {n} sample{'s' * (n != 1)}, too few for metrics={list(metrics)}: they need at least {least} ({which}); draw more or drop those metrics")


def _check_editing(cfg: DictConfig, samplers: list[str], stochastic: set[str]) -> None:
    """How sample.py's editing options combine: strength and mask edit the images of init; resample is
    RePaint's, for inpainting with the ancestral sampler; interpolate needs a deterministic sampler (and DDIM,
    whose inversion encodes them, with init); samples (scoring a file) draws nothing, so edits nothing."""
    init, mask, strength, interpolate = cfg.get("init"), cfg.get("mask"), cfg.get("strength"), cfg.get("interpolate")
    if cfg.get("samples") and (init or interpolate):
        raise ConfigError(f"samples={cfg.samples} scores an existing file; init= and interpolate= draw new samples: use one or the other")
    for key, value in (("mask", mask), ("strength", strength)):
        if value is not None and not init:
            raise ConfigError(f"{key}={value} edits images: give them with init=PATH (an npz, an image file or a folder of images)")
    if "resample" in (cfg.get("sampler_options") or {}):  # the top-level option is checked and counted; this would not be
        raise ConfigError(f"sampler_options.resample={cfg.sampler_options.resample}: set RePaint's resampling as resample={cfg.sampler_options.resample}")
    resample = cfg.get("resample", 1)
    if resample > 1 and (cfg.sampler != "ddpm" or mask is None):
        raise ConfigError(f"resample={resample} is RePaint's resampling of inpainting steps: it needs mask= and sampler=ddpm (got sampler={cfg.sampler}, mask={mask})")
    if interpolate is None:
        return
    if cfg.sampler in stochastic or (cfg.sampler == "ddim" and cfg.eta > 0):
        deterministic = ", ".join("ddim with eta=0" if s == "ddim" else s for s in samplers if s not in stochastic)
        raise ConfigError(f"interpolate={interpolate} needs a deterministic sampler ({deterministic}), got sampler={cfg.sampler}"
                          + (f" eta={cfg.eta}" if cfg.sampler == "ddim" else "") + ": a stochastic one draws new noise on every step")
    if init and (cfg.sampler != "ddim" or mask is not None or strength is not None):
        raise ConfigError(f"interpolate={interpolate} with init= encodes the images by DDIM inversion: it needs sampler=ddim, and no mask or strength")
