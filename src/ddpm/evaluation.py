"""Glue between the metrics (ddpm.metrics) and the framework: reference images from a datamodule or a run dir,
and a SampleEvaluator built from config values, with one-line ConfigErrors that name the key to fix.

Used by sample.py (`metrics=[fid,kid,bpd]`) and by the Evaluation callback during training (ddpm.sample_callbacks,
`module.eval_every_n_steps`).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterable, get_args

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpm.data import ImageDataModule, digits_split
from ddpm.errors import ConfigError, first_line
from ddpm.metrics import MetricsSetupError, SampleEvaluator, SampleMetric, build_extractor, check_metrics

SAMPLE_METRICS = get_args(SampleMetric)  # what SampleEvaluator computes; "bpd" is separate


def validate_metrics(names: Iterable[str] | None, key: str = "metrics") -> tuple[str, ...]:
    """check_metrics, with a ConfigError naming `key` (e.g. `metrics=['fud']: unknown metric(s) fud; choose from ...`)."""
    names = list(names or [])
    try:
        return check_metrics(names)
    except MetricsSetupError as e:
        raise ConfigError(f"{key}={names}: {e}") from e


def dataset_images(dataset: Dataset) -> Tensor:
    """All images of a dataset as one float32 tensor (N, C, H, W) in [-1, 1], without random flips (the datasets
    serve images unflipped; flips are the training loader's, ddpm.data.ResumableLoader)."""
    images = getattr(dataset, "images", None)
    if isinstance(images, Tensor):  # TensorImages: no per-item loop
        return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
    return torch.stack([dataset[i][0] for i in range(len(dataset))]).float()


def dataset_labels(dataset: Dataset) -> Tensor:
    """All class labels of a dataset as one int64 tensor (N,), in the order of `dataset_images`."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor):  # TensorImages
        return labels.long()
    if labels is not None and len(labels) == len(dataset):  # ImageFolder: a list
        return torch.as_tensor(labels, dtype=torch.long)
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))]).long()


def datamodule_images(datamodule: Any) -> tuple[Tensor, Tensor, str]:
    """(val images, train images, cache name) of an ImageDataModule, preprocessed as it serves them."""
    datamodule.setup("fit")
    if datamodule.val_set is None or len(datamodule.val_set) < 2:
        raise ConfigError("data.val_fraction: evaluation needs a held-out split of at least 2 images (the FID reference)")
    spec = datamodule.spec
    name = f"{datamodule.dataset}-{spec.resolution}px-{spec.channels}ch"
    return dataset_images(datamodule.val_set), dataset_images(datamodule.train_set), name


def run_dir_images(ckpt: Path, image_shape: tuple[int, int, int], key: str = "metrics") -> tuple[Tensor, Tensor, str, Tensor]:
    """(val, train, cache name, val labels) of the data a checkpoint was trained on.

    From the run's composed config (<run dir>/.hydra/config.yaml, the run dir being the checkpoint's
    grandparent) when it exists, read as data by `run_dir_datamodule`; else, for a 1x8x8 model, the digits
    split; else a ConfigError.
    """
    config = Path(ckpt).resolve().parent.parent / ".hydra" / "config.yaml"
    datamodule = run_dir_datamodule(config) if config.is_file() else None
    if datamodule is not None:
        val, train, name = datamodule_images(datamodule)
        if tuple(val.shape[1:]) != tuple(image_shape):
            raise ConfigError(
                f"{key}: the data in {config} serves {tuple(val.shape[1:])} images but the model makes {tuple(image_shape)}"
            )
        return val, train, name, dataset_labels(datamodule.val_set)
    if tuple(image_shape) == (1, 8, 8):
        val, val_labels = digits_split("val")
        return val, digits_split("train")[0], "digits-8px-1ch", val_labels.long()
    raise ConfigError(
        f"{key}: no {config} to tell which data {ckpt} was trained on (the FID reference); "
        "pass a checkpoint inside its run dir (<run dir>/checkpoints/*.ckpt)"
    )


DATAMODULE_TARGET = f"{ImageDataModule.__module__}.{ImageDataModule.__qualname__}"
PLAIN = (str, int, float, bool, type(None))  # the values a datamodule parameter takes; no nested nodes


def run_dir_datamodule(config: Path) -> ImageDataModule | None:
    """The ImageDataModule that a run's composed config (`config`, a <run dir>/.hydra/config.yaml) describes under
    `data`, or None when it has no `data` node.

    A file handed in is read as data, never executed (docs/reliability.md): nothing is instantiated from it. Its
    `data._target_` must name ImageDataModule, its other keys must be that class's parameters with plain values
    (interpolations resolved), and the class is called with them. Anything else is a ConfigError naming the file
    and the key.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    never = "a run dir's config is read as data, never executed"
    try:
        cfg = OmegaConf.load(config)
    except Exception as e:  # yaml's ScannerError/ParserError, OmegaConf's own errors, a file that is not UTF-8
        raise ConfigError(f"{config}: not a readable YAML config ({type(e).__name__}: {first_line(e)})") from e
    try:
        data = cfg.get("data") if isinstance(cfg, DictConfig) else None
    except OmegaConfBaseException as e:  # `data: ${...}` that does not resolve
        raise ConfigError(f"{config}: data does not resolve ({first_line(e)}); {never}") from e
    if data is None:
        return None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{config}: data={data!r} is not a mapping of {DATAMODULE_TARGET} parameters; {never}")

    def value(name: str) -> Any:  # resolved, and plain
        try:
            found = data[name]
        except OmegaConfBaseException as e:  # an interpolation that names a missing key or an unknown resolver
            raw = OmegaConf.to_container(data, resolve=False)[name]
            raise ConfigError(f"{config}: data.{name}={raw} does not resolve ({first_line(e)}); {never}") from e
        if not isinstance(found, PLAIN):
            shown = OmegaConf.to_container(found, resolve=False) if OmegaConf.is_config(found) else found
            raise ConfigError(f"{config}: data.{name}={shown!r} is not a plain value (a string, number, boolean or null); {never}")
        return found

    target = value("_target_") if "_target_" in data else None
    if target != DATAMODULE_TARGET:
        raise ConfigError(f"{config}: data._target_={target!r} is not {DATAMODULE_TARGET}; {never}")
    parameters = list(inspect.signature(ImageDataModule).parameters)
    unknown = [name for name in data if name != "_target_" and name not in parameters]
    if unknown:
        raise ConfigError(f"{config}: data.{unknown[0]} is not a parameter of {DATAMODULE_TARGET} "
                          f"(accepted: {', '.join(parameters)}); {never}")  # fmt: skip
    values = {name: value(name) for name in data if name != "_target_"}
    return ImageDataModule(**values)


def _extractor_options(extractor: str, inception_weights: str | None, key_prefix: str) -> dict[str, Any]:
    if extractor == "inception":
        return {"weights": inception_weights, "config_key": f"{key_prefix}inception_weights"}
    return {}


def check_extractor(extractor: str = "digits", inception_weights: str | None = None, key_prefix: str = "") -> None:
    """Build the feature extractor once and drop it: a ConfigError now if it cannot run (before any run dir fills up)."""
    try:
        build_extractor(extractor, **_extractor_options(extractor, inception_weights, key_prefix))
    except MetricsSetupError as e:
        raise ConfigError(f"{key_prefix}extractor={extractor}: {e}") from e


def build_evaluator(
    real: Tensor,
    floor_real: Tensor | None,
    metrics: Iterable[str],
    extractor: str = "digits",
    inception_weights: str | None = None,
    dataset: str = "digits",
    device: torch.device | str = "cpu",
    key_prefix: str = "",
    **options: Any,
) -> SampleEvaluator | None:
    """A SampleEvaluator for the sample metrics among `metrics` (None when there are none).

    Fails at once (ConfigError naming `<key_prefix>extractor` / `<key_prefix>inception_weights`) when the
    extractor cannot run, e.g. inception without torch-fidelity or its weights file.
    """
    sample_metrics = [m for m in metrics if m in SAMPLE_METRICS]
    if not sample_metrics:
        return None
    extractor_options = _extractor_options(extractor, inception_weights, key_prefix)
    try:
        return SampleEvaluator(
            real, floor_real, metrics=sample_metrics, extractor=extractor, extractor_options=extractor_options,
            dataset=dataset, device=device, **options,
        )  # fmt: skip
    except MetricsSetupError as e:
        raise ConfigError(f"{key_prefix}extractor={extractor}: {e}") from e
