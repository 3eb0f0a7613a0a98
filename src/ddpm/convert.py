"""Convert between this project's checkpoints and diffusers model folders (ddpm.diffusers_io):

    python -m ddpm.convert import path/to/ddpm-cifar10-32 converted.ckpt   # a native checkpoint (sample.py, init_weights=)
    python -m ddpm.convert export outputs/runs/demo exported/               # a diffusers folder (UNet2DModel, DDPMScheduler)

Nothing is overwritten: an existing output is refused in one line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpm.diffusers_io import CONFIG, is_diffusers_folder, read_folder, write_checkpoint, write_folder
from ddpm.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm.convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="a diffusers folder -> a native checkpoint")
    imp.add_argument("folder")
    imp.add_argument("out", help="the .ckpt to write")
    exp = commands.add_parser("export", help="a checkpoint or run dir -> a diffusers folder")
    exp.add_argument("ckpt")
    exp.add_argument("out", help="the folder to write")
    exp.add_argument("--live", action="store_true", help="the live weights instead of the EMA ones")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            if not is_diffusers_folder(args.folder):
                raise ConfigError(f"{args.folder}: not a diffusers model folder (no {CONFIG})")
            if Path(args.out).exists():
                raise ConfigError(f"{args.out} exists; not overwritten")
            print(f"wrote {write_checkpoint(read_folder(args.folder), args.out)}")
        else:
            from ddpm.checkpoints import load_module
            from ddpm.config import resolve_ckpt

            if Path(args.out).exists() and any(Path(args.out).iterdir()):
                raise ConfigError(f"{args.out} exists and is not empty; not overwritten")
            module = load_module(resolve_ckpt(args.ckpt, key="ckpt"), use_ema=not args.live).module
            print(f"wrote {write_folder(module, args.out)}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
