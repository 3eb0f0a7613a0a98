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
metrics, metrics_bpd_timesteps, extractor, inception_weights, samples, init, strength, mask, resample, interpolate, wandb).
"""
from __future__ import annotations

import os

# Threads that wait by sleeping, not spinning: on a shared CPU, torch's default spin-waiting OpenMP threads
# hold cores another process needs, and small-batch CPU training slows by an order of magnitude (docs/benchmarks.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
from pathlib import Path
from typing import NamedTuple

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ddpm.config import check_sample_run, clean_errors, job_number, resolve_ckpt, run_cli
from ddpm.errors import ConfigError, first_line
from ddpm.schema import check, is_int

GRID_MAX = 256  # grid.png shows at most this many samples; samples.npz holds all n
SDEDIT_STRENGTH = 0.8  # init= without mask or strength: noise to t = 0.8 T (diffusers' image-to-image default)
# interpolate= with init=, spacing=null: karras keeps DDIM inversion below sigma 80 (up to about 50 steps), away from
# the cosine schedule's last timesteps, whose jumps in sigma (640 to 20000 at t = 999) amplify the network's error
INVERSION_SPACING = "karras"


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
    plan = edit_plan(cfg, module, label_cycle, device) if scored is None else None
    evaluator, val_images, val_labels = None, None, None
    if metrics and rank == 0:  # the reference data and the extractor, before sampling: a missing weights file fails now
        val_images, train_images, dataset, val_labels = run_dir_images(path, module.image_shape, key="metrics")
        evaluator = build_evaluator(
            val_images, train_images, metrics, extractor=extractor, inception_weights=cfg.get("inception_weights"),
            dataset=dataset, device=device, batch_size=cfg.batch_size,
        )  # fmt: skip
    if cfg.use_ema and not ema and rank == 0:
        print("note: the checkpoint has no EMA weights; sampling the live weights")
    spacing = plan.spacing if plan is not None else cfg.spacing
    timesteps = module.diffusion.sampling_timesteps(cfg.sampler, cfg.steps, spacing)
    if plan is not None and plan.x_init is not None:  # SDEdit runs only the timesteps below strength T
        timesteps = timesteps[timesteps < plan.strength * T]
    evaluations = network_evaluations(cfg.sampler, len(timesteps)) if len(timesteps) else 0
    if cfg.get("resample", 1) > 1 and len(timesteps):  # RePaint repeats every ancestral step but the last
        evaluations = (len(timesteps) - 1) * cfg.resample + 1
    spacing = spacing or DEFAULT_SPACING[cfg.sampler]
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if scored is not None:
        x = scored
        grid = save_grid(x[:GRID_MAX], out_dir / "grid.png")
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


class EditPlan(NamedTuple):
    """What draw() makes: n samples with these starting noises (or None: drawn), images to edit, labels."""

    n: int
    noise: torch.Tensor | None  # (n, C, H, W): x_T of every sample (interpolation), else drawn from the seed
    x_init: torch.Tensor | None  # (n, C, H, W): the images edited (SDEdit, inpainting), else None
    mask: torch.Tensor | None  # (1, 1, H, W): 1 where generated
    strength: float
    labels: torch.Tensor | None  # (n,) for a class-conditional model
    frames: int | None  # interpolation: frames per pair, one grid row each
    spacing: str | None  # of the sampler's timesteps (None: its default)


def edit_plan(cfg: DictConfig, module, label_cycle: torch.Tensor | None, device: torch.device) -> EditPlan:
    """The samples sample.py draws: cfg.n from noise; or one per image of cfg.init (SDEdit with cfg.strength,
    inpainting with cfg.mask); or, with cfg.interpolate = K, K frames for each of cfg.n rows, row i from the x_T of
    plain sample i with cfg.seed to that with cfg.seed + 1, or between the DDIM encodings of each pair of init
    images (images 0 and 1, 2 and 3, ...)."""
    from ddpm.edit_inputs import build_mask, read_init
    from ddpm.samplers import slerp

    x_init = read_init(cfg.init, module.image_shape).to(device) if cfg.get("init") else None
    mask = build_mask(cfg.mask, module.image_shape).to(device) if cfg.get("mask") else None
    strength = cfg.get("strength")
    if strength is None:  # SDEdit's default for init= alone; inpainting and plain sampling start from x_T
        strength = SDEDIT_STRENGTH if x_init is not None and mask is None else 1.0
    K = cfg.get("interpolate")
    pairs = cfg.n if x_init is None else len(x_init)
    if K and x_init is not None:
        check("init", cfg.init, len(x_init) % 2 == 0, f"an even number of images with interpolate= (pairs: 0 and 1, 2 and 3, ...); it holds {len(x_init)}")
        pairs = len(x_init) // 2
    n = pairs * K if K else pairs
    rows = torch.arange(n, device=device) // (K or 1)
    labels = label_cycle[rows % len(label_cycle)] if label_cycle is not None else None
    if not K:
        return EditPlan(n, None, x_init, mask, strength, labels, None, cfg.spacing)
    spacing = cfg.spacing
    if x_init is None:  # row i: from the x_T of sample i of plain sampling with cfg.seed to that of cfg.seed + 1
        ends = torch.stack([initial_noise(seed, pairs, cfg.batch_size, module.image_shape, device) for seed in (cfg.seed, cfg.seed + 1)])
    else:  # each image's x_T by DDIM inversion over the sampler's steps
        spacing = cfg.spacing or INVERSION_SPACING
        pair_labels = None if labels is None else labels[::K].repeat_interleave(2)
        ends = module.diffusion.ddim_invert(
            module.unet, x_init, cfg.steps, spacing, model_kwargs=None if pair_labels is None else {"y": pair_labels},
        ).view(pairs, 2, *module.image_shape).transpose(0, 1)  # fmt: skip
    weights = torch.linspace(0, 1, K, device=device)
    noise = torch.stack([slerp(ends[0], ends[1], float(w)) for w in weights], dim=1).flatten(0, 1)  # (pairs * K, ...)
    return EditPlan(n, noise, None, None, 1.0, labels, K, spacing)


def describe(cfg: DictConfig, plan: EditPlan) -> str:
    """One line on what is edited or interpolated."""
    if plan.frames:
        source = f"the DDIM encodings of {plan.n // plan.frames} pair(s) of {cfg.init}" if cfg.get("init") else f"{plan.n // plan.frames} pair(s) of noises"
        return f"interpolation: {plan.frames} frames between {source}, one grid row per pair"
    what = f"inpainting (mask={cfg.mask}" + (f", resample={cfg.resample}" if cfg.get("resample", 1) > 1 else "") + ")" if plan.mask is not None else "SDEdit"
    return f"{what}: {plan.n} image(s) of {cfg.init}, strength {plan.strength:g} (from t < {plan.strength:g} T)"


def join_ranks(cfg: DictConfig) -> tuple[int, int]:
    """(rank, world size) under torchrun (its RANK and WORLD_SIZE), after joining the process group: nccl on CUDA,
    gloo on the CPU; (0, 1) in a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not cfg.get("out_dir"):
        raise ConfigError(f"out_dir is required on {world} processes (torchrun): every rank must name the folder rank 0 writes")
    if cfg.get("samples"):
        raise ConfigError(f"samples={cfg.samples} scores a file on one process: run it without torchrun")
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk `chunk` (samples chunk * batch_size onwards): from numpy's SeedSequence of (seed, chunk),
    so chunks are independent streams and a chunk draws the same samples whichever process draws it."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def initial_noise(seed: int, n: int, batch_size: int, image_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The x_T (n, C, H, W) that draw() starts n plain samples from: each chunk's first draw from its generator."""
    chunks = range(0, n, batch_size)
    return torch.cat([
        torch.randn(min(batch_size, n - start), *image_shape, device=device,
                    generator=torch.Generator(device=device).manual_seed(chunk_seed(seed, c)))
        for c, start in enumerate(chunks)
    ])  # fmt: skip


def draw(cfg: DictConfig, module, plan: EditPlan, device: torch.device, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """plan.n samples (n, C, H, W) in [-1, 1] on the CPU and their labels (class-conditional models), drawn in chunks
    of cfg.batch_size, each from its own generator (chunk_seed); under torchrun rank r draws chunks r, r + world, ...
    and rank 0 gathers them in order (other ranks get empty results), so the samples do not depend on the world size."""
    from tqdm.auto import tqdm

    def rows(t: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
        return None if t is None else t[start:end]

    options = dict(cfg.sampler_options) | ({"resample": cfg.resample} if cfg.get("resample", 1) > 1 else {})
    chunks = list(range(0, plan.n, cfg.batch_size))
    mine = {}
    for c in tqdm(range(rank, len(chunks), world), desc="batches", disable=len(chunks) <= world):
        start, end = chunks[c], min(chunks[c] + cfg.batch_size, plan.n)
        generator = torch.Generator(device=device).manual_seed(chunk_seed(cfg.seed, c))
        x = module.sample(
            end - start, cfg.sampler, cfg.steps, eta=cfg.eta, labels=rows(plan.labels, start, end), progress=True,
            generator=generator, guidance_scale=cfg.guidance_scale, spacing=plan.spacing, sampler_options=options,
            noise=rows(plan.noise, start, end), x_init=rows(plan.x_init, start, end), strength=plan.strength, mask=plan.mask,
            clip_denoised=not (plan.frames and cfg.get("init")),  # decoding DDIM inversions: as unclipped as they were encoded
        )  # fmt: skip
        mine[c] = x.float().cpu()
    if world > 1:
        import torch.distributed as dist

        gathered: list | None = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank > 0:
            return torch.empty(0), None
        mine = {c: x for part in gathered for c, x in part.items()}
    return torch.cat([mine[c] for c in sorted(mine)]), None if plan.labels is None else plan.labels.cpu()


def write_samples(x: torch.Tensor, labels: torch.Tensor | None, out_dir: Path, nrow: int | None = None) -> Path:
    """samples.npz (`samples` float32 NCHW in [-1, 1] and `labels`; the same images as guided-diffusion's evaluator
    reads them, `arr_0` uint8 NHWC and `arr_1` labels) and grid.png of the first GRID_MAX; returns the grid."""
    from ddpm.images import save_grid, to_uint8

    arrays = {"samples": x.numpy().astype(np.float32), "arr_0": to_uint8(x)}
    if labels is not None:
        arrays["labels"] = arrays["arr_1"] = labels.numpy()
    npz = out_dir / "samples.npz"
    np.savez(npz, **arrays)
    grid = save_grid(x[: GRID_MAX - GRID_MAX % nrow] if nrow else x[:GRID_MAX], out_dir / "grid.png", nrow=nrow)
    print(f"samples: {npz}  {tuple(x.shape)}")
    print(f"grid: {grid}")
    return grid


def read_samples(path: str, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """The images of a samples file (ddpm.images.read_npz), refused in one line unless they are the model's shape."""
    from ddpm.images import read_npz

    if not Path(path).is_file():
        raise ConfigError(f"samples={path}: no such file; expected a samples.npz (`samples` float NCHW in [-1, 1], or `arr_0` uint8 NHWC)")
    try:
        x, _ = read_npz(path)
    except (ValueError, OSError) as e:  # numpy raises these for a file that is not an npz
        raise ConfigError(f"samples={path} cannot be scored: {first_line(e)}") from e
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise ConfigError(f"samples={path} holds {tuple(x.shape[1:])} images; the checkpoint's model makes {tuple(image_shape)} (C, H, W)")
    return x


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
    out = out_dir / "metrics.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
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
