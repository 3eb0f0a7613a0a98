"""One process per run dir: a lock that a second train.py aimed at a run dir in use refuses on.

The lock is `fcntl.flock` on `<run dir>/.run.lock`, taken by the `Validate` Hydra callback (ddpm.config) before
Hydra writes anything into the dir, and held through an open file descriptor for the whole process: the kernel
releases it when the process ends, however it ends. The file also holds a JSON record of the holder (pid, host,
since, command), read by whoever is refused, and is deleted when the holder ends normally (exit, an error,
SIGTERM). A record left behind with the lock free means the holder died (kill -9, power loss): the next run
takes over with a one-line warning.

- `acquire(dir)` creates the dir and takes the lock, or raises RunInUse (a ConfigError: `error: <one line>`,
  exit status 2, nothing written into the dir). Only global rank 0 takes it: the other ranks of a DDP run
  (Lightning's plain `ddp` re-launches train.py with LOCAL_RANK set, torchrun sets RANK, SLURM SLURM_PROCID)
  share it and neither take nor check it; `ddp_spawn`/`ddp_fork` children never reach the Hydra callback.
- `check_free(dir)`: raise RunInUse, writing nothing, if another process holds a live lock on `dir` or above it
  (a single run aimed inside a running sweep), or, with `below=True`, on one of its subfolders (a sweep aimed at a
  folder holding a live run).
- `release(dir)`: delete the lock file and unlock; only the process that took it does (a forked child never does).

On a filesystem without flock (some cluster filesystems refuse it), the record alone decides: a holder on this
host whose pid is gone is taken over; one on another host cannot be checked and refuses, naming the file to
delete once that run is gone.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ddpm.errors import ConfigError

LOCK_NAME = ".run.lock"
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # fmt: skip
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_held: dict[str, list[int]] = {}  # absolute run dir -> [file descriptor, pid of the process that took it, acquire count]


class RunInUse(ConfigError):
    """The run dir is locked by another live process; the message names it (pid, host, since, command)."""


def is_global_rank_zero(env: dict[str, str] | os._Environ = os.environ) -> bool:
    """False in a process that the launcher of a distributed run started as a rank other than global rank 0."""
    return all(env.get(name, "0").strip() in ("", "0") for name in _RANK_VARIABLES)


def _key(run_dir: str | os.PathLike) -> str:
    return os.path.abspath(run_dir)


def _record() -> dict:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}


def _read(fd: int, wait: float = 0.0) -> dict | None:
    """The holder's record in the lock file, or None when it is empty or unreadable (after `wait` seconds of retries:
    a holder that has just taken the lock writes it a moment later)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            record = json.loads(os.pread(fd, 65536, 0).decode())
            if isinstance(record, dict) and "pid" in record:
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _alive(record: dict) -> bool | None:
    """Whether the holder's process still runs: True/False on this host, None (unknowable) on another."""
    if record.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def _describe(record: dict | None) -> str:
    if not record:
        return "another process (starting up: its record is not written yet)"
    return f"pid {record.get('pid')} on host {record.get('host')} since {record.get('since')} (started by '{record.get('command')}')"


def _in_use(subject: str, record: dict | None, resume: bool, sweep: bool = False, lock_path: Path | None = None,
            elsewhere: str | None = None) -> RunInUse:
    """`<subject> in use by <holder>; <what to do>`; subject: `outputs/runs/demo is`, or where it lies and is."""
    pid = record.get("pid") if record else None
    if resume:
        advice = f"wait for it to end, or stop it (kill -TERM {pid} saves last.ckpt) and then resume" if pid else "wait for it to end, then resume"
    else:
        advice = f"wait for it to end, or choose another {elsewhere or ('name=/hydra.sweep.dir=' if sweep else 'name=/hydra.run.dir=')}"
    if lock_path is not None:
        advice += f"; if that run is gone, delete {lock_path}"
    return RunInUse(f"{subject} in use by {_describe(record)}; {advice}")


def _flock(fd: int, retries: int = 10) -> bool | None:
    """Take the exclusive flock: True; False when another process holds it (after short retries, which absorb
    check_free's brief shared locks); None when the filesystem does not support flock."""
    for attempt in range(retries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in _BUSY:
                return None
        if attempt + 1 < retries:
            time.sleep(0.02)
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def acquire(run_dir: str | os.PathLike, *, shown: str | None = None, resume: bool = False, sweep: bool = False,
            elsewhere: str | None = None) -> bool:
    """Create `run_dir` and lock it for this process until release() or exit; True when this call took the lock.

    False without doing anything on a rank other than global rank 0; when this process holds it already, False
    and one more release() is needed (a sweep job whose dir is the sweep dir).
    Raises RunInUse when another live process holds it (nothing in the dir is changed). `shown`: the dir as the
    user wrote it, for the messages; `resume`, `sweep`: word the refusal for resume=true, for a sweep dir;
    `elsewhere`: the keys that choose another dir (default `name=/hydra.run.dir=`; sample.py's `out_dir=`).
    """
    key = _key(run_dir)
    if not is_global_rank_zero():
        return False
    if key in _held and _held[key][1] == os.getpid():
        _held[key][2] += 1
        return False
    shown = shown or str(run_dir)
    path = Path(key) / LOCK_NAME
    for _ in range(20):  # the file may be deleted by its holder between our open and our flock: then open again
        try:
            Path(key).mkdir(parents=True, exist_ok=True)  # again when a failed run removed its dir just now
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            continue
        except OSError as e:  # not writable by this user, say: the run could not write there either
            raise ConfigError(f"{shown}: cannot lock the run dir ({e.strerror}: {e.filename})") from e
        locked = _flock(fd)
        if locked is False:
            record = _read(fd, wait=0.5)
            os.close(fd)
            raise _in_use(f"{shown} is", record, resume, sweep, elsewhere=elsewhere)
        if locked and not _same_file(fd, path):
            os.close(fd)  # the holder deleted the file after we opened it: its lock was on the old inode
            continue
        previous = _read(fd)
        alive = _alive(previous) if previous and locked is None else False
        if alive is not False:  # no flock here, and the record names a live holder (or one on another host)
            os.close(fd)
            raise _in_use(f"{shown} is", previous, resume, sweep, lock_path=path if alive is None else None, elsewhere=elsewhere)
        if previous:
            print(f"warning: {shown}: taking over the lock of {_describe(previous)}, which is no longer running", file=sys.stderr)
        data = json.dumps(_record()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        _held[key] = [fd, os.getpid(), 1]
        return True
    raise RunInUse(f"{shown}: could not take {path}: it keeps being replaced by other processes")


def release(run_dir: str | os.PathLike) -> None:
    """Delete the lock file and unlock, when this process took the lock (a no-op otherwise, and in forked children)
    and this is the release of its last acquire()."""
    key = _key(run_dir)
    held = _held.get(key)
    if held is None or held[1] != os.getpid():
        return
    held[2] -= 1
    if held[2] > 0:
        return
    fd = _held.pop(key)[0]
    path = Path(key) / LOCK_NAME
    try:
        if _same_file(fd, path):  # not a newer holder's file (after ddpm.config.remove_if_empty_run deleted ours)
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


@atexit.register
def release_all() -> None:
    """Release every lock this process holds (at exit: normal end, an error, SIGTERM turned into SystemExit)."""
    for key in list(_held):
        _held[key][2] = 1
        release(key)


def _holder(lock_path: Path) -> dict | None:
    """The record of the live holder of `lock_path` (an empty dict when it has none yet), or None when it is free."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _BUSY:
                return _read(fd, wait=0.5) or {}
            record = _read(fd)  # no flock on this filesystem: the record decides
            return record if record and _alive(record) is not False else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def held_by_another(run_dir: str | os.PathLike) -> bool:
    """Whether another live process (not this one, nor the process this one was forked from) locks `run_dir`."""
    key = _key(run_dir)
    return key not in _held and _holder(Path(key) / LOCK_NAME) is not None


def check_free(run_dir: str | os.PathLike, *, shown: str | None = None, below: bool = False, resume: bool = False, sweep: bool = False) -> None:
    """Raise RunInUse when another process holds a live lock on `run_dir`, a folder above it, or (`below`) one of its
    subfolders, one level down; writes nothing."""
    if not is_global_rank_zero():
        return
    here = Path(_key(run_dir))
    folders = [here, *here.parents]
    if below and here.is_dir():
        folders += [p.parent for p in here.glob(f"*/{LOCK_NAME}")]
    for folder in folders:
        if str(folder) in _held or not (folder / LOCK_NAME).exists():
            continue
        record = _holder(folder / LOCK_NAME)
        if record is not None:
            shown = shown or str(run_dir)
            subject = f"{shown} is" if folder == here else f"{shown} {'lies inside' if folder in here.parents else 'holds'} {folder}, which is"
            raise _in_use(subject, record or None, resume, sweep)
