"""Files that are whole or absent: write a temporary file beside the target, fsync it, rename it over the target.

A crash (kill -9, power loss, a full disk) at any moment leaves the previous file or the new one at the final
name, never a truncated one. The temporary name starts with a dot and ends in `.partial`, so no reader of the
folder (a glob for `*.ckpt`, `*.npz`, `*.png`) takes it for a result; one left by a kill -9 is replaced by the
next write of that target.

    write_atomic(path, lambda f: np.savez(f, samples=x))   # any writer of a binary file object
    write_text_atomic(path, json.dumps(record))
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def partial_path(path: str | os.PathLike) -> Path:
    """Where `write_atomic` writes before the rename: `<dir>/.<name>.partial`."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a binary file beside `path`, fsync it and rename it over `path` (parents created).

    On any failure (an exception in `write`, a full disk, an interrupt) the partial file is removed and the
    error raised: `path` keeps what it held before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`text` as UTF-8 at `path`, by write_atomic."""
    return write_atomic(path, lambda f: f.write(text.encode()))
