"""Config plumbing for the Hydra entry points: resolvers, checkpoint paths, and one-line errors.

Importing this module registers the OmegaConf resolvers the YAML files use:
- `${or:A,B}`: A unless it is null or empty, else B (run dirs: `outputs/runs/${or:${name},<date>/<time>}`).

`clean_errors()` wraps an entry point so that a bad value or a missing file ends the process with one
line on stderr (`error: <key>=<value> ...`) and exit status 2 instead of a traceback; set
HYDRA_FULL_ERROR=1 to see the traceback.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

OmegaConf.register_new_resolver("or", lambda a, b: b if a in (None, "") else a, replace=True)

LAST = Path("checkpoints") / "last.ckpt"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and what is accepted."""


def resolve_ckpt(path: str | os.PathLike, key: str = "ckpt") -> Path:
    """A checkpoint file, or a run dir -> its checkpoints/last.ckpt; ConfigError naming `key` when neither exists."""
    p = Path(path)
    if p.is_dir():
        if (p / LAST).is_file():
            return p / LAST
        raise ConfigError(f"{key}={path}: a folder without {LAST} (expected a checkpoint file or a run dir)")
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such file or run dir")
    return p


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).strip().split("\n")[0].split()) or type(e).__name__


def user_error_message(e: BaseException) -> str | None:
    """One line describing `e` when it (or what it wraps) is a configuration or data error; None for a bug.

    Ours (ConfigError, DataError) name the key themselves; OmegaConf's get their key appended; a
    ValueError/TypeError raised while Hydra instantiates a config node (a Lightning argument, say)
    is reported with that node's key.
    """
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from ddpm.data import DataError

    node = None
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConfigError, DataError)):
            return _first_line(e)
        if isinstance(e, OmegaConfBaseException):
            key = getattr(e, "full_key", None)
            return f"{_first_line(e)} ({key})" if key and key not in _first_line(e) else _first_line(e)
        if isinstance(e, InstantiationException):
            match = re.search(r"full_key: (\S+)", str(e))
            node = match.group(1) if match else node
        elif isinstance(e, MisconfigurationException) or (node and isinstance(e, (ValueError, TypeError))):
            return f"{node}: {_first_line(e)}" if node else _first_line(e)
        e = e.__cause__ or e.__context__
    return None


def _remove_if_empty_run(run_dir: Path) -> None:
    """Delete a run dir that holds nothing but what Hydra wrote at start-up (.hydra/, <job>.log): no half-made runs."""
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get().job.name if HydraConfig.initialized() else None
    try:
        entries = [p.name for p in run_dir.iterdir()]
    except OSError:
        return
    if set(entries) <= {".hydra", f"{job}.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            run_dir.parent.rmdir()  # the <date> folder, when this was its only run


@contextlib.contextmanager
def clean_errors(run_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn configuration and data errors into `error: <message>` on stderr and exit status 2.

    `run_dir`: removed on such an error when it holds only Hydra's start-up files. Bugs keep their traceback,
    and so does everything when HYDRA_FULL_ERROR=1.
    """
    try:
        yield
    except Exception as e:
        message = user_error_message(e)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if run_dir is not None:
            _remove_if_empty_run(Path(run_dir))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
