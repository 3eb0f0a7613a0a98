"""What sample.py draws, on one process or several: the plan (plain samples, images to edit, interpolation
frames), the chunks of batch_size each drawn from its own seed and shared among torchrun's ranks, and the files
(samples.npz with guided-diffusion's arr_0, grid.png; an existing npz read back to score)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig

from ddpm.errors import ConfigError, Failure, first_line
from ddpm.schema import check

GRID_MAX = 256  # grid.png shows at most this many samples; samples.npz holds all n
SAMPLES_FILE, GRID_FILE, METRICS_FILE = "samples.npz", "grid.png", "metrics.json"  # what sample.py writes into out_dir
SDEDIT_STRENGTH = 0.8  # init= without mask or strength: noise to t = 0.8 T (diffusers' image-to-image default)
# interpolate= with init=, spacing=null: karras keeps DDIM inversion below sigma 80 (up to about 50 steps), away from
# the cosine schedule's last timesteps, whose jumps in sigma (640 to 20000 at t = 999) amplify the network's error
INVERSION_SPACING = "karras"


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


def on_rank_zero(work: Callable[[], Any], rank: int, world: int) -> Any:
    """`work()` on rank 0 only (None elsewhere), its outcome broadcast to every rank under torchrun: when it fails,
    every rank raises at once (Failure.exception: a configuration error as the same ConfigError line, a bug as
    RankFailed naming it) instead of drawing its share and then waiting for rank 0 in the gather until the process
    group's timeout (30 minutes). Every rank calls this the same number of times (one broadcast each)."""
    if world == 1:
        return work()
    import torch.distributed as dist

    result, error, verdict = None, None, [None]
    if rank == 0:
        try:
            result = work()
        except Exception as e:
            error, verdict = e, [Failure.of(e, rank)]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise verdict[0].exception() from error
    return result


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
    reads them, `arr_0` uint8 NHWC and `arr_1` labels) and grid.png of the first GRID_MAX, each whole or not at all
    (ddpm.atomic.write_atomic: a kill mid-write leaves the previous file or none); returns the grid."""
    from ddpm.atomic import write_atomic
    from ddpm.images import save_grid, to_uint8

    arrays = {"samples": x.numpy().astype(np.float32), "arr_0": to_uint8(x)}
    if labels is not None:
        arrays["labels"] = arrays["arr_1"] = labels.numpy()
    npz = write_atomic(out_dir / SAMPLES_FILE, lambda f: np.savez(f, **arrays))
    grid = save_grid(x[: GRID_MAX - GRID_MAX % nrow] if nrow else x[:GRID_MAX], out_dir / GRID_FILE, nrow=nrow)
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
