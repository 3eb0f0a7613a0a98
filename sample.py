"""Sample from a trained DDPM: the checkpoint alone rebuilds the model; writes samples.npz and grid.png.

    python sample.py ckpt=outputs/runs/demo                          # a run dir: its checkpoints/last.ckpt
    python sample.py ckpt=path/to/step_003000.ckpt sampler=ddpm steps=null n=16
    python sample.py ckpt=outputs/runs/demo n=1000 batch_size=250 seed=1 out_dir=outputs/fid_samples

    python sample.py ckpt=outputs/runs/demo n=500 metrics=[fid,kid,bpd]   # + metrics.json and a table

    python sample.py ckpt=outputs/runs/cond class_label=3 guidance_scale=3   # class-conditional: only 3s

    python sample.py ckpt=outputs/runs/demo metrics=[fid] wandb=true       # + a W&B run in the training run's group
    python sample.py ckpt=outputs/runs/demo samples=old/samples.npz metrics=[fid,precision,recall]   # score a file

    python sample.py ckpt=outputs/runs/demo init=my_digits/ strength=0.5    # edit images (docs/editing.md): SDEdit,
    python sample.py ckpt=outputs/runs/demo init=samples.npz mask=right     # inpainting,
    python sample.py ckpt=outputs/runs/demo interpolate=8 n=4 sampler=ddim  # interpolation

Options: conf/sample.yaml (sampler, steps, spacing, eta, class_label, guidance_scale, n, batch_size, seed, use_ema, device, out_dir,
overwrite, metrics, metrics_bpd_timesteps, extractor, inception_weights, samples, init, strength, mask, resample, interpolate, wandb).
"""
from __future__ import annotations

import os

# Threads that wait by sleeping, not spinning: on a shared CPU, torch's default spin-waiting OpenMP threads
# hold cores another process needs, and small-batch CPU training slows by an order of magnitude (docs/benchmarks.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ddpm.config import check_sample_run, clean_errors, job_number, resolve_ckpt, run_cli
from ddpm.atomic import write_text_atomic
from ddpm.drawing import GRID_FILE, GRID_MAX, METRICS_FILE, describe, draw, edit_plan, join_ranks, on_rank_zero, read_samples, write_samples
from ddpm.errors import ConfigError
from ddpm.schema import check, check_metric_samples, is_int


def sample(cfg: DictConfig) -> Path:
    """Load the checkpoint named by cfg.ckpt, draw cfg.n samples in batches, write samples.npz and grid.png;
    with cfg.metrics, score them (metrics.json and a table); with cfg.wandb, log the grid and scores to W&B."""
    from ddpm.checkpoints import load_module
    from ddpm.evaluation import build_evaluator, run_dir_images, validate_metrics
    from ddpm.images import save_grid
    from ddpm.samplers import DEFAULT_SPACING, network_evaluations

    check_sample_run(cfg)  # also run by the Validate callback before Hydra makes out_dir; here for callers of sample()
    metrics = cfg.get("metrics") or []
    metrics = validate_metrics(list(metrics), key="metrics")
    extractor = cfg.get("extractor", "digits")
    bpd_t = cfg.get("metrics_bpd_timesteps")
    rank, world = join_ranks(cfg)
    device = cfg.device
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"device={cfg.device!r} is not available here ({str(e).splitlines()[0]}); use cpu or auto") from e

    path = resolve_ckpt(cfg.ckpt, key="ckpt")
    module, ema, step = load_module(path, use_ema=cfg.use_ema, map_location=device)
    T = module.diffusion.num_timesteps
    class_label = cfg.get("class_label")
    if class_label is not None and not module.conditional:
        raise ConfigError(f"class_label={class_label!r} is invalid: the checkpoint's model is unconditional (train with model.num_classes=K)")
    label_cycle = None
    if module.conditional:
        K = module.unet.num_classes
        wanted = list(range(K)) if class_label is None else [class_label] if is_int(class_label) else list(class_label)
        check("class_label", class_label, len(wanted) > 0 and all(is_int(k) and 0 <= k < K for k in wanted), f"null (all classes in turn), an integer in [0, {K - 1}] or a list of them")
        label_cycle = torch.tensor(wanted, device=device)
    check("steps", cfg.steps, cfg.steps is None or (is_int(cfg.steps) and 1 <= cfg.steps <= T), f"null or an integer in [1, {T}] (the checkpoint's T)")
    check("metrics_bpd_timesteps", bpd_t, bpd_t is None or (is_int(bpd_t) and 1 <= bpd_t <= T), f"null (all T) or an integer in [1, {T}]")
    scored = None
    if cfg.get("samples"):  # score an existing file: nothing is drawn
        if not metrics:
            raise ConfigError(f"samples={cfg.samples} scores an existing samples file: name the scores, e.g. metrics=[fid,kid,precision,recall]")
        scored = read_samples(cfg.samples, module.image_shape)
        check_metric_samples(metrics, len(scored), f"samples={cfg.samples}")
    plan = edit_plan(cfg, module, label_cycle, device) if scored is None else None
    if cfg.get("init"):  # n follows the images
        check_metric_samples(metrics, plan.n, f"init={cfg.init}")

    def reference():  # the reference data and the extractor, before sampling: a missing weights file fails now
        val_images, train_images, dataset, val_labels = run_dir_images(path, module.image_shape, key="metrics")
        evaluator = build_evaluator(
            val_images, train_images, metrics, extractor=extractor, inception_weights=cfg.get("inception_weights"),
            dataset=dataset, device=device, batch_size=cfg.batch_size,
        )  # fmt: skip
        return evaluator, val_images, val_labels

    evaluator, val_images, val_labels = None, None, None
    if metrics:  # rank 0 builds them; under torchrun every rank learns at once whether that failed (none draws, then waits)
        evaluator, val_images, val_labels = on_rank_zero(reference, rank, world) or (None, None, None)
    if cfg.use_ema and not ema and rank == 0:
        print("note: the checkpoint has no EMA weights; sampling the live weights")
    spacing = plan.spacing if plan is not None else cfg.spacing
    strength = plan.strength if plan is not None else 1.0  # SDEdit runs only the timesteps below strength T
    timesteps = module.diffusion.sampling_timesteps(cfg.sampler, cfg.steps, spacing, strength)
    evaluations = network_evaluations(cfg.sampler, len(timesteps)) if len(timesteps) else 0
    if cfg.get("resample", 1) > 1 and len(timesteps):  # RePaint repeats every ancestral step but the last
        evaluations = (len(timesteps) - 1) * cfg.resample + 1
    spacing = spacing or DEFAULT_SPACING[cfg.sampler]
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if scored is not None:
        x = scored
        grid = save_grid(x[:GRID_MAX], out_dir / GRID_FILE)
        print(f"checkpoint: {path} (step {step}), for the reference data and bits/dim; samples: {cfg.samples} {tuple(x.shape)}")
    else:
        if rank == 0:
            visited = f"timesteps {int(timesteps[0])}..{int(timesteps[-1])}" if len(timesteps) else "no timesteps"
            print(f"checkpoint: {path} ({'EMA' if ema else 'live'} weights, step {step}), {cfg.sampler} {len(timesteps)} steps "
                  f"({spacing} spacing, {visited}): {evaluations} network evaluations per sample")
            if plan.x_init is not None or plan.frames:
                print(describe(cfg, plan))
        x, labels = draw(cfg, module, plan, device, rank, world)
        if rank > 0:  # rank 0 writes and scores what every rank drew
            return out_dir
        grid = write_samples(x, labels, out_dir, nrow=plan.frames)
    results = None
    if metrics:
        bpd_labels = val_labels if module.conditional else None  # a conditional model is scored on the images' own labels
        results = write_metrics(cfg, module, path, x, metrics, evaluator, (val_images, bpd_labels), bpd_t, extractor, out_dir, device, evaluations, spacing)
    if cfg.get("wandb"):
        log_wandb(cfg, path, step, out_dir, grid, results)
    return out_dir


def log_wandb(cfg: DictConfig, ckpt: Path, step: int, out_dir: Path, grid: Path, results: dict | None) -> None:
    """A W&B run (ddpm.loggers.sample_wandb_run) with the grid as `samples` and each numeric score as `sample/<name>`,
    in its history and summary; the checkpoint's training step as `trainer/global_step`."""
    import wandb
    from omegaconf import OmegaConf

    from ddpm.loggers import sample_wandb_run

    config = OmegaConf.to_container(cfg, resolve=True) | {"step": step}
    run = sample_wandb_run(ckpt, out_dir, "eval" if results else "sample", config)
    scores = {f"sample/{k}": v for k, v in (results or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    caption = f"{cfg.samples} (scored)" if cfg.get("samples") else f"step {step}, {cfg.sampler} {cfg.steps or 'all'} steps"
    run.log({"samples": wandb.Image(str(grid), caption=caption), "trainer/global_step": step, **scores})
    run.finish()
    print(f"W&B: run {run.id} ({run.settings.mode}) in group {run.group}, {out_dir / 'wandb'}")


def write_metrics(cfg, module, ckpt, x, metrics, evaluator, heldout, bpd_t, extractor, out_dir, device, evaluations, spacing) -> dict:
    """Score samples x: the SampleEvaluator's metrics and held-out bits/dim; write metrics.json (with the sampler,
    its steps and spacing, and the network evaluations per sample), print the table; return the results."""
    from ddpm.metrics import heldout_bits_per_dim, print_metrics_table

    results: dict = {}
    if evaluator is not None:
        results.update(evaluator(x))
    if "bpd" in metrics:
        val_images, val_labels = heldout
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        with torch.no_grad():
            results["bpd"] = heldout_bits_per_dim(
                module.diffusion, module.unet, val_images, batch_size=cfg.batch_size, num_timesteps=bpd_t, generator=generator,
                labels=val_labels,
            )  # fmt: skip
        results["bpd_n"] = len(val_images)
        results["bpd_timesteps"] = bpd_t or module.diffusion.num_timesteps
    if cfg.get("samples"):  # a scored file: what drew it is not known here
        results.update(n=len(x), samples=str(cfg.samples), ckpt=str(ckpt))
        title = f"{len(x)} samples of {cfg.samples}"
    else:
        results.update(n=cfg.n, sampler=cfg.sampler, steps=cfg.steps or module.diffusion.num_timesteps, spacing=spacing,
                       network_evaluations=evaluations, ckpt=str(ckpt))  # fmt: skip
        title = f"{cfg.n} samples, {cfg.sampler} {results['steps']} steps, {evaluations} evaluations"
    results.update(extractor=extractor if evaluator is not None else None, metrics=list(metrics))
    out = write_text_atomic(out_dir / METRICS_FILE, json.dumps(results, indent=2) + "\n")
    print_metrics_table(results, title=title)
    print(f"metrics: {out}")
    return results


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    with clean_errors(run_dir=HydraConfig.get().runtime.output_dir, job=job_number()):
        try:
            sample(cfg)
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
