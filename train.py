"""Train a DDPM: Hydra composes conf/train.yaml, Lightning fits a DiffusionModule on an ImageDataModule.

    python train.py                                         # digits on the CPU, a few minutes
    python train.py schedule=cosine model=small             # swap config groups (conf/<group>/<option>.yaml)
    python train.py -m schedule=linear,cosine seed=0,1,2    # a sweep: one run dir per job
    python train.py name=demo resume=true                   # continue outputs/runs/demo from its latest checkpoint
    python train.py name=demo overwrite=true                # start afresh: the earlier run is moved to outputs/runs/demo.<time>

Each run dir (outputs/runs/<date>/<time>, or outputs/runs/<name>) holds .hydra/ (the composed config),
checkpoints/ (last.ckpt), samples/ (grid PNGs) and the logger's files.

Exit status: 0 done; 2 a bad config or data, a run dir another process is using, or one that holds a run without
resume=true or overwrite=true (one `error:` line); 3 a non-finite loss stopped training (one `error:` line, last.ckpt
keeps the last good state); 128 + the signal number when SIGTERM (143) or Ctrl-C (130) stopped it after saving
last.ckpt (one line naming it). docs/reliability.md.
"""
from __future__ import annotations

import os
import signal
import sys

# Threads that wait by sleeping, not spinning: on a shared CPU, torch's default spin-waiting OpenMP threads
# hold cores another process needs, and small-batch CPU training slows by an order of magnitude (docs/benchmarks.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ddpm import runlock
from ddpm.config import check_train_run, clean_errors, job_number, print_config_tree, run_cli
from ddpm.errors import ConfigError

EXIT_NONFINITE = 3
RESUME_FROM = "DDPM_RESUME_FROM"  # rank 0's resume checkpoint ("" for none), read by the ranks plain ddp re-launches


def train(cfg: DictConfig) -> float | None:
    """Instantiate data, module, callbacks, logger and trainer from `cfg`, fit, and return the last value of
    `cfg.optimized_metric` (val/loss by default), what a sweeper such as Optuna minimises."""
    import lightning.pytorch as pl
    import torch

    from ddpm import hardware

    if job_number() is not None:  # a single run was checked by the Validate callback before its dir existed
        check_train_run(cfg)
    if cfg.get("print_config") and runlock.is_global_rank_zero():
        print_config_tree(cfg)
    run_dir = Path(cfg.paths.run_dir)
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    os.environ.setdefault("WANDB_SILENT", "true")
    # plain ddp re-launches this script per rank, re-running a sweep, unless SLURM started the ranks (submitit_slurm)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and cfg.trainer.strategy == "ddp":
        if "SlurmLauncher" not in str(HydraConfig.get().launcher.get("_target_")):
            raise ConfigError("hardware.strategy=ddp in a -m sweep re-runs the sweep per rank; use hardware.strategy=ddp_spawn, "
                              "one device, or hydra/launcher=submitit_slurm with hydra.launcher.tasks_per_node=<devices>")  # fmt: skip
    from ddpm.callbacks import CompileTime, NonFiniteError
    from ddpm.checkpoints import AtomicCheckpointIO, resume_checkpoint
    from ddpm.loggers import build_loggers
    from ddpm.sample_callbacks import SampleGrid, check_monitored_checkpoints
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    # Rank 0 chooses the checkpoint; the ranks that plain ddp starts as copies of this script (at fit, inheriting this
    # environment) take its choice. Ranks that torchrun or SLURM start alone choose for themselves, and choose alike:
    # the choice depends only on the files (ddpm.checkpoints.newest_valid_checkpoint).
    ckpt_path = None
    if not runlock.is_global_rank_zero() and RESUME_FROM in os.environ:
        ckpt_path = os.environ[RESUME_FROM] or None
    elif cfg.ckpt_path:
        ckpt_path = resume_checkpoint(cfg.ckpt_path, key="ckpt_path")
    elif cfg.resume:
        hint = "; name the run with name=<name> or hydra.run.dir=<run dir>"
        ckpt_path = resume_checkpoint(run_dir, key="resume=true", hint=hint)
    if runlock.is_global_rank_zero():
        os.environ[RESUME_FROM] = str(ckpt_path or "")

    chosen = hardware.settle(cfg)  # threads, precision and layout for this machine
    if chosen.threads is not None:
        torch.set_num_threads(chosen.threads)
    if runlock.is_global_rank_zero():
        print(chosen.line)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module)
    if cfg.get("init_weights"):
        from ddpm.checkpoints import init_weights

        init_weights(module, cfg.init_weights)
    datamodule.setup("fit")  # fail on missing data before the trainer starts
    if module.hparams.eval_every_n_steps and any(m != "bpd" for m in module.hparams.eval_metrics):
        from ddpm.evaluation import check_extractor

        # the evaluator itself is built at fit start (rank 0); a missing extractor fails here, before the loggers write
        check_extractor(module.hparams.eval_extractor, module.hparams.eval_inception_weights, key_prefix="module.eval_")
    named = {name: hydra.utils.instantiate(c) for name, c in cfg.callbacks.items() if c is not None}
    check_monitored_checkpoints(named)  # a checkpoint ranked by val/fid needs evaluation on its save steps
    callbacks = list(named.values())
    if cfg.compile:
        module.compile_unet(**OmegaConf.to_container(cfg.compile_options))
        callbacks.append(CompileTime())
    loggers = build_loggers(cfg)
    if not loggers:  # logger=none: nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    strategy = cfg.trainer.strategy  # a name ("fsdp") or a node (_target_: ...FSDPStrategy), as conf/hardware/fsdp.yaml
    fsdp = "fsdp" in (strategy if isinstance(strategy, str) else str(strategy.get("_target_", ""))).lower()
    if fsdp and any(isinstance(c, pl.callbacks.WeightAveraging) for c in callbacks):
        raise ConfigError("hardware=fsdp shards the weights, which the EMA callback (Lightning's WeightAveraging) cannot average; "
                          "add ~callbacks.ema to train without EMA, or use hardware=ddp")  # fmt: skip
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]  # write-then-rename
    )
    # the module and data log their own hparams; add the rest of the run's choices
    resolved = OmegaConf.to_container(cfg, resolve=True)
    choices = {key: resolved[key] for key in ("seed", "name", "hardware", "trainer", "callbacks")}
    for logger in loggers:
        logger.log_hyperparams(choices)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # read as data, never executed
    except SIGTERMException:  # SIGTERM or Ctrl-C: ddpm.callbacks.Checkpoint saved at the end of the step
        stopped = trainer.checkpoint_callback
        signum = getattr(stopped, "stop_signal", None) or signal.SIGTERM
        saved = getattr(stopped, "stop_checkpoint", None)
        if trainer.is_global_zero:
            where = f"state in {saved}; continue with resume=true" if saved else "no checkpoint written"
            print(f"stopped by {signum.name} at step {trainer.global_step}: {where}", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    except NonFiniteError as e:
        last = getattr(trainer.checkpoint_callback, "last_model_path", "")
        if trainer.is_global_zero:
            kept = f"the last good state is in {last}" if last else "no checkpoint was written"
            print(f"error: {e}; training stopped, {kept}", file=sys.stderr)
        raise SystemExit(EXIT_NONFINITE) from None
    finally:
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
                import wandb

                wandb.finish()  # one W&B run per job, also in a -m sweep
    if trainer.is_global_zero:
        print(f"run dir: {run_dir}")
        grid = next((c.last_path for c in callbacks if isinstance(c, SampleGrid) and c.last_path is not None), None)
        if grid is not None:
            print(f"last sample grid: {grid}")
    value = trainer.callback_metrics.get(cfg.get("optimized_metric") or "val/loss")  # checked to be one the run logs
    return None if value is None else float(value)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with clean_errors(run_dir=HydraConfig.get().runtime.output_dir, job=job_number()):
        return train(cfg)


if __name__ == "__main__":
    run_cli(main)
