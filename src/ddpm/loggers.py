"""The run's logger from `cfg.logger`, and for W&B the run's identity: its sweep as the group, and a run id kept in
the run dir, so `resume=true` continues the same W&B run instead of starting another."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ddpm.runlock import is_global_rank_zero

WANDB_RUN_ID = Path("wandb") / "run_id"  # in the run dir


def sweep_group() -> str | None:
    """In a `-m` sweep, its dir below outputs/multirun (e.g. 2026-12-02/10-00-00, or the sweep's name); else None."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep = Path(HydraConfig.get().sweep.dir)
    rel = os.path.relpath(sweep, "outputs/multirun")
    return sweep.name if rel.startswith("..") else Path(rel).as_posix()


def wandb_identity(run_dir: Path, resume: bool, group: str | None, name: str | None) -> dict[str, Any]:
    """WandbLogger's `id` (read from the run dir when resuming, else new and written there), `resume="allow"`,
    and `group`: as configured, else the sweep, else the run's name."""
    path = run_dir / WANDB_RUN_ID
    if resume and path.is_file():
        run_id = path.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids are short lowercase strings
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return {"id": run_id, "resume": "allow", "group": group or sweep_group() or name}


def build_loggers(cfg: DictConfig) -> list[Any]:
    """[the logger of `cfg.logger`], or [] for logger=none. Only global rank 0 keeps the W&B run id (Lightning's
    WandbLogger makes the run there; another rank's id would overwrite the file)."""
    if not cfg.get("logger") or not cfg.logger.get("_target_"):
        return []
    extra: dict[str, Any] = {}
    if cfg.logger._target_.endswith("WandbLogger") and is_global_rank_zero():
        extra = wandb_identity(Path(cfg.paths.run_dir), bool(cfg.resume), cfg.logger.get("group"), cfg.get("name"))
    return [hydra.utils.instantiate(cfg.logger, **extra)]
