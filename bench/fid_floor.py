"""What bounds the digits-FID ratio: the score of a perfect model of the train images, and the class mix.

    python bench/fid_floor.py --draws 20
    python bench/fid_floor.py --ckpt outputs/bench/quality_per_minute/default/checkpoints/last.ckpt --n 2000 --draws 3

The digits floor (ddpm.metrics.SampleEvaluator) is the FID of real train images against the 359 val digits; at
n > 1438 it is all of them (9.33). A model that reproduces the train images exactly is a sampler drawing them at
random (with replacement). This prints what such a sampler scores:
- at each n of `--ns`: the mean and spread over `--draws` draws, and their ratio over the floor;
- extrapolated to infinitely many samples (ddpm.metrics.fid_infinity over the prefixes `--ns`), which is the
  protocol bench/quality_per_minute.py `--fid-at` compares with the floor;
- the class-mix part of the floor: the same sampler with its draws stratified to val's class mix (the
  digits classifier's predicted classes), at the largest n.
With `--ckpt`, each checkpoint's samples (`--sampler`, `--nfe` evaluations, bf16 autocast) get the same
figures: FID at `--n`, FID_inf, the total-variation distance of their class mix from train's, and the FID
of a stratified subset with train's class mix beside a random subset of the same size.
Writes JSON to `--out`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddpm.data import digits_split  # noqa: E402
from ddpm.digits_classifier import load_digits_classifier  # noqa: E402
from ddpm.metrics import SampleEvaluator, fid_infinity  # noqa: E402
from quality_per_minute import sample_ours  # noqa: E402


def class_mix(classes: torch.Tensor) -> torch.Tensor:
    return torch.bincount(classes, minlength=10).double() / len(classes)


def stratified(classes: torch.Tensor, mix: torch.Tensor, n: int, g: torch.Generator, replace: bool) -> torch.Tensor:
    """Indices of n items whose classes follow `mix` (drawn within each class, with or without replacement)."""
    picks = []
    for k in range(10):
        members = (classes == k).nonzero().flatten()
        m = int(round(n * float(mix[k])))
        if replace:
            picks.append(members[torch.randint(len(members), (m,), generator=g)])
        else:
            picks.append(members[torch.randperm(len(members), generator=g)[:m]])
    return torch.cat(picks)


def summary(values: list[float], floor: float) -> dict[str, float]:
    mean = statistics.mean(values)
    return {"mean": mean, "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "ratio": mean / floor}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", default="500,1000,2000,4000", help="sample counts of the bootstrap and the extrapolation")
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--ckpt", nargs="*", default=[], help="checkpoints whose samples to score the same way")
    p.add_argument("--n", type=int, default=2000, help="samples per draw of a checkpoint")
    p.add_argument("--sampler", default="dpmsolver++sde")
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--out", default="bench/results/fid_floor.json")
    args = p.parse_args()
    ns = sorted(int(k) for k in args.ns.split(","))

    train, val = digits_split("train")[0], digits_split("val")[0]
    evaluator = SampleEvaluator(val, floor_real=train, metrics=("fid",))
    floor = evaluator.floors(evaluator.n_floor_set)["fid_floor"]
    classifier = load_digits_classifier()
    with torch.no_grad():
        train_classes, val_classes = classifier(train).argmax(1), classifier(val).argmax(1)
    train_mix, val_mix = class_mix(train_classes), class_mix(val_classes)
    tv = lambda a, b: 0.5 * float((a - b).abs().sum())  # noqa: E731
    print(f"floor: FID of all {len(train)} train images {floor:.2f}; class mix train vs val: TV {tv(train_mix, val_mix):.3f}")

    g = torch.Generator().manual_seed(0)
    at_n: dict[int, list[float]] = {k: [] for k in ns}
    inf, mixed, plain = [], [], []
    for _ in range(args.draws):
        x = train[torch.randint(len(train), (ns[-1],), generator=g)]
        fids = {k: evaluator(x[:k])["fid"] for k in ns}
        for k in ns:
            at_n[k].append(fids[k])
        inf.append(fid_infinity(fids))
        plain.append(fids[ns[-1]])
        mixed.append(evaluator(train[stratified(train_classes, val_mix, ns[-1], g, replace=True)])["fid"])
    result = {"floor": floor, "tv_train_val": tv(train_mix, val_mix), "draws": args.draws,
              "bootstrap": {str(k): summary(v, floor) for k, v in at_n.items()},
              "bootstrap_fid_inf": summary(inf, floor), f"bootstrap_val_mix_{ns[-1]}": summary(mixed, floor)}  # fmt: skip
    for k, v in result["bootstrap"].items():
        print(f"a perfect model of the train images, n = {k:>5}: FID {v['mean']:6.2f} (sd {v['sd']:.2f}) = {v['ratio']:.2f}x the floor")
    v = result["bootstrap_fid_inf"]
    print(f"                                    FID_inf: {v['mean']:6.2f} (sd {v['sd']:.2f}) = {v['ratio']:.2f}x")
    v = result[f"bootstrap_val_mix_{ns[-1]}"]
    print(f"  the same at n = {ns[-1]}, drawn with val's class mix: {v['mean']:6.2f} (sd {v['sd']:.2f}) = {v['ratio']:.2f}x")

    result["checkpoints"] = []
    for path in args.ckpt:
        rows: dict[str, list[float]] = {"fid": [], "fid_inf": [], "tv_train": [], "fid_train_mix": [], "fid_random_subset": []}
        for seed in range(args.draws):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x, step = sample_ours(Path(path), args.n, args.nfe, args.sampler, seed, 500)
            with torch.no_grad():
                classes = classifier(x).argmax(1)
            mix = class_mix(classes)
            fids = {k: evaluator(x[:k])["fid"] for k in ns if k <= args.n} | {args.n: evaluator(x)["fid"]}
            # the largest subset with train's class mix, and a random subset of the same size as its control
            size = int(min(float(mix[k] * args.n / train_mix[k]) for k in range(10) if train_mix[k] > 0))
            sub = stratified(classes, train_mix, size, torch.Generator().manual_seed(seed), replace=False)
            control = torch.randperm(args.n, generator=torch.Generator().manual_seed(seed))[: len(sub)]
            rows["fid"].append(fids[args.n])
            rows["fid_inf"].append(fid_infinity(fids))
            rows["tv_train"].append(tv(mix, train_mix))
            rows["fid_train_mix"].append(evaluator(x[sub])["fid"])
            rows["fid_random_subset"].append(evaluator(x[control])["fid"])
        row = {"ckpt": path, "step": step, "n": args.n} | {k: summary(v, floor) for k, v in rows.items()}
        result["checkpoints"].append(row)
        print(f"{path} (step {step}): FID {row['fid']['mean']:.2f} ({row['fid']['ratio']:.2f}x), FID_inf "
              f"{row['fid_inf']['mean']:.2f} ({row['fid_inf']['ratio']:.2f}x), class-mix TV from train "
              f"{row['tv_train']['mean']:.3f}; a subset with train's mix {row['fid_train_mix']['mean']:.2f} against a "
              f"random one of its size {row['fid_random_subset']['mean']:.2f}", flush=True)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), **result}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
