"""Checkpoint files that survive crashes: atomic writes, and resuming from the newest readable checkpoint.

Lightning writes checkpoints through a CheckpointIO plugin (`Trainer(plugins=[...])`). Its default,
`TorchCheckpointIO`, goes through an fsspec transaction: a temporary file in the system temp folder, then
`shutil.move`, which is a copy into the final path (not atomic) when that folder lies on another file
system, and nothing is fsynced. `AtomicCheckpointIO` writes next to the target and renames instead, so a
crash (kill -9, power loss, a full disk) leaves either the old file or the new one, never half of one.

`resume_checkpoint` picks what `resume=true` continues from: the `*.ckpt` in a run dir's checkpoints/ with the
highest global step among those that load, with a warning for each one that does not (truncated, corrupt, not a
checkpoint).
"""
from __future__ import annotations

import logging
import os
import inspect
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from ddpm.atomic import write_atomic
from ddpm.config import LAST, unreadable_checkpoint
from ddpm.errors import ConfigError, first_line
from ddpm.module import PROCESS_OPTIONS, DiffusionModule

log = logging.getLogger(__name__)

# Keys every Lightning training checkpoint has; `loops` is what lets fit() continue from it.
REQUIRED_KEYS = ("state_dict", "global_step", "loops")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes each checkpoint whole or not at all (ddpm.atomic.write_atomic: `.<name>.partial`
    beside it, fsynced, renamed over `<name>`), and reads every checkpoint with `weights_only=True`.

    A partial file left behind by a killed process is overwritten by the next save of that checkpoint; it does not end
    in `.ckpt`, so neither Lightning nor `resume_checkpoint` takes it for a checkpoint. Remote paths (s3://, gs://, ...)
    keep Lightning's own upload.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomic(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, always with `weights_only=True`: a checkpoint handed in is read as data, never executed
        (docs/reliability.md), whatever a caller asks; torch refuses any pickled global that is not plain data."""
        if map_location is None:
            return super().load_checkpoint(path, weights_only=True)
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def load_error(e: BaseException) -> str:
    """Why torch.load failed, in one line. torch's weights_only refusal opens by suggesting weights_only=False, which
    would run the file's code; the line that names what was refused (e.g. `GLOBAL posix.system`) is kept instead."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        detail = next((line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))), "")
        return f"pickled objects other than weights, never loaded: {detail}".rstrip(": ")
    return f"{type(e).__name__}: {first_line(e)}"


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """None when `path` loads as a Lightning training checkpoint, else a short reason why not.

    First the file's header (ddpm.config.unreadable_checkpoint: truncated, not a PyTorch file), then a load with the
    tensors memory-mapped, not read, so this costs little even for large checkpoints.
    """
    header_problem = unreadable_checkpoint(Path(path))  # a cheap look at the first bytes names truncation best
    if header_problem is not None:
        return header_problem
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors, ... for a damaged file
        return load_error(e)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        return f"not a training checkpoint (expected the keys {', '.join(REQUIRED_KEYS)})"
    return None


def newest_valid_checkpoint(ckpt_dir: Path) -> Path | None:
    """The readable `*.ckpt` in `ckpt_dir` furthest into training: the highest global step read from each file, a tie
    going to last.ckpt, then to the newer file; a warning names each unreadable one skipped.

    Not the newest by modification time, as Lightning's `ckpt_path="last"`: a copy that does not keep times can make
    an older step look newest, and a run resumed from it would overwrite last.ckpt with less training. The choice
    depends only on the files, so every rank that makes it (torchrun, SLURM) makes the same one.
    """
    ranked = []
    for path in sorted(ckpt_dir.glob("*.ckpt")):
        problem = checkpoint_problem(path)
        step = checkpoint_step(path) if problem is None else None
        if step is None:
            log.warning(f"skipping unreadable checkpoint {path} ({problem or 'its global_step is not an integer'})")
            continue
        ranked.append(((step, path.name == LAST.name, path.stat().st_mtime_ns), path))
    return max(ranked)[1] if ranked else None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The `global_step` of a checkpoint that `checkpoint_problem` accepts (tensors memory-mapped, not read); None
    when it is not an integer."""
    step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def resume_checkpoint(source: str | os.PathLike, key: str, hint: str = "") -> Path:
    """The checkpoint to continue from: `source` itself when it is a file, else the readable one furthest into
    training in `<source>/checkpoints/` (newest_valid_checkpoint). ConfigError naming `key` (and adding `hint`) when
    there is none."""
    source = Path(source)
    if source.is_file():
        problem = checkpoint_problem(source)
        if problem is not None:
            raise ConfigError(f"{key}={source}: not a readable checkpoint ({problem})")
        return source
    if not source.is_dir():
        raise ConfigError(f"{key}={source}: no such file or run dir")
    ckpt_dir = source / LAST.parent
    path = newest_valid_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    if path is None:
        raise ConfigError(f"{key}: no readable checkpoint in {ckpt_dir}{hint}")
    return path


class LoadedCheckpoint(NamedTuple):
    """What `load_module` returns: the module (eval mode), whether it holds EMA weights, the training step."""

    module: DiffusionModule
    ema: bool
    global_step: int


def load_module(path: str | Path, use_ema: bool = True, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild a DiffusionModule from a checkpoint file alone, with its EMA weights or (use_ema=False) the live ones;
    or from a diffusers model folder (ddpm.diffusers_io: its one set of weights, step 0).

    With EMA (`WeightAveraging`), the checkpoint's `state_dict` holds the EMA weights and
    `current_model_state` the live ones. A checkpoint without EMA has only the live weights; then
    `use_ema=True` falls back to them (the second value says so).
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        from ddpm.diffusers_io import read_folder

        return LoadedCheckpoint(read_folder(path).to(map_location), False, 0)
    if not path.is_file():
        raise ConfigError(f"ckpt={path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects that weights_only refuses
        reason = unreadable_checkpoint(path) or load_error(e)
        raise ConfigError(f"ckpt={path}: not a readable checkpoint ({reason})") from e
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt={path}: not a DiffusionModule checkpoint (no hyper_parameters/state_dict)")
    hparams = ckpt["hyper_parameters"]
    try:
        module = DiffusionModule(**hparams)
    except (TypeError, ValueError, ConfigError) as e:  # an argument this version lacks or needs, or a value it refuses
        params = inspect.signature(DiffusionModule).parameters
        unknown = sorted(set(hparams) - set(params) - set(PROCESS_OPTIONS)) if isinstance(hparams, dict) else []
        needed = sorted(n for n, p in params.items() if p.default is p.empty and p.kind is not p.VAR_KEYWORD and n not in (hparams if isinstance(hparams, dict) else {}))
        detail = f"unknown hyperparameter(s) {', '.join(unknown)}" if unknown else f"missing {', '.join(needed)}" if needed else first_line(e)
        raise ConfigError(f"ckpt={path}: made by an incompatible version of ddpm ({detail}); sample it with that version") from e
    has_ema = "current_model_state" in ckpt
    state = ckpt["state_dict"] if use_ema or not has_ema else ckpt["current_model_state"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"ckpt={path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    module.to(map_location).eval()
    return LoadedCheckpoint(module, use_ema and has_ema, int(ckpt.get("global_step", 0)))


PROCESS_KEYS = {"schedule": "schedule", "timesteps": "schedule.timesteps", "objective": "module.objective", "variance": "module.variance"}
UNET_KEYS = {"image_size": "data.resolution", "in_channels": "data.channels"}  # the others are model.<name>


def init_weights(module: DiffusionModule, source: str | os.PathLike, key: str = "init_weights") -> None:
    """Load into `module` (built from the run's config) the UNet weights of `source`: a checkpoint, a run dir or a
    diffusers folder, its EMA weights where it has them. Its network and process must be the configured ones, else
    ConfigError listing the overrides that make them so (a new run, step 0: the optimizer starts afresh)."""
    from ddpm.config import resolve_ckpt
    from ddpm.unet import unet_arguments

    loaded = load_module(resolve_ckpt(source, key=key), use_ema=True).module
    theirs = unet_arguments(loaded.hparams["unet"]) | {"out_channels": loaded.unet.out_channels}  # null: what was derived
    ours = unet_arguments(module.hparams["unet"]) | {"out_channels": module.unet.out_channels}
    differ = [f"{UNET_KEYS.get(k, f'model.{k}')}={_plain(theirs[k])}" for k in theirs
              if k != "use_checkpoint" and _plain(theirs[k]) != _plain(ours[k])]  # fmt: skip
    differ += [f"{name}={loaded.hparams[k]}" for k, name in PROCESS_KEYS.items() if loaded.hparams[k] != module.hparams[k]]
    if differ:
        raise ConfigError(f"{key}={source}: its model is not the configured one; add {' '.join(differ)}")
    module.unet.load_state_dict(loaded.unet.state_dict())


def _plain(value: Any) -> Any:
    """A config value comparable with its Python twin: lists for tuples and ListConfigs."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig" else value
