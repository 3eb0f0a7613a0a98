"""Inpainting benchmark: how often the digit's class survives when half of it is regenerated, by RePaint resampling.

    python bench/inpainting.py --ckpt outputs/runs/demo --n 359 --resample 1,2,5,10 --masks right,bottom

Takes the first `--n` digits of the val split, regenerates the `--masks` region of each (ddpm.edit_inputs presets:
right = the right half is generated, the left kept) with the ancestral sampler over `--steps` timesteps and RePaint's
resampling U in `--resample`, and reports the fraction whose class the shipped digits classifier still reads as the
original's (chance: 0.1; the classifier on the untouched images: `intact`), with the seconds each setting took.
Also writes an inpainting grid (rows: originals, then each U) and an interpolation strip next to the JSON: two val
digits, their DDIM encodings (50 steps, karras spacing, as sample.py's interpolate= with init= does) and 8 frames
decoded from the slerp between them; `--strip-only` writes just the strip.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddpm.checkpoints import load_module
from ddpm.config import resolve_ckpt
from ddpm.data import digits_split
from ddpm.digits_classifier import load_digits_classifier
from ddpm.edit_inputs import build_mask
from ddpm.images import save_grid
from ddpm.samplers import slerp


def classify(classifier: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return classifier(images).argmax(dim=1)


def interpolation_strip(module, pair: torch.Tensor, path: Path) -> None:
    """The two images, and 8 frames decoded from the slerp between their DDIM encodings; prints the end frames'
    mean absolute error against the images."""
    x_T = module.diffusion.ddim_invert(module.unet, pair, steps=50, spacing="karras")
    noise = torch.stack([slerp(x_T[:1], x_T[1:], float(w)) for w in torch.linspace(0, 1, 8)])[:, 0]
    frames = module.sample(8, "ddim", 50, noise=noise, spacing="karras", clip_denoised=False)
    errors = [float((frames[0] - pair[0]).abs().mean()), float((frames[-1] - pair[1]).abs().mean())]
    print(f"interpolation: end frames reproduce the images within {max(errors):.3f} mean absolute error")
    save_grid(torch.cat([pair[:1], frames, pair[1:]]), path, nrow=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint or run dir of a digits model")
    parser.add_argument("--n", type=int, default=359, help="val digits to inpaint (359: all)")
    parser.add_argument("--steps", type=int, default=100, help="ancestral steps (respaced)")
    parser.add_argument("--resample", default="1,2,5,10", help="RePaint's U values")
    parser.add_argument("--masks", default="right,bottom", help="ddpm.edit_inputs presets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/inpainting.json")
    parser.add_argument("--strip-only", action="store_true", help="write only the interpolation strip")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    module, _, step = load_module(resolve_ckpt(args.ckpt, key="--ckpt"), use_ema=True)
    images, labels = digits_split("val")
    images, labels = images[: args.n], labels[: args.n].long()
    interpolation_strip(module, images[[0, 1]], out.with_suffix(".interpolation.png"))
    if args.strip_only:
        return
    classifier = load_digits_classifier()
    results = {"ckpt": args.ckpt, "step": step, "n": len(images), "steps": args.steps, "chance": 0.1,
               "intact": float((classify(classifier, images) == labels).double().mean()), "settings": []}  # fmt: skip
    grid_rows = [images[:10]]
    for mask_name in args.masks.split(","):
        mask = build_mask(mask_name, module.image_shape)
        for resample in map(int, args.resample.split(",")):
            start = time.perf_counter()
            filled = module.sample(len(images), "ddpm", args.steps, x_init=images, mask=mask, seed=args.seed,
                                   sampler_options={"resample": resample})  # fmt: skip
            seconds = time.perf_counter() - start
            kept = float((classify(classifier, filled) == labels).double().mean())
            results["settings"].append({"mask": mask_name, "resample": resample, "class_kept": kept, "seconds": round(seconds, 1)})
            print(f"mask={mask_name} resample={resample}: class kept {kept:.3f} ({seconds:.1f} s)")
            grid_rows.append(filled[:10])
    save_grid(torch.cat(grid_rows), out.with_suffix(".grid.png"), nrow=10)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
