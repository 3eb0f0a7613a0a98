"""Train the digits classifier behind digits-FID/KID and the classifier scores, and write its shipped assets.

    .venv/bin/python scripts/train_digits_classifier.py            # ~20 s on one CPU core

Trains ddpm.digits_classifier.DigitsClassifier on the train split of ddpm.data.digits_split only, with
light augmentation (random shifts of up to one pixel, Gaussian pixel noise), for a fixed number of
epochs (no model selection on the held-out split), then measures accuracy once on the val split and
writes src/ddpm/assets/digits_classifier.safetensors and digits_classifier.json (accuracy and settings).
Deterministic for a given seed, torch version and thread count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ddpm.data import digits_split
from ddpm.digits_classifier import INFO_PATH, WEIGHTS_PATH, DigitsClassifier, accuracy


def augment(x: torch.Tensor, max_shift: int, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels per axis (background -1 fills in), then add pixel noise."""
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (B, 1, H+2s, W+2s)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)).unbind(0)
    rows = (dy[:, None] + torch.arange(H))[:, :, None].expand(B, H, W)  # (B, H, W)
    cols = (dx[:, None] + torch.arange(W))[:, None, :].expand(B, H, W)
    shifted = padded[torch.arange(B)[:, None, None], 0, rows, cols].unsqueeze(1)  # (B, 1, H, W)
    noise = torch.randn(shifted.shape, generator=generator) * noise_std
    return (shifted + noise).clamp(-1.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--max-shift", type=int, default=1)
    parser.add_argument("--noise-std", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest for this tiny net, and reproducible")
    parser.add_argument("--out-dir", type=Path, default=WEIGHTS_PATH.parent)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train = digits_split("train")
    x_val, y_val = digits_split("val")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)

    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            x = augment(x_train[idx], args.max_shift, args.noise_std, generator)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  train loss {total / len(x_train):.4f}")

    model.eval()
    train_acc, val_acc = accuracy(model, x_train, y_train), accuracy(model, x_val, y_val)
    print(f"train accuracy {train_acc:.4f}  val accuracy {val_acc:.4f}  ({time.time() - start:.0f} s)")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / WEIGHTS_PATH.name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    info = {
        "val_accuracy": round(val_acc, 6),
        "train_accuracy": round(train_acc, 6),
        "n_train": len(x_train),
        "n_val": len(x_val),
        "split": {"function": "ddpm.data.digits_split", "val_fraction": 0.2, "seed": 0},
        "architecture": "conv3x3(32)-relu-conv3x3(64)-relu-maxpool2-fc(128)-relu-dropout(0.25)-fc(10)",
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_features": model.num_features,
        "training": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": "AdamW",
            "lr": args.lr,
            "lr_schedule": "OneCycleLR",
            "weight_decay": args.weight_decay,
            "augmentation": {"max_shift_px": args.max_shift, "noise_std": args.noise_std},
            "seed": args.seed,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "command": "python scripts/train_digits_classifier.py",
    }
    (args.out_dir / INFO_PATH.name).write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {weights} ({weights.stat().st_size / 1024:.0f} KiB) and {args.out_dir / INFO_PATH.name}")


if __name__ == "__main__":
    main()
