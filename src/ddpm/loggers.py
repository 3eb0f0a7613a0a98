"""The run's logger from `cfg.logger`, and for W&B the run's identity: its sweep (or the run itself) as the group,
and a run id kept in the run dir, so `resume=true` continues the same W&B run instead of starting another; for CSV,
a metrics.csv that a resumed run appends to; and sample.py's W&B run, of job_type sample or eval, in the group of
the run that trained its checkpoint."""
from __future__ import annotations

import csv
import io
import os
import secrets
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig

from ddpm.atomic import write_atomic
from ddpm.runlock import is_global_rank_zero

WANDB_RUN_ID = Path("wandb") / "run_id"  # in the run dir
WANDB_GROUP = Path("wandb") / "group"  # in the run dir: the group sample.py's runs of its checkpoints join


def run_group(run_dir: Path, below: str) -> str:
    """A dir's path below `below` (outputs/runs/2026-12-02/10-00-00 -> 2026-12-02/10-00-00), or its name when
    it lies elsewhere."""
    rel = os.path.relpath(Path(run_dir).resolve(), Path(below).resolve())
    return Path(run_dir).resolve().name if rel.startswith("..") else Path(rel).as_posix()


def sweep_group() -> str | None:
    """In a `-m` sweep, its dir below outputs/multirun (e.g. 2026-12-02/10-00-00, or the sweep's name); else None."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return run_group(Path(HydraConfig.get().sweep.dir), "outputs/multirun")


def wandb_identity(run_dir: Path, resume: bool, group: str | None, name: str | None) -> dict[str, Any]:
    """WandbLogger's `id` (read from the run dir when resuming, else new and written there), `resume="allow"`,
    and `group` (written there too): as configured, else the sweep, else the run's name, else its dir below
    outputs/runs."""
    path = run_dir / WANDB_RUN_ID
    if resume and path.is_file():
        run_id = path.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids are short lowercase strings
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    group = group or sweep_group() or name or run_group(run_dir, "outputs/runs")
    (run_dir / WANDB_GROUP).write_text(group + "\n")
    return {"id": run_id, "resume": "allow", "group": group}


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a metrics.csv already in its folder is continued: Lightning's deletes it
    when the writer is made (with a warning), so `resume=true` kept only the second leg's rows. Its header becomes
    the known keys; a new key rewrites the file under the wider header, every earlier row kept, whole or not at all
    (ddpm.atomic), where Lightning rewrites it in place."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])  # sorted, as Lightning writes it and appends in that order

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.metrics_file_path, lambda f: f.write(text.getvalue().encode()))


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger whose metrics.csv a resumed run appends to (_AppendingWriter); build_loggers uses it
    wherever `cfg.logger` names Lightning's. A new run never meets an earlier metrics.csv: train.py refuses a run
    dir that holds a run (ddpm.config.keep_earlier_run)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def build_loggers(cfg: DictConfig) -> list[Any]:
    """[the logger of `cfg.logger`], or [] for logger=none. Only global rank 0 keeps the W&B run id (Lightning's
    WandbLogger makes the run there; another rank's id would overwrite the file). Lightning's CSVLogger is built
    as AppendingCSVLogger, so a resumed run keeps the rows of the earlier ones."""
    if not cfg.get("logger") or not cfg.logger.get("_target_"):
        return []
    extra: dict[str, Any] = {}
    if cfg.logger._target_.endswith("WandbLogger") and is_global_rank_zero():
        extra = wandb_identity(Path(cfg.paths.run_dir), bool(cfg.resume), cfg.logger.get("group"), cfg.get("name"))
    if hydra.utils.get_class(cfg.logger._target_) is CSVLogger:
        extra["_target_"] = f"{AppendingCSVLogger.__module__}.{AppendingCSVLogger.__name__}"
    return [hydra.utils.instantiate(cfg.logger, **extra)]


def training_logger(run_dir: Path) -> dict[str, Any]:
    """What the run in `run_dir` logged to W&B: project, offline, group, run id, name and tags, from its composed
    config (<run dir>/.hydra/config.yaml) and its wandb/ files; W&B's defaults (project ddpm, offline, the run dir
    as the group) where the run kept none, e.g. a run trained with logger=csv."""
    from omegaconf import OmegaConf

    config = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(config) if config.is_file() else OmegaConf.create({})

    def value(key: str, default: Any) -> Any:  # interpolations that need Hydra's runtime resolve to the default
        found = OmegaConf.select(cfg, key, default=default, throw_on_resolution_failure=False)
        return default if found is None else found

    def read(path: Path) -> str | None:
        return (run_dir / path).read_text().strip() if (run_dir / path).is_file() else None

    wandb = str(value("logger._target_", "")).endswith("WandbLogger")
    return {
        "project": value("logger.project", "ddpm") if wandb else "ddpm",
        "offline": bool(value("logger.offline", True)) if wandb else True,
        "group": read(WANDB_GROUP) or value("name", None) or run_group(run_dir, "outputs/runs"),
        "id": read(WANDB_RUN_ID),
        "name": value("name", None),
        "tags": list(value("tags", [])),
    }


def sample_wandb_run(ckpt: Path, out_dir: Path, job_type: str, config: dict[str, Any]) -> Any:
    """A W&B run for sample.py's grid and scores beside the run that trained `ckpt` (<run dir>/checkpoints/*.ckpt):
    the same project, group, tags and mode (offline unless that run logged online; then WANDB_MODE decides),
    `job_type` sample or eval, the training run's id and dir in its config; its files go to `out_dir`/wandb.
    A run of its own rather than the training run resumed: that run may still be training, and two processes
    cannot write one W&B run."""
    import wandb

    run_dir = Path(ckpt).resolve().parent.parent
    train = training_logger(run_dir)
    (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=train["project"], group=train["group"], job_type=job_type, tags=train["tags"] or None,
        name=f"{train['name'] or train['group']}-{job_type}", dir=str(out_dir), mode="offline" if train["offline"] else None,
        config={**config, "train_run_id": train["id"], "train_run_dir": str(run_dir)},
    )  # fmt: skip
